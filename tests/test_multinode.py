"""The map step on simulated multi-node clusters, as on a user's GPU cluster: a worker node lost
while the maps are computed (``ray.cluster_utils.Cluster``), and GPU nodes launched from zero by
Ray's autoscaler (its fake multi-node provider). Each cluster runs in a process session of its
own, on its own ports and temp dir, with token auth on (tests/cluster.py)."""

import json
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_actors import SETTINGS, N, build_model, close, new_store

from cluster import LocalCluster, MultiNodeCluster

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
SHARD_SIZE = 2  # 12 shards of N = 24 maps: many still to do when a node goes
ROOT = TESTS.parent

# The driver: maps of the first N digits on two map workers of one (declared) GPU each, run on
# their CPUs; each forward in a worker takes 0.2 s, so that the maps outlast a node's removal.
# Every written shard is appended to SHARDS, so that the test knows when to remove a node.
DRIVER = """
import os, sys, time
from functools import partial
from pathlib import Path
sys.path.insert(0, {tests!r})
import ray
ray.init(runtime_env={{"env_vars": {{"PYTHONPATH": {tests!r}}}}}, logging_level="ERROR",
         log_to_driver=False)
from impactx_ray.explain.actors import compute_store_ray
from test_actors import N, SETTINGS, Slow, new_store
from impactx_ray.data import load_dataset
import torch
train, _ = load_dataset("digits")
images, labels = train.float_images(torch.arange(N)), train.labels[:N]
store = new_store(Path({store!r}), images, labels, shard_size={shard_size})
shards = Path({shards!r})
def written(i):
    with shards.open("a") as f:
        f.write(f"{{i}}\\n")
compute_store_ray(store, partial(Slow, os.getpid()), images, labels, SETTINGS, workers=2,
                  gpus_per_worker=1.0, device="cpu", progress=False, on_shard=written,
                  restart_timeout_s=10.0, log=lambda line: print(line, flush=True))
print("maps done", flush=True)
"""


def driver(store: Path, shards: Path) -> str:
    return DRIVER.format(tests=str(TESTS), store=str(store), shards=str(shards),
                         shard_size=SHARD_SIZE)


def shard_sidecars(store: Path) -> list[Path]:
    return sorted(store.glob("shard-*.json"))


def digits_inputs():
    import torch

    from impactx_ray.data import load_dataset

    train, _ = load_dataset("digits")
    return train.float_images(torch.arange(N)), train.labels[:N]


