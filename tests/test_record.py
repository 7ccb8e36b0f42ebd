"""The recorder interface: runs addressed by key, to files (impactx run) or to MLflow (sweeps)."""

import math

import pytest

from impactx_ray.pipeline.record import FileRecorder, finite_metrics, record_evaluation

MORF = {"flat_metrics": {"morf.noise.IMPACTX.aopc": 0.4}, "aopc": {"IMPACTX": 0.4, "random (ABN)": 0.1},
        "figures": ["/tmp/examples.png"]}


def test_file_recorder_keeps_entries_in_order_by_key(tmp_path):
    rec = FileRecorder(tmp_path / "r" / "record.jsonl")
    assert rec.start("cell", "cell") == "cell"
    rec.start("cell/stage1", "stage 1", parent="cell")
    rec.params("cell/stage1", {"lr": 0.0006, "batch_size": 32})
    rec.metrics("cell/stage1", {"val_accuracy": 0.9, "bad": math.nan, "flag": True}, step=3)
    rec.finish("cell/stage1", ok=False)
    entries = rec.entries()
    assert [(e["what"], e["key"]) for e in entries] == [
        ("start", "cell"), ("start", "cell/stage1"), ("params", "cell/stage1"),
        ("metrics", "cell/stage1"), ("finish", "cell/stage1")]
    assert entries[1]["parent"] == "cell" and entries[2]["params"] == {"batch_size": "32", "lr": "0.0006"}
    assert entries[3]["metrics"] == {"val_accuracy": 0.9} and entries[3]["step"] == 3  # NaN, bools left out
    assert entries[4]["ok"] is False
    assert all(e["time"] <= f["time"] for e, f in zip(entries, entries[1:]))


def test_finite_metrics():
    assert finite_metrics({"a": 1, "b": 2.5, "c": math.inf, "d": True, "e": "x"}) == {"a": 1.0, "b": 2.5}


def test_record_evaluation_holds_accuracies_and_the_morf_measures(tmp_path):
    rec = FileRecorder(tmp_path / "record.jsonl")
    record_evaluation(rec, "run", {"baseline_test_accuracy": 0.9, "num_test": 360}, MORF, tmp_path / "morf")
    metrics = {k: v for e in rec.entries() if e["what"] == "metrics" for k, v in e["metrics"].items()}
    assert metrics == {"baseline_test_accuracy": 0.9, "morf.noise.IMPACTX.aopc": 0.4,
                       "aopc_IMPACTX": 0.4, "aopc_random_ABN": 0.1}
    artifacts = [(e["path"], e["folder"]) for e in rec.entries() if e["what"] == "artifact"]
    assert artifacts == [("/tmp/examples.png", "figures"), (str((tmp_path / "morf" / "morf.json").resolve()), "morf")]
    record_evaluation(rec, "run2", {"wae_test_accuracy": 0.8})  # no MoRF: accuracies only
    assert [e["what"] for e in rec.entries() if e["key"] == "run2"] == ["metrics"]


@pytest.mark.slow
def test_mlflow_tracker_finds_runs_again_by_key(tmp_path):
    from mlflow import MlflowClient

    from impactx_ray.sweep.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, experiment="t", key_prefix="sweep-1:")
    sweep = tracker.start("sweep", "sweep")
    cell = tracker.start("cell", "cell", parent=sweep)
    tracker.params(cell, {"lr": 0.1})
    tracker.params(cell, {"lr": 0.1, "batch_size": 16})  # a param is logged once
    tracker.metrics(cell, {"acc": 0.5, "nan": math.nan}, step=2)
    tracker.finish(cell)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.id_of(cell))
    assert run.data.params == {"lr": "0.1", "batch_size": "16"} and run.data.metrics == {"acc": 0.5}
    assert run.data.tags["mlflow.parentRunId"] == tracker.id_of("sweep")
    assert run.data.tags["impactx.key"] == "sweep-1:cell" and run.info.status == "FINISHED"

    again = Tracker(uri, experiment="t", key_prefix="sweep-1:")  # a resumed driver: found by key
    assert again.start("cell", "cell", parent="sweep") == "cell"
    assert again.id_of("cell") == run.info.run_id
    assert len(client.search_runs([run.info.experiment_id])) == 2
    other = Tracker(uri, experiment="t", key_prefix="sweep-2:")  # another sweep's keys never match
    with pytest.raises(KeyError, match="'cell'"):
        other.id_of("cell")
    # a sweep directory of an earlier version hands its trial logger a run id as the parent
    assert other.start("trial", "trial", parent=run.info.run_id) == "trial"
    assert client.get_run(other.id_of("trial")).data.tags["mlflow.parentRunId"] == run.info.run_id
