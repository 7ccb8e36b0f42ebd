"""The sweep: Table 1 grids, dry run, summary; the smoke sweep end to end, killed and resumed;
a crashing trial; ``ray job submit`` against a local head."""

import csv
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from impactx_ray.data import train_val_split
from impactx_ray.report import summary_markdown, write_summary
from impactx_ray.sweep.spaces import LAMBDAS, LEARNING_RATES, cells, plan, stage1_space, stage2_space

from cluster import session_pids

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "sweeps" / "full_grid.py"
FAST_SMOKE = ["--smoke", "--max-evals", "32"]


def test_table1_grids_are_exact():
    assert LEARNING_RATES[:3] == (0.0001, 0.0006, 0.0011) and LEARNING_RATES[-1] == 0.0096
    assert len(LEARNING_RATES) == 20 and all(round(lr, 4) == lr for lr in LEARNING_RATES)
    assert LAMBDAS == (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4)
    assert stage1_space().size == 180 and len(stage1_space().points()) == 180
    winner = {"batch_size": 16, "lr": 0.0011, "val_fraction": 0.2}
    s2 = stage2_space(winner=winner)
    assert s2.size == 7 and all(p["batch_size"] == 16 and p["lr"] == 0.0011 for p in s2.points())
    assert stage2_space(full=True).size == 60 * 7  # batch size × lr × λ: M's split kept


@pytest.mark.parametrize("full", [False, True])
def test_stage2_validation_images_were_never_in_m_training_set(full):
    """Stage 2 trains on the winner's frozen M: every stage-2 trial's validation images must be
    outside M's training images. The splits are nested, so any other fraction would leak."""
    winner = {"batch_size": 16, "lr": 0.0011, "val_fraction": 0.1}
    n, seed = 1437, 0
    m_train, _ = train_val_split(n, winner["val_fraction"], seed)
    for point in stage2_space(full=full, winner=winner).points():
        trial = {**winner, **point}  # the trial's base carries the winner's values
        _, val = train_val_split(n, trial["val_fraction"], seed)
        assert not set(val) & set(m_train), point
    # the check can fail: a stage-2 fraction larger than M's is what leaked before
    _, larger = train_val_split(n, 0.2, seed)
    assert set(larger) & set(m_train)


def test_dry_run_counts_without_starting_ray():
    code = ("import sys, runpy; sys.argv = ['full_grid.py', '--dry-run']; "
            "sys.path.insert(0, 'sweeps'); import full_grid; rc = full_grid.main(['--dry-run']); "
            "print('ray imported:', 'ray' in sys.modules); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert ("9 cells; per cell: 180 stage-1 + 7 stage-2 + 2 comparison (ABN, WAE) trials = 189"
            in proc.stdout)
    assert "total: 1620 stage-1 + 63 stage-2 + 18 comparison = 1701 trials" in proc.stdout
    assert "data cifar10: cifar10 not found under" in proc.stdout  # no CIFAR here: said, not fatal
    assert "ray imported: False" in proc.stdout
    assert plan(cells(("lenet5",), ("digits",)), smoke=True)[-1] == \
        "total: 2 stage-1 + 2 stage-2 + 2 comparison = 6 trials"


def test_comparison_methods_and_replacements_are_checked_counted_and_recorded(tmp_path):
    """--comparison adds single-stage IMPACTX to the comparison stage and --replacement the MoRF
    replacements; both are checked before Ray, counted by --dry-run, and part of the sweep's
    identity only when not the defaults (sweeps from before them still resume)."""
    from impactx_ray.errors import UserError
    from impactx_ray.methods import METHODS
    from impactx_ray.sweep.options import options_from
    from impactx_ray.sweep.spaces import COMPARABLE_METHODS

    assert all(METHODS[m].title == title for m, title in COMPARABLE_METHODS.items())
    cell = cells(("lenet5",), ("digits",))
    assert plan(cell, smoke=True, comparison=("abn", "wae", "impactx_single"))[0] == (
        "1 cells; per cell: 2 stage-1 + 2 stage-2 + 3 comparison (ABN, WAE, IMPACTX single-stage)"
        " trials = 7")
    default = options_from(tmp_path, cell)
    assert "comparison" not in default.settings() and "replacements" not in default.settings()
    asked = options_from(tmp_path, cell, comparison=("abn", "impactx_single", "abn"),
                         replacements=("road", "noise"))
    assert asked.comparison == ("abn", "impactx_single")
    assert asked.settings()["comparison"] == ["abn", "impactx_single"]
    assert asked.settings()["replacements"] == ["road", "noise"]
    for kw, message in (({"comparison": ("abn", "impactx")}, "--comparison: unknown 'impactx'"),
                        ({"replacements": ("zeros",)}, "--replacement: unknown 'zeros'"),
                        ({"replacements": ()}, "--replacement needs at least one")):
        with pytest.raises(UserError, match=re.escape(message)):
            options_from(tmp_path, cell, **kw)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--smoke", "--comparison",
                           "abn", "wae", "impactx_single"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "comparison: grid, 3 trials × 3 epochs = at most 9 trial-epochs" in proc.stdout


