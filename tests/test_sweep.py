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
from sweep_runs import trial_runs, unprefixed

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
    key = {r.info.run_id: unprefixed(r.data.tags["impactx.key"]) for r in runs}
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
