"""A sweep killed mid-stage and resumed (docs/sweeps.md, "Resume"): Tune restores the stage, every
trial has one MLflow run, and the runs a restored stage cannot own are ended as superseded."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from sweep_runs import SUPERSEDED, trial_runs, wait_for_trial_metrics

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "sweeps" / "full_grid.py"
FAST_SMOKE = ["--smoke", "--max-evals", "32"]


@pytest.mark.slow
def test_smoke_sweep_killed_mid_stage_resumes_without_duplicates(tmp_path):
    """A budgeted smoke sweep (Optuna + ASHA, 6 trials a stage) killed in stage 1 and rerun:
    Tune restores the searcher and scheduler, every trial has one MLflow run, ASHA's stopped
    trials are finished (not failed), tagged, with their curves. A trial Tune started after it
    last saved its state (when the kill comes at that moment) has a run no restored trial holds:
    it ends KILLED, tagged superseded, and is not counted (the logic alone: the next test)."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(SCRIPT), *FAST_SMOKE, "--search", "optuna", "--scheduler", "asha",
           "--num-samples", "6", "--out", str(out)]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        wait_for_trial_metrics(out / "mlflow.db", first)
        assert first.poll() is None, "the sweep ended before it could be interrupted"
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
        first.wait()
    assert not (out / "summary.md").exists()

    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "mlflow ui --backend-store-uri sqlite:///" in second.stdout
    runs, superseded = trial_runs(out / "mlflow.db"), trial_runs(out / "mlflow.db", superseded=True)
    keys = [key for key, _, _ in runs + superseded]
    assert len(keys) == len(set(keys)), f"duplicated trial runs: {sorted(keys)}"
    stage1 = [r for r in runs if "/stage1/" in r[0]]
    stage2 = [r for r in runs if "/stage2/" in r[0]]
    assert len(stage1) == 6 and len(stage2) == 6, (runs, superseded)
    assert all(status == "FINISHED" for _, status, _ in runs), runs
    assert {parent for _, _, parent in stage1} == {"lenet5-digits/stage1"}
    assert {parent for _, _, parent in stage2} == {"lenet5-digits/stage2"}
    # the kill came in stage 1: only its runs can be superseded, each ended KILLED and said
    assert all(status == "KILLED" and parent == "lenet5-digits/stage1" for _, status, parent in superseded)
    assert (f"lenet5-digits/stage1: {len(superseded)} trial run(s) started before the sweep was killed"
            in second.stdout) == bool(superseded), second.stdout[-3000:]
    con = sqlite3.connect(out / "mlflow.db")
    for key, _, _ in runs:
        params = dict(con.execute(
            "select p.key, p.value from params p join tags t on t.run_uuid = p.run_uuid "
            "where t.key = 'impactx.key' and t.value like ?", ("%" + key,)).fetchall())
        assert {"method", "batch_size", "lr", "val_fraction", "epochs"} <= set(params)
        # only what the stage varies or uses: no λ or SHAP settings on stage-1 trials
        assert ("lam" in params and "max_evals" in params) == ("/stage2/" in key), (key, params)
        assert "stage1_checkpoint" not in params and "cpus_per_trial" not in params
    tags = dict(con.execute("select t.key, t.value from tags t join tags k on k.run_uuid = "
                            "t.run_uuid where k.key = 'impactx.key' and k.value like ?",
                            ("%" + stage1[0][0],)).fetchall())
    assert (tags["impactx.cell"], tags["impactx.stage"], tags["impactx.method"]) == \
        ("lenet5-digits", "stage1", "baseline")
    # ASHA stopped some stage-1 trials before their last epoch (of 3): finished, tagged, and
    # their curves kept up to the epoch it stopped them at
    early = con.execute("select k.value, (select max(m.step) from metrics m where m.run_uuid = "
                        "k.run_uuid and m.key = 'val_accuracy') from tags k join tags e on "
                        "e.run_uuid = k.run_uuid where k.key = 'impactx.key' and k.value like "
                        "'%/stage1/%' and e.key = 'impactx.early_stopped' and e.value = 'true' "
                        "and not " + SUPERSEDED.format(run="k.run_uuid")).fetchall()
    assert early and all(1 <= steps < 3 for _, steps in early), early
    stage_metrics = dict(con.execute(
        "select m.key, m.value from metrics m join tags t on t.run_uuid = m.run_uuid where "
        "t.key = 'impactx.key' and t.value like '%lenet5-digits/stage1'").fetchall())
    assert stage_metrics["trials"] == 6 and stage_metrics["trials_early_stopped"] == len(early)
    assert stage_metrics["trial_epochs"] < 6 * 3  # what ASHA saved
    test_metrics = con.execute("select count(*) from metrics where key = 'test_accuracy' and "
                               "run_uuid in (select run_uuid from tags where key = "
                               "'impactx.key' and value like '%/stage%/%')").fetchone()[0]
    assert test_metrics == 0  # test accuracy only on the stage winners, never per trial
    kind = con.execute("select value from experiment_tags where key = 'mlflow.experimentKind'")
    assert kind.fetchone() == ("custom_model_development",)
    summary = (out / "summary.md").read_text()
    assert f"| lenet5 | digits | optuna+asha: 6 trials ({len(early)} stopped early)" in summary
    row = next(line for line in summary.splitlines() if line.startswith("| lenet5 | digits |"))
    accuracies = row.split("|")[3:7]  # baseline, IMPACTX, ABN, WAE: all four trained
    assert all(0 < float(a) <= 100 for a in accuracies), row
    assert "AOPC" in summary and "SHAP of IMPACTX" in summary and "random" in summary
    figures = out / "cells" / "lenet5-digits" / "morf"
    assert (figures / "examples.png").stat().st_size > 0
    assert (figures / "morf_mean.png").stat().st_size > 0
    histories = list((out / "mlartifacts").rglob("history.json"))
    assert len(histories) >= 4 and all(json.loads(h.read_text())[0]["epoch"] == 1
                                       for h in histories)
    logged = {p.name for p in (out / "mlartifacts").rglob("*.png")}
    assert {"examples.png", "morf_mean.png"} <= logged, "figures missing from MLflow"
    assert not (ROOT / "mlruns").exists(), "MLflow wrote artifacts into the working directory"


