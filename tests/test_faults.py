"""Faults of the parts around the method, as a shared cluster's users meet them: the tracking
server going away mid-sweep (issue 23). Each test makes its own sweep, cluster or server: it
changes them."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import MlflowServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "sweeps" / "full_grid.py"
EPOCHS = 4


def journal_records(out: Path) -> list[dict]:
    path = out / "tracking" / "journal.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def test_an_mlflow_outage_during_stage_1_loses_no_record(tmp_path):
    """The MLflow server is stopped once stage 1 has logged its first epoch, for longer than the
    client's retries, and started again: the sweep trains on, keeps what it would have logged in
    its journal, logs it when the server answers, and exits 0; MLflow holds every trial once,
    FINISHED, with every epoch's metrics once."""
    from mlflow import MlflowClient

    out = tmp_path / "sweep"
    server = MlflowServer(tmp_path / "mlflow")
    with server as uri:
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "IMPACTX_TRACKING_RETRY_S": "2"}
        env.pop("RAY_ADDRESS", None)
        start = time.monotonic()
        sweep = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--smoke", "--max-evals", "32", "--epochs", str(EPOCHS),
             "--comparison", "abn", "--morf-images", "0", "--out", str(out)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 600
        while not any(r["op"] == "metrics" and "/stage1/" in r["key"]
                      for r in journal_records(out)):
            assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()[0]
            time.sleep(0.5)
        down_at = time.monotonic()
        server.pause()
        time.sleep(12)  # MLflow's client gives up on a call after ~3 s with the sweep's settings
        during = len(journal_records(out))
        server.resume()
        down_for = time.monotonic() - down_at
        output = sweep.communicate(timeout=900)[0]
        wall = time.monotonic() - start
        client = MlflowClient(uri)
        (experiment,) = [e for e in client.search_experiments() if e.name.startswith("impactx/")]
        runs = client.search_runs([experiment.experiment_id], max_results=200)
        trials = [r for r in runs if r.data.tags["impactx.key"].count("/") == 3]
        epochs = {r.data.tags["impactx.key"]: sorted(
            m.step for m in client.get_metric_history(r.info.run_id, "val_accuracy"))
            for r in trials}
    assert sweep.returncode == 0, output[-4000:]
    assert "does not answer" in output and "answers again" in output, output[-4000:]
    assert during > 0
    keys = [r.data.tags["impactx.key"] for r in runs]
    assert len(keys) == len(set(keys)), "a run was logged twice"
    assert len(trials) == 5 and all(r.info.status == "FINISHED" for r in trials), \
        [(r.data.tags["impactx.key"], r.info.status) for r in trials]
    assert all(steps == list(range(1, EPOCHS + 1)) for steps in epochs.values()), epochs
    pending = (out / "tracking" / "applied").read_text().strip()
    assert int(pending) == len(journal_records(out))  # every record applied
    print(f"mlflow outage: down {down_for:.0f} s during stage 1; sweep {wall:.0f} s")



RUN = ["run", "--model", "lenet5", "--dataset", "digits", "--epochs", "1", "--stage2-epochs", "1",
       "--max-evals", "32", "--quiet"]


def test_a_full_disk_during_the_maps_stops_in_one_line_and_the_rerun_resumes(tmp_path):
    """``--out`` on a 6 MiB tmpfs (a private mount namespace: ``unshare -m``): stage 1 fits, the
    18 MiB of maps do not. The run stops with one line naming the directory and the space, exit
    status 2; once the tmpfs is grown (space freed), the same command resumes, and its maps equal
    an uninterrupted run's."""
    from impactx_ray.explain import load_maps

    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs in a private mount namespace is refused here (unshare -m "
                    "needs root or user namespaces): the full-disk test needs a real full disk")
    impactx = str(Path(sys.executable).parent / "impactx")
    mnt, kept = tmp_path / "mnt", tmp_path / "kept"
    mnt.mkdir()
    cmd = " ".join([impactx, *RUN, "--out", f"{mnt}/run"])
    script = (f"mount -t tmpfs -o size=6m tmpfs {mnt} || exit 90\n"
              f"{cmd}; echo \"first exit $?\"\n"
              f"mount -o remount,size=64m {mnt}\n"  # the space comes back
              f"{cmd}; echo \"second exit $?\"\n"
              f"cp -r {mnt}/run {kept}\n")
    start = time.monotonic()
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    wall = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode != 90, "the tmpfs could not be mounted: " + output[-2000:]
    assert "first exit 2" in output and "second exit 0" in output, output[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("impactx: error:")]
    assert len(errors) == 1 and f"no space left on the device of {mnt}/run" in errors[0], errors
    assert re.search(r"\(the \d+ map shards still to write: [\d.]+ MiB needed, [\d.]+ MiB free\)",
                     errors[0]), errors
    assert "Traceback" not in output, output[-4000:]
    reference = tmp_path / "reference"
    subprocess.run([impactx, *RUN, "--out", str(reference)], cwd=ROOT, check=True,
                   capture_output=True, timeout=900)
    import numpy as np

    assert np.array_equal(load_maps(kept), load_maps(reference))  # same checkpoint, same maps
    print(f"full disk: {wall:.0f} s (fail, free, resume); {errors[0]}")


