"""The sweep's winners as registered MLflow pyfunc models (the session's shared sweep on a
simulated GPU cluster with a real MLflow server): loaded in a fresh process they give the
checkpoint's classes and maps; ``mlflow models serve`` answers a valid request."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from impactx_ray.methods import ModelSpec, load_model

from cluster import free_ports, stop_session, wait_http
from tolerances import assert_batch_close

BIN = Path(sys.executable).parent
CELL = "lenet5-digits"
FRESH = """
import sys, numpy as np, mlflow
from impactx_ray.data import load_dataset
_, test = load_dataset("digits")
out = mlflow.pyfunc.load_model(sys.argv[1]).predict(test.images.permute(0, 2, 3, 1).numpy())
np.savez(sys.argv[2], **out)
"""

pytestmark = pytest.mark.slow


def test_the_sweep_registers_every_methods_winner(submitted_sweep, digits, tmp_path):
    from mlflow import MlflowClient

    uri, out = submitted_sweep.uri, submitted_sweep.out
    assert submitted_sweep.job.returncode == 0, submitted_sweep.job.stdout[-3000:]
    client = MlflowClient(uri)
    result = json.loads((out / "cells" / CELL / "result.json").read_text())
    sweep = json.loads((out / "sweep.json").read_text())["name"]
    for method in ("baseline", "impactx", "abn", "wae", "impactx_single"):
        (version,) = client.search_model_versions(f"name = 'impactx-{CELL}-{method}'")
        assert version.tags["impactx.sweep"] == sweep and version.tags["impactx.method"] == method
        assert float(version.tags["test_accuracy"]) == result[f"{method}_test_accuracy"]
        assert Path(version.tags["impactx.checkpoint"]).is_file()

    # the IMPACTX model, loaded in a fresh process, against its checkpoint loaded here
    (version,) = client.search_model_versions(f"name = 'impactx-{CELL}-impactx'")
    got = tmp_path / "fresh.npz"
    proc = subprocess.run([sys.executable, "-c", FRESH, f"models:/impactx-{CELL}-impactx/{version.version}",
                           str(got)], env={**os.environ, "MLFLOW_TRACKING_URI": uri},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = np.load(got)
    model, _ = load_model(version.tags["impactx.checkpoint"], ModelSpec("lenet5", 10))
    _, test = digits
    x = test.float_images()
    with torch.no_grad():  # as `impactx evaluate` scores it, and the checkpoint's own explain
        classes = torch.cat([model(c).argmax(1) for c in x.split(256)]).numpy()
        maps = torch.cat([model.explain(c) for c in x.split(256)]).numpy()
    assert np.array_equal(fresh["class"], classes)
    assert (classes == test.labels.numpy()).mean() == pytest.approx(result["impactx_test_accuracy"], abs=1e-6)
    assert_batch_close(fresh["map"], maps)
    assert fresh["probabilities"].shape == (len(test), 10)

    # `mlflow models serve --env-manager local` (docs/usage.md): one valid request
    (port,) = free_ports(1)
    log = tmp_path / "mlflow-serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m",
                               f"models:/impactx-{CELL}-impactx/{version.version}", "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=open(log, "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", server, log)  # uvicorn answers once the model is loaded
        image = test.images[:1].permute(0, 2, 3, 1).tolist()
        r = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": image}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"]["class"] == [int(classes[0])]
    finally:
        stop_session(server)


def test_impactx_run_registers_its_models_once_when_tracking_is_set(trained_run, digits, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from impactx_ray.config import RunConfig
    from impactx_ray.serve.registry import register_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # where a user ran `impactx run`
    mlflow.set_tracking_uri(uri)
    cfg = RunConfig.from_dict(json.loads((trained_run / "config.json").read_text()))
    result = json.loads((trained_run / "result.json").read_text())
    _, test = digits
    said = []
    first = register_run(trained_run, cfg, result, test.images, log=said.append)
    names = [f"impactx-{CELL}-{m}" for m in ("baseline", "impactx", "abn", "wae")]
    assert first == {name: "1" for name in names}
    assert said and uri in said[0] and "impactx-lenet5-digits-impactx version 1" in said[0]
    assert register_run(trained_run, cfg, result, test.images, log=said.append) == first  # nothing new
    client = MlflowClient(uri)
    version = client.get_model_version(f"impactx-{CELL}-wae", "1")
    assert float(version.tags["test_accuracy"]) == result["wae_test_accuracy"]
    assert version.tags["impactx.run_dir"] == str(trained_run.resolve())
    # the models' artifacts beside the database, not in the directory the command ran in
    assert not (elsewhere / "mlruns").exists() and (tmp_path / "mlartifacts").is_dir()
    model = mlflow.pyfunc.load_model(f"models:/impactx-{CELL}-abn/1")
    assert model.metadata.metadata["classes"] == test.classes
    out = model.predict(test.images[:5].permute(0, 2, 3, 1).numpy())
    assert out["map"].shape == (5, 1, 32, 32)  # ABN's attention
    # what `impactx serve --model models:/...` loads in each replica: the same predictor
    from impactx_ray.predict import Predictor
    from impactx_ray.serve.deployment import load_predictor

    served = load_predictor({"model_uri": f"models:/impactx-{CELL}-impactx/1"}, "cpu")
    direct = Predictor.from_checkpoint(trained_run / "stage2" / "model.pt")
    x = test.images[:50].permute(0, 2, 3, 1).numpy()
    a, b = served.predict(x), direct.predict(x)
    assert served.method == "impactx" and np.array_equal(a.labels, b.labels) and np.array_equal(a.maps, b.maps)