def test_runs_no_trial_of_the_stage_holds_are_picked_by_key_or_trial_id():
    from impactx_ray.sweep.tracking import orphans

    runs = {"c/s1/lr=0.1#a": {"impactx.trial_id": "a"},  # held by key
            "c/s1/lr=0.2#b": {"impactx.trial_id": "b"},  # by id: failed before it reported
            "c/s1/lr=0.3#c": {"impactx.trial_id": "c"},  # started after Tune last saved
            "c/s1/lr=0.4#d": {"impactx.trial_id": "d", "impactx.superseded": "true"},  # already
            "c/s1/lr=0.5#e": {}}  # killed before its tags were logged
    assert orphans(runs, keep={"c/s1/lr=0.1#a", "c/s1/lr=0.6#f"}, keep_ids={"a", "b", "f"}) == \
        ["c/s1/lr=0.3#c", "c/s1/lr=0.5#e"]
    assert orphans(runs, keep=runs, keep_ids=()) == []


def test_a_resumed_stage_ends_the_runs_its_trials_do_not_hold_as_killed(tmp_path):
    """The kill race of the smoke sweep above, made deterministic: a killed driver's trial
    logger started four runs (two finished, one failed before it reported, one started after
    Tune last saved); the resumed stage's ResultGrid holds the first three and a new trial in the
    fourth's slot. The fourth run ends KILLED and tagged, once; nothing else changes."""
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from impactx_ray.sweep.tracking import Tracker
    from impactx_ray.sweep.trial_logger import MLflowTrialLogger

    said = []
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, experiment="t", key_prefix="s1/", journal=tmp_path / "j", log=said.append)
    stage = tracker.start("c/stage1", "stage1")
    tracker.start("c/stage2/lr=0.4#d", "another stage's trial", parent=tracker.start("c/stage2", "stage2"))

    def logger() -> MLflowTrialLogger:
        return MLflowTrialLogger(tracker, "c/stage1", stage, ("lr",), params_of=lambda c: c,
                                 tags_of=lambda c: {}, sampled=True)

    def trial(trial_id: str, lr: float) -> SimpleNamespace:
        return SimpleNamespace(trial_id=trial_id, config={"lr": lr}, checkpoint=None, error_file=None,
                               last_result={"epoch": 3, "test_accuracy": 0.9})

    killed = logger()
    a, b, c, d, e = trial("a", 0.1), trial("b", 0.2), trial("c", 0.3), trial("d", 0.4), trial("e", 0.5)
    for t in (a, b, c, d):
        killed.on_trial_start(0, [], t)
    killed.on_trial_complete(0, [], a)
    killed.on_trial_complete(0, [], b)
    killed.on_trial_error(0, [], c)
    resumed = logger()  # Tune's restored logger runs e; the stage's own names the held runs
    resumed.on_trial_start(0, [], e)
    resumed.on_trial_complete(0, [], e)
    results = [SimpleNamespace(config=t.config, metrics={"trial_id": t.trial_id, "config": t.config})
               for t in (a, b, e)] + [SimpleNamespace(config=None, metrics={"trial_id": "c"})]
    held = resumed.held(results)
    assert held == ({"c/stage1/lr=0.1#a", "c/stage1/lr=0.2#b", "c/stage1/lr=0.5#e"}, {"a", "b", "c", "e"})
    tracker.supersede("c/stage1", *held)

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("t").experiment_id
    runs = {r.data.tags["impactx.key"]: r for r in client.search_runs([experiment])}
    status = {key: run.info.status for key, run in runs.items() if key.count("/") == 3}
    assert status == {"s1/c/stage1/lr=0.1#a": "FINISHED", "s1/c/stage1/lr=0.2#b": "FINISHED",
                      "s1/c/stage1/lr=0.3#c": "FAILED", "s1/c/stage1/lr=0.4#d": "KILLED",
                      "s1/c/stage1/lr=0.5#e": "FINISHED", "s1/c/stage2/lr=0.4#d": "RUNNING"}
    gone = runs["s1/c/stage1/lr=0.4#d"]
    assert [k for k, r in runs.items() if "impactx.superseded" in r.data.tags] == ["s1/c/stage1/lr=0.4#d"]
    assert gone.data.tags["impactx.superseded"] == "true" and "killed" in gone.data.tags["mlflow.note.content"]
    assert said == ["c/stage1: 1 trial run(s) started before the sweep was killed, their slots run again "
                    "since: ended as KILLED, tagged impactx.superseded (c/stage1/lr=0.4#d)"]
    assert tracker.journal.pending() == []  # a record of the journal like the others, applied
    tracker.supersede("c/stage1", *held)  # resumed again (or the record applied twice): no change
    assert len(said) == 1 and client.get_run(gone.info.run_id).info.end_time == gone.info.end_time