def test_a_node_lost_mid_trial_retries_the_trial_from_its_checkpoint(tmp_path):
    """A simulated two-GPU-node cluster; the node running a stage-1 trial is removed after the
    trial's second epoch. With --max-failures 1 the trial is retried on the other node from its
    last checkpoint (the cell's data comes again from the driver's object store): the sweep ends
    with exit 0 and the trial's epochs each logged once."""
    import sqlite3

    from cluster import MultiNodeCluster

    out, epochs = tmp_path / "sweep", 8
    start = time.monotonic()
    with MultiNodeCluster(tmp_path / "cluster", [{"num_cpus": 1, "num_gpus": 1}] * 2) as cluster:
        env = {**cluster.env, "RAY_ADDRESS": cluster.address}
        sweep = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--smoke", "--max-evals", "32", "--epochs", str(epochs),
             "--comparison", "abn", "--morf-images", "0", "--gpus-per-trial", "1",
             "--map-workers", "1", "--device", "cpu", "--max-failures", "1", "--out", str(out)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline, lost = time.monotonic() + 600, None
        while lost is None:
            assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()[0]
            records = journal_records(out)
            node = {r["key"]: r["tags"]["impactx.node_id"] for r in records
                    if r["op"] == "tags" and "impactx.node_id" in r["tags"]}
            for r in records:
                if r["op"] == "metrics" and "/stage1/" in r["key"] and r["step"] >= 2 \
                        and r["key"] in node:
                    lost, trial = node[r["key"]], r["key"]
                    break
            time.sleep(0.2)
        cluster.remove(cluster.workers.index(lost))
        output = sweep.communicate(timeout=900)[0]
        survivor = next(n for n in cluster.workers if n != lost)
    wall = time.monotonic() - start
    assert sweep.returncode == 0, output[-4000:]
    con = sqlite3.connect(out / "mlflow.db")
    (run,) = [(r,) for r, key in con.execute("select run_uuid, value from tags where key = "
                                             "'impactx.key'") if key.endswith("/" + trial)]
    steps = [s for (s,) in con.execute("select step from metrics where run_uuid = ? and key = "
                                       "'val_accuracy' order by step", run)]
    tags = dict(con.execute("select key, value from tags where run_uuid = ?", run).fetchall())
    status = con.execute("select status from runs where run_uuid = ?", run).fetchone()[0]
    con.close()
    assert steps == list(range(1, epochs + 1)), steps  # from its checkpoint: no epoch twice
    assert tags["impactx.node_id"] == survivor and status == "FINISHED", (tags, status)
    print(f"lost node mid-trial: {wall:.0f} s")


def test_a_head_restarted_mid_sweep_and_the_job_resubmitted_resumes_without_duplicates(tmp_path):
    """The sweep is submitted as a Ray job; its head is stopped once stage 2 has started (the job
    and its driver die with it), a new head is started and the same `ray job submit` repeated:
    the sweep resumes from --out (finished Tune stages restored, the map store complete) and
    MLflow holds each run once, every trial FINISHED."""
    import sqlite3

    from cluster import LocalCluster

    out = tmp_path / "sweep"
    submit = ["job", "submit", "--working-dir", ".", "--", "python", "sweeps/full_grid.py",
              "--smoke", "--max-evals", "32", "--epochs", "3", "--comparison", "abn",
              "--morf-images", "0", "--out", str(out)]
    start = time.monotonic()
    with LocalCluster(tmp_path / "head1") as head:
        first = subprocess.Popen([str(Path(sys.executable).parent / "ray"), submit[0], submit[1],
                                  "--address", head.dashboard, *submit[2:]], cwd=ROOT,
                                 env=head.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
        deadline = time.monotonic() + 600
        while not any("/stage2/" in r["key"] for r in journal_records(out)):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
            time.sleep(0.5)
    first.communicate(timeout=120)  # the head is gone: the client ends too
    with LocalCluster(tmp_path / "head2") as head:
        again = head.ray(submit[0], submit[1], "--address", head.dashboard, *submit[2:],
                         timeout=900)
    wall = time.monotonic() - start
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    assert "lenet5-digits/stage1: resuming the Tune experiment" in again.stdout, again.stdout[-3000:]
    con = sqlite3.connect(out / "mlflow.db")
    keys = [k for (k,) in con.execute("select value from tags where key = 'impactx.key'")]
    statuses = dict(con.execute("select t.value, r.status from runs r join tags t on "
                                "t.run_uuid = r.run_uuid where t.key = 'impactx.key'").fetchall())
    con.close()
    assert len(keys) == len(set(keys)), sorted(keys)  # no run twice
    trials = [k for k in keys if k.count("/") == 3]
    assert len(trials) == 5 and all(statuses[k] == "FINISHED" for k in trials), statuses
    print(f"head restart: {wall:.0f} s")