def test_dry_run_rejects_unknown_names():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--models", "resnet_nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "full_grid.py: error: unknown backbone 'resnet_nope'; use one of efficientnet_b2, "
        "lenet5, mobilenet, mobilenet_v2 or a timm model name (see timm.list_models())"]


def test_bad_sweep_arguments_are_one_line_errors():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--epochs", "0", "--out",
                           "/nonexistent/never"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "full_grid.py: error: --epochs must be an integer >= 1, got 0"]


def test_relative_out_in_a_ray_job_is_refused(tmp_path):
    """In a job, the working directory is Ray's temporary copy of --working-dir."""
    env = {**os.environ, "RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", "runs/sweep"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("full_grid.py: error: --out runs/sweep is relative, and this runs as "
                           "a Ray job") and str(tmp_path) in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("argv", "flag"), [
    (["--datasets", "cifar10"], "--data-root ./data"),
    (["--datasets", "cifar10", "--data-root", "data"], "--data-root data"),
    (["--datasets", "imagefolder:pets"], "--datasets imagefolder:pets")])
def test_relative_data_in_a_ray_job_is_refused(tmp_path, argv, flag):
    """Only the driver reads the data (trials get it through the object store), but in a job a
    relative path resolves in Ray's temporary copy of --working-dir; digits reads no path."""
    env = {**os.environ, "RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}
    run = [sys.executable, str(SCRIPT), "--smoke", "--dry-run", "--out", str(tmp_path / "s")]
    proc = subprocess.run(run + argv, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"full_grid.py: error: {flag} is relative, and this runs as a Ray job")
    ok = subprocess.run(run + ["--datasets", "cifar10", "--data-root", str(tmp_path / "data")],
                        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert "is relative" not in ok.stderr  # absolute: the dry run goes on (to say the data is missing)
    digits = subprocess.run(run, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert digits.returncode == 0, digits.stderr


def test_summary_files(tmp_path):
    rows = [{"model": "lenet5", "dataset": "digits", "baseline_test_accuracy": 0.95,
             "impactx_test_accuracy": 0.9583, "batch_size": 32, "lr": 0.0026,
             "val_fraction": 0.1, "lam": 1.0, "stage1_failed": 0, "stage2_failed": 1}]
    md, csv_path = write_summary(tmp_path, rows)
    assert ("| lenet5 | digits | 95.00 | 95.83 | – | – | – | – | – | – | – | – | 32 | 0.0026 "
            "| 0.1 | 1.0 |") \
        in md.read_text()
    assert list(csv.DictReader(open(csv_path)))[0]["impactx_test_accuracy"] == "0.9583"
    assert summary_markdown(rows) == md.read_text()


def _unprefixed(key: str | None) -> str | None:
    """A run key without its sweep's id (``1a2b3c4d/lenet5-digits/stage1`` -> ``lenet5-digits/stage1``)."""
    return re.sub(r"^[0-9a-f]{8}/", "", key) if key else key


# a trial run a resumed stage superseded (sweep/stage.py): no trial of the stage holds it
SUPERSEDED = ("exists (select 1 from tags s where s.run_uuid = {run} and s.key = 'impactx.superseded' "
              "and s.value = 'true')")


def trial_runs(db: Path, superseded: bool = False) -> list[tuple[str, str, str]]:
    """(impactx.key, status, parent key) of every trial run in an MLflow SQLite store, keys
    without the sweep's id: the stages' trials, or (``superseded``) the runs they superseded."""
    con = sqlite3.connect(db)
    rows = con.execute(
        "select t.value, r.status, (select p.value from tags p where p.run_uuid = "
        "(select q.value from tags q where q.run_uuid = r.run_uuid and "
        "q.key = 'mlflow.parentRunId') and p.key = 'impactx.key') "
        "from runs r join tags t on t.run_uuid = r.run_uuid where t.key = 'impactx.key' "
        f"and t.value like '%/stage%/%' and {'' if superseded else 'not '}"
        + SUPERSEDED.format(run="r.run_uuid")).fetchall()
    con.close()
    return [(_unprefixed(k), status, _unprefixed(parent)) for k, status, parent in rows]


def wait_for_trial_metrics(db: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            con = sqlite3.connect(db)
            n = con.execute("select count(*) from metrics m join tags t on m.run_uuid = "
                            "t.run_uuid where t.key = 'impactx.key' and t.value like "
                            "'%/stage1/%'").fetchone()[0]
            con.close()
            if n:
                return
        except sqlite3.Error:
            pass
        time.sleep(0.3)
    pytest.fail("the smoke sweep never reported a stage-1 epoch")


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


@pytest.mark.slow
def test_ray_job_submit_with_token_auth_logs_to_an_mlflow_server(submitted_sweep):
    """docs/sweeps.md's cluster path: a head with Ray's default token auth, the smoke sweep submitted
    as a job from the repository (``--working-dir .``), every run in a real MLflow server (the
    session's shared sweep, conftest.py)."""
    cluster, uri, out, job = (submitted_sweep.cluster, submitted_sweep.uri, submitted_sweep.out,
                              submitted_sweep.job)
    # auth is really on: a client without RAY_AUTH_MODE=token is turned away
    bare = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
    refused = cluster.ray("job", "list", "--address", cluster.dashboard, env=bare, timeout=120)
    assert refused.returncode != 0 and "Token authentication is enabled" in refused.stderr
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
    assert "succeeded" in job.stdout and (out / "summary.md").exists()
    assert not (out / "mlflow.db").exists()  # the server was used, not the embedded store

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name.startswith("impactx/")]
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    trial = next(r for r in runs if "/stage1/" in r.data.tags["impactx.key"])
    history = client.get_metric_history(trial.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2, 3]  # one point per epoch
    key = {r.info.run_id: _unprefixed(r.data.tags["impactx.key"]) for r in runs}
    parent = {key[r.info.run_id]: key.get(r.data.tags.get("mlflow.parentRunId")) for r in runs}
    trials = [r for r in runs if key[r.info.run_id].count("/") == 2]
    assert len(trials) == 7  # 2 stage-1, 2 stage-2, ABN, WAE and single-stage IMPACTX
    assert all(r.info.status == "FINISHED" and "best_val_accuracy" in r.data.metrics
               for r in trials)
    single = next(r for r in trials if r.data.tags["impactx.method"] == "impactx_single")
    assert single.data.params["refresh_every"] == "3" and "lam" in single.data.params
    cell = next(r for r in runs if key[r.info.run_id] == "lenet5-digits")
    # the comparison's measures with their CIs, and the sanity checks, on the cell's run
    for name in ("morf.noise.IMPACTX.srg", "morf.noise.SHAP_of_ABN.aopc_ci_low",
                 "sanity.IMPACTX.randomization_rank_correlation", "impactx_single_test_accuracy"):
        assert name in cell.data.metrics, name
    summary = (out / "summary.md").read_text()
    assert "MoRF, LeRF and SRG [95% CI over images]" in summary and "sanity checks" in summary
    # Every trial, map shard and the MoRF task ran on the GPU nodes (never the head, which has no
    # GPU): the trials' runs, the shards' sidecars and the MoRF task's record name their node.
    gpu_nodes = set(cluster.workers)
    nodes = {r.data.tags.get("impactx.node_id") for r in trials}
    assert nodes <= gpu_nodes, (nodes, gpu_nodes, cluster.head)
    (store,) = (out / "cells" / "lenet5-digits" / "maps").iterdir()
    sidecars = [json.loads(p.read_text()) for p in store.glob("shard-*.json")]
    assert sidecars and {s["made_by"]["node_id"] for s in sidecars} == gpu_nodes  # 2 workers, 1 each
    morf_node = json.loads((out / "cells" / "lenet5-digits" / "morf" / "made_by.json").read_text())
    assert morf_node["node_id"] in gpu_nodes
    for r in trials:  # trial → stage → cell → sweep
        stage = parent[key[r.info.run_id]]
        assert stage == key[r.info.run_id].rsplit("/", 1)[0]
        assert parent[stage] == "lenet5-digits" and parent["lenet5-digits"] == "sweep"


@pytest.mark.slow
def test_a_trial_holding_a_gpu_torch_cannot_use_stops_the_sweep_in_one_line(submitted_sweep):
    """--device auto on the shared cluster's GPU nodes, whose GPUs this CPU-only machine's torch
    cannot use: no silent CPU run. Every trial stops with the line naming its node, the torch
    build and the driver it needs, and the sweep exits 2 with that line."""
    cluster, out = submitted_sweep.cluster, submitted_sweep.root / "auto-device"
    job = cluster.ray("job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
                      "--", "python", "sweeps/full_grid.py", *FAST_SMOKE, "--epochs", "1",
                      "--morf-images", "0", "--gpus-per-trial", "1", "--device", "auto",
                      "--out", str(out), timeout=600)
    assert job.returncode != 0, job.stdout[-3000:]
    # (the job's log is printed, then repeated in its failure status)
    (line,) = {s for s in job.stdout.splitlines() if s.startswith("full_grid.py: error: ")}
    assert re.fullmatch(r"full_grid\.py: error: trial \w+ \(baseline\) on node \S+ \(\w{12}\) "
                        r"holds Ray GPU \d, but torch cannot use it: torch \S+ (is a CPU-only "
                        r"build|built for CUDA [\d.]+ \(needs an NVIDIA driver for CUDA [\d.]+\)"
                        r": .+); install the torch build for this node's driver, or pass "
                        r"--device cpu", line), line
    assert line.split("on node ")[1].split()[1].strip("()") in {n[:12] for n in cluster.workers}


@pytest.mark.slow
def test_a_stage_whose_trials_all_fail_stops_its_cell_not_the_sweep(tmp_path):
    """NaN losses (stage-2 lr 1e30): every stage-2 trial FAILED in Tune and MLflow, the cell
    stops with one line, the summary is written, and the exit status says trials failed."""
    out = tmp_path / "nan"
    cmd = [sys.executable, str(SCRIPT), *FAST_SMOKE, "--morf-images", "0", "--stage2-lr", "1e30",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "lenet5-digits: stopped: none of its 2 trials finished (first error:" in proc.stdout
    assert "FloatingPointError" in proc.stdout or "loss became" in proc.stdout
    assert "2 trials failed; see the FAILED runs in MLflow" in proc.stderr
    runs = trial_runs(out / "mlflow.db")
    assert sorted(status for key, status, _ in runs if "/stage2/" in key) == ["FAILED", "FAILED"]
    assert all(status == "FINISHED" for key, status, _ in runs if "/stage1/" in key)
    assert "| lenet5 | digits | – |" in (out / "summary.md").read_text()


def test_progress_line():
    from impactx_ray.sweep.progress import progress_line

    line = progress_line("lenet5-cifar10/stage1", ["TERMINATED"] * 10 + ["ERROR"] * 2
                         + ["RUNNING"] * 2 + ["PENDING"] * 166, 0.6421, 720.0, 180)
    # 12 of 180 finished in 12 min: 168 more take 168 min
    assert line == ("lenet5-cifar10/stage1: 10/180 done, 2 running, 2 failed; best val acc "
                    "0.6421; 0:12:00 elapsed, ETA 2:48:00")
    assert progress_line("s", ["PENDING"], None, 3.0, 1) == \
        "s: 0/1 done, 0 running, 0 failed; no result yet; 0:00:03 elapsed"


@pytest.mark.slow
def test_a_killed_trial_continues_from_its_last_epoch(tmp_path):
    """SIGKILL a stage-1 trial's worker after its second epoch: Tune retries it
    (--max-failures 1) from its last checkpoint, so no epoch is trained (or logged) twice.
    The sweep is stopped once stage 1 is done: the rest is not what this test is about."""
    out, epochs = tmp_path / "retry", 8
    cmd = [sys.executable, str(SCRIPT), *FAST_SMOKE, "--epochs", str(epochs), "--morf-images",
           "0", "--max-failures", "1", "--out", str(out)]
    sweep = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    query = ("select t.value, group_concat(m.step) from metrics m join tags t on m.run_uuid = "
             "t.run_uuid where t.key = 'impactx.key' and t.value like '%/stage1/%' and "
             "m.key = 'val_accuracy' group by t.value")
    killed, per_trial = None, []
    try:
        deadline = time.time() + 400
        while time.time() < deadline and sweep.poll() is None:
            time.sleep(0.2)
            try:
                con = sqlite3.connect(out / "mlflow.db")
                per_trial = con.execute(query).fetchall()
                con.close()
            except sqlite3.Error:
                continue
            steps = [[int(s) for s in row[1].split(",")] for row in per_trial]
            if killed is None and any(2 <= max(s) < epochs - 2 for s in steps):
                workers = [pid for pid in session_pids(sweep.pid)  # the sweep's own processes
                           if "ImplicitFunc" in Path(f"/proc/{pid}/cmdline").read_bytes()
                           .decode(errors="replace")]
                if workers:
                    os.kill(workers[0], signal.SIGKILL)
                    killed = workers[0]
            if killed and len(steps) == 2 and all(max(s) == epochs for s in steps):
                break  # stage 1 is done, retried trial included
    finally:
        os.killpg(sweep.pid, signal.SIGKILL)  # the driver and the local Ray it started
        output = sweep.communicate()[0]
    assert killed is not None, "no trial worker was found to kill: " + output[-3000:]
    assert len(per_trial) == 2, output[-3000:]
    for key, steps in per_trial:  # every epoch once: the retried trial did not start over
        assert sorted(int(s) for s in steps.split(",")) == list(range(1, epochs + 1)), key
