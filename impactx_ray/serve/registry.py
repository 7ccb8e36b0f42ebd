"""Trained models as MLflow ``pyfunc`` models in the Model Registry (docs/usage.md, "Use the
trained model"): ``mlflow.pyfunc.load_model("models:/impactx-lenet5-digits-impactx/1")`` gives
class, probabilities and the method's own map, with no explainer in the loop.

    input    uint8 N×H×W×3: images as decoded (height, width, RGB), at the model's image size
    output   {"class": int64 N, "probabilities": float32 N×K, "map": float32 N×C×H×W}
             ("map" for the methods that have one: IMPACTX, ABN, WAE; not the baseline)

The model's artifacts are its impactx-ray checkpoint (state dict + meta) and ``pyfunc_code.py``,
which makes the :class:`ImpactxModel` when the model loads (MLflow's "models from code": nothing
pickled; loading needs impactx-ray installed, which its pinned requirements name). The class
names are in the model's metadata.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Param
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from impactx_ray.predict import Predictor

CODE = Path(__file__).with_name("pyfunc_code.py")  # the model's code, logged with it
SHA_TAG = "impactx.sha256"  # the checkpoint's, on each model version
DEVICE_ENV = "IMPACTX_DEVICE"  # where a loaded model runs (default auto: a GPU when there is one)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar per model logged


class ImpactxModel(mlflow.pyfunc.PythonModel):
    """The pyfunc face of a :class:`~impactx_ray.predict.Predictor`."""

    # The signature is ``signature()``'s tensor specs, which type hints cannot say: MLflow's
    # type-hint validation (and its warning that predict has none) is skipped.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from impactx_ray.devices import resolve_device

        device = resolve_device(os.environ.get(DEVICE_ENV, "auto"))
        self.predictor = Predictor.from_checkpoint(context.artifacts["checkpoint"], device=device)

    def predict(self, context, model_input, params=None):
        pred = self.predictor.predict(model_input)
        out = {"class": pred.labels, "probabilities": pred.probabilities}
        if pred.maps is not None:
            out["map"] = pred.maps
        return out


def signature(predictor: Predictor) -> ModelSignature:
    h, w = predictor.image_size
    outputs = [TensorSpec(np.dtype(np.int64), (-1,), "class"),
               TensorSpec(np.dtype(np.float32), (-1, len(predictor.classes)), "probabilities")]
    if predictor.has_map:
        channels = 1 if predictor.method == "abn" else 3
        outputs.append(TensorSpec(np.dtype(np.float32), (-1, channels, h, w), "map"))
    return ModelSignature(Schema([TensorSpec(np.dtype(np.uint8), (-1, h, w, 3))]), Schema(outputs))


def pinned_requirements() -> list[str]:
    """impactx-ray and every package it requires, at the versions installed here."""
    try:
        pins = [f"impactx-ray=={importlib.metadata.version('impactx-ray')}"]
        required = importlib.metadata.requires("impactx-ray") or []
    except importlib.metadata.PackageNotFoundError:  # run from a source tree (PYTHONPATH)
        pins, required = ["impactx-ray"], ["torch", "torchvision", "timm", "numpy", "shap", "mlflow"]
    for req in required:
        name = re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0]
        if "extra ==" not in req:
            try:
                pins.append(f"{name}=={importlib.metadata.version(name)}")
            except importlib.metadata.PackageNotFoundError:
                pins.append(name)
    return pins


def register(checkpoint: str | Path, run_id: str, name: str, example: np.ndarray,
             tags: dict[str, Any], uri: str | None = None) -> str:
    """Log ``checkpoint`` as a pyfunc model into the run ``run_id`` and register it as ``name``
    (a new version, created with ``tags`` and the checkpoint's sha256); returns the version. The
    same checkpoint already registered from the same run is not logged again: a replayed tracking
    journal, or ``impactx run`` again on a finished run directory, registers once."""
    from impactx_ray.io import file_sha256

    client = MlflowClient(uri)
    sha = file_sha256(checkpoint)
    for version in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if version.tags.get(SHA_TAG) == sha:
            return str(version.version)
    predictor = Predictor.from_checkpoint(checkpoint)
    if uri:
        mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=predictor.method, python_model=str(CODE), artifacts={"checkpoint": str(checkpoint)},
            signature=signature(predictor), input_example=np.asarray(example, dtype=np.uint8),
            pip_requirements=pinned_requirements(),
            metadata={"classes": predictor.classes, "method": predictor.method,
                      "image_size": list(predictor.image_size)})
    client.update_run(run_id, status="RUNNING")  # the caller finishes the run
    version = mlflow.register_model(info.model_uri, name, tags={**{k: str(v) for k, v in tags.items()},
                                                                SHA_TAG: sha})
    return str(version.version)


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment ``name``, created if absent. With a database file as the store, its
    artifacts (the models) go beside that file in ``mlartifacts/``: MLflow's default, ``./mlruns``,
    would follow whatever directory the command ran in. A server decides for itself."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    uri, location = mlflow.get_tracking_uri(), None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def register_run(out: Path, cfg: Any, result: dict[str, Any], test_images: Any,
                 log: Any = print) -> dict[str, str]:
    """``impactx run``'s trained models registered (``MLFLOW_TRACKING_URI`` set): one MLflow run
    per run directory (experiment ``MLFLOW_EXPERIMENT_NAME``, default impactx-runs) holding the
    config and accuracies, and each method's model as ``impactx-<model>-<dataset>-<method>``."""
    from impactx_ray.config import cell_name
    from impactx_ray.methods import METHODS
    from impactx_ray.rundir import RunDir
    from impactx_ray.serve import registered_name

    client = MlflowClient()
    experiment = experiment_id(client, os.environ.get("MLFLOW_EXPERIMENT_NAME", "impactx-runs"))
    where = str(Path(out).resolve())
    found = client.search_runs([experiment], f"tags.`impactx.run_dir` = '{where}'", max_results=1)
    run_id = found[0].info.run_id if found else client.create_run(
        experiment, run_name=Path(out).name, tags={"impactx.run_dir": where}).info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in sorted(cfg.to_dict().items())]
                     if not found else [])
    for key, value in result.items():
        if key.endswith("_accuracy") and isinstance(value, float):
            client.log_metric(run_id, key, value)
    example = test_images[:2].permute(0, 2, 3, 1).numpy()  # 2×3×H×W -> 2×H×W×3
    versions = {}
    for method in METHODS.values():
        checkpoint = RunDir(Path(out)).checkpoint(method)
        if not checkpoint.exists() or f"{method.name}_test_accuracy" not in result:
            continue
        name = registered_name(cell_name(cfg.model, cfg.dataset), method.name)
        versions[name] = register(checkpoint, run_id, name, example,
                                  {"impactx.run_dir": where, "impactx.method": method.name,
                                   "test_accuracy": result[f"{method.name}_test_accuracy"]})
    client.set_terminated(run_id)
    log("registered in MLflow at " + mlflow.get_tracking_uri() + ": "
        + ", ".join(f"{name} version {v}" for name, v in versions.items()))
    return versions