def test_maps_survive_a_lost_gpu_node(tmp_path):
    """Remove one of the two GPU worker nodes after the first map shard is written: its worker
    cannot restart (the other GPU is taken), so after the restart timeout its shards go to the
    other worker, and the maps equal one process's."""
    from impactx_ray.explain import compute_store

    store_path, shards = tmp_path / "maps", tmp_path / "shards.txt"
    start = time.monotonic()
    with MultiNodeCluster(tmp_path / "cluster", [{"num_cpus": 1, "num_gpus": 1}] * 2) as cluster:
        env = {**cluster.env, "RAY_ADDRESS": cluster.address}
        proc = subprocess.Popen([sys.executable, "-c", driver(store_path, shards)], env=env,
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        deadline = time.monotonic() + 300
        while not (shards.exists() and shards.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.2)
        before = len(shards.read_text().split())
        lost = cluster.workers[1]
        cluster.remove(1)
        output = proc.communicate(timeout=600)[0]
    wall = time.monotonic() - start
    assert proc.returncode == 0 and "maps done" in output, output[-4000:]
    assert before < len(shard_sidecars(store_path)), "the maps were done before the node was removed"
    # The lost node's worker cannot come back (the other GPU is taken): Ray fails its shards in
    # flight as unavailable, or holds them while it tries to restart it (then the restart
    # timeout gives them up); either way every shard after the removal is the survivor's.
    assert re.search(r"map worker #\d (unavailable for shard|has been RESTARTING)", output), \
        output[-4000:]
    inputs = digits_inputs()
    reference = new_store(tmp_path / "reference", *inputs)
    compute_store(reference, build_model(), *inputs, SETTINGS, progress=False)
    close(new_store(store_path, *inputs, SHARD_SIZE).load(), reference.load(), inputs)
    made_by = {p.name: json.loads(p.read_text())["made_by"]["node_id"]
               for p in shard_sidecars(store_path)}
    assert set(made_by.values()) <= set(cluster.workers), made_by
    order = [int(i) for i in shards.read_text().split()]  # as the driver wrote them
    after = {made_by[f"shard-{i:05d}.json"] for i in order[before + 2:]}  # 2 may be in flight
    assert after == set(cluster.workers) - {lost}, (after, lost)
    print(f"lost-node maps: {wall:.0f} s")  # the closing note's wall time, with -s


GPU_NODE_IDS = ("import ray, json; ray.init(logging_level='ERROR', log_to_driver=False); "
                "print('gpu nodes:', json.dumps([[n['NodeID'], n['Alive']] for n in ray.nodes() "
                "if n['Resources'].get('GPU')]))")


def gpu_nodes(env: dict) -> list[tuple[str, bool]]:
    """(node id, alive) of every GPU node the cluster has had, dead ones included."""
    proc = subprocess.run([sys.executable, "-c", GPU_NODE_IDS], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("gpu nodes: ")]
    return [tuple(n) for n in json.loads(line.removeprefix("gpu nodes: "))]


def trial_nodes(db: Path) -> dict[str, str]:
    """impactx.key -> impactx.node_id of every trial run in an MLflow SQLite store."""
    con = sqlite3.connect(db)
    rows = con.execute(
        "select k.value, n.value from tags k join tags n on k.run_uuid = n.run_uuid where "
        "k.key = 'impactx.key' and n.key = 'impactx.node_id'")  # only trials have a node
    found = dict(rows.fetchall())
    con.close()
    return found


def test_the_autoscaler_launches_gpu_nodes_for_the_map_workers_and_the_trials(tmp_path):
    """A head with no GPU and a GPU node type resting at zero (at most two nodes). The map step
    asks the autoscaler for two GPU map workers, says what it waits for, and the maps are made
    on the two nodes it launched. Once those have idled out, a sweep has GPU nodes launched again
    from zero, and every trial (2 + 2 + ABN) runs on one of them."""
    store_path, shards = tmp_path / "maps", tmp_path / "shards.txt"
    gpu = {"gpu": {"resources": {"CPU": 1, "GPU": 1}, "min_workers": 0, "max_workers": 2}}
    out = tmp_path / "sweep"
    start = time.monotonic()
    with LocalCluster(tmp_path / "cluster", num_cpus=1, autoscaling=gpu) as cluster:
        env = {**cluster.env, "RAY_ADDRESS": f"127.0.0.1:{cluster.ports['--port']}"}
        assert gpu_nodes(env) == []
        maps = subprocess.run([sys.executable, "-c", driver(store_path, shards)], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        maps_wall = time.monotonic() - start
        for_maps = gpu_nodes(env)
        deadline = time.monotonic() + 180  # idle nodes go after idle_timeout_minutes (15 s)
        while any(alive for _, alive in gpu_nodes(env)):
            assert time.monotonic() < deadline, "the idle GPU nodes were not terminated"
            time.sleep(2)
        # The driver attaches through RAY_ADDRESS (not `ray job submit --working-dir`: the fake
        # provider's nodes share the head's temp dir, where each node's runtime-env agent would
        # delete the job's working-dir copy once it no longer needs it).
        job = subprocess.run(
            [sys.executable, "sweeps/full_grid.py", "--smoke", "--max-evals", "32", "--epochs",
             "1", "--comparison", "abn", "--morf-images", "0", "--gpus-per-trial", "1",
             "--map-workers", "1", "--device", "cpu", "--out", str(out)],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
        for_sweep = [n for n, _ in gpu_nodes(env) if n not in dict(for_maps)]
    wall = time.monotonic() - start
    output = maps.stdout + maps.stderr
    assert maps.returncode == 0 and "maps done" in output, output[-4000:]
    assert ("map workers: 0 of 2 (CPU 1, GPU 1 each) fit on the nodes up now; asked the "
            "autoscaler for the rest") in output, output[-4000:]
    assert "waiting for 2 GPU map workers: 0 placed, autoscaler asked 0 min ago" in output
    assert len(for_maps) == 2, for_maps  # max_workers: 2, both launched for the two workers
    made_by = {json.loads(p.read_text())["made_by"]["node_id"] for p in shard_sidecars(store_path)}
    assert made_by == {n for n, _ in for_maps}, (made_by, for_maps)

    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
    assert for_sweep, "the sweep's trials launched no GPU node"
    ran_on = trial_nodes(out / "mlflow.db")
    assert len(ran_on) == 5 and set(ran_on.values()) <= set(for_sweep), (ran_on, for_sweep)
    print(f"autoscaler: maps {maps_wall:.0f} s on {len(for_maps)} launched GPU nodes; all "
          f"{wall:.0f} s, the sweep's trials on {len(for_sweep)} nodes launched from zero")
