"""The one thin Tune trainable: a trial trains one method of the table (``methods.py``) for one
point of its stage's grid, exactly as ``impactx run`` would.

A trial's ``config`` is a flat dict: every ``RunConfig`` field, the method's name and, for the
methods built on the stage-1 model, the paths of the stage-1 winner's checkpoint and its map
store. Each epoch is reported to Tune; the last report adds the best validation accuracy, the test
accuracy and the model as a Tune checkpoint (``CHECKPOINT_FILE``, with the method's checkpoint
meta).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from ray import tune

from impactx_ray.config import RunConfig
from impactx_ray.data import ImageData
from impactx_ray.defaults import CHECKPOINT_FILE, SELECTION_METRIC
from impactx_ray.explain import load_maps
from impactx_ray.explain.actors import here, ray_device
from impactx_ray.io import write_json
from impactx_ray.methods import TrainInputs, get_method, train_method
from impactx_ray.sweep.search import INDEX_KEY
from impactx_ray.train import FitHooks, Split, StageResult, accuracy
from impactx_ray.train.checkpoint import save_checkpoint

# Trial config entries that are not RunConfig fields.
# (MAP_STORE's value stays "maps": trial configs of earlier sweeps restore with it.)
METHOD, STAGE1_CHECKPOINT, MAP_STORE, CPUS = "method", "stage1_checkpoint", "maps", "cpus_per_trial"
EXTRA_KEYS = (METHOD, STAGE1_CHECKPOINT, MAP_STORE, CPUS)


def run_config(config: dict[str, Any]) -> RunConfig:
    """The trial's RunConfig: its config without the sweep's own entries (and without Optuna's
    positions in ordered value lists, ``search_index.*``)."""
    return RunConfig.from_dict({k: v for k, v in config.items()
                                if k not in EXTRA_KEYS and not k.startswith(INDEX_KEY)})


RESUME_FILE = "resume.pt"
NODE_KEY = "node_id"  # every report says which Ray node the trial ran on (MLflow tags it)


def _report_with_state(epochs: int):
    """An ``on_state`` that reports every epoch but the last (that one goes with the model) with
    a Tune checkpoint of the whole fit state, so a retried trial goes on from its last epoch."""

    def on_state(state: dict[str, Any]) -> None:
        if state["epoch"] >= epochs:
            return
        metrics = {**state["history"][-1], SELECTION_METRIC: state["best_val_accuracy"],
                   NODE_KEY: here()["node_id"]}
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, Path(tmp) / RESUME_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
    return on_state


def _last_state() -> dict[str, Any] | None:
    """The fit state of this trial's last checkpoint, when Tune retries it (else None)."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as path:
        file = Path(path) / RESUME_FILE
        return torch.load(file, map_location="cpu", weights_only=True) if file.exists() else None


def _final_report(result: StageResult, test_accuracy: float, meta: dict[str, Any]) -> None:
    metrics = {**result.history[-1], SELECTION_METRIC: result.best_val_accuracy,
               "best_epoch": result.best_epoch, "test_accuracy": test_accuracy,
               "train_seconds": result.seconds, NODE_KEY: here()["node_id"]}
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / CHECKPOINT_FILE, result.model.state_dict(), meta)
        write_json(Path(tmp) / "history.json", result.history)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def method_trainable(config: dict[str, Any],
                     data: tuple[ImageData, ImageData] | None = None) -> None:
    """Train ``config["method"]`` with the trial's hyperparameters; report per epoch and at the
    end. ``data`` (train, test) comes from the driver through the object store
    (``tune.with_parameters``), read once per node: a trial never reads ``data_root``, which need
    not exist on its node."""
    if data is None:
        raise ValueError("a trial takes the cell's data from the driver: "
                         "tune.with_parameters(trainable, data=(train, test))")
    cfg, method = run_config(config), get_method(config[METHOD])
    torch.set_num_threads(max(1, int(config.get(CPUS, 1))))
    device = ray_device(cfg.device, f"trial {tune.get_context().get_trial_id()} ({method.name})")
    train, test = data
    split = Split.of(train, cfg.val_fraction, cfg.seed)
    resume = _last_state()
    if resume is not None:
        print(f"{method.name}: resuming after epoch {resume['epoch']} from the trial's checkpoint",
              flush=True)
    hooks = FitHooks(on_state=_report_with_state(method.epochs(cfg)), resume=resume, progress=False)
    inputs = TrainInputs(cfg, split, device, hooks)
    if method.builds_on_stage1:
        inputs.stage1 = Path(config[STAGE1_CHECKPOINT])
    if method.needs_maps:
        inputs.maps = load_maps(config[MAP_STORE])  # the shared store: computed once per winner
    result, meta = train_method(method, inputs)
    _final_report(result, accuracy(result.model, test, device=device), meta)


# One named trainable per stage: Tune identifies an experiment's trainable by name, so these keep
# sweep directories of earlier versions restorable (their trials carry no "method" key).
def stage1_trainable(config: dict[str, Any], data: Any = None) -> None:
    method_trainable({METHOD: "baseline", **config}, data)


def stage2_trainable(config: dict[str, Any], data: Any = None) -> None:
    method_trainable({METHOD: "impactx", **config}, data)


def comparison_trainable(config: dict[str, Any], data: Any = None) -> None:
    method_trainable(config, data)  # the grid says which method: abn or wae


STAGE_TRAINABLES = {"stage1": stage1_trainable, "stage2": stage2_trainable,
                    "comparison": comparison_trainable}
STAGE_METHODS = {"stage1": "baseline", "stage2": "impactx"}  # the comparison's grid names its own


def trial_method(stage: str, config: dict[str, Any]) -> str:
    return config.get(METHOD) or STAGE_METHODS[stage]


def trial_params(stage: str, grid_keys: tuple[str, ...], config: dict[str, Any]) -> dict[str, Any]:
    """The params a trial's MLflow run gets: what its stage varies and what its method uses
    (stage-1 trials show no λ, no stage-2 budget, no SHAP settings)."""
    method = get_method(trial_method(stage, config))
    keys = dict.fromkeys((*grid_keys, *method.settings))
    return {"method": method.name, **{k: config[k] for k in keys if k in config and k != METHOD}}


def trial_tags(cell: str, stage: str, config: dict[str, Any]) -> dict[str, str]:
    return {"impactx.cell": cell, "impactx.stage": stage,
            "impactx.method": trial_method(stage, config)}
