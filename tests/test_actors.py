"""SHAP maps over Ray actors: same maps as one process, survives a killed worker, resumes."""

import json
import os
import signal
import time
from functools import partial
from pathlib import Path

import pytest
import ray
import torch

from impactx_ray.errors import UserError
from impactx_ray.explain import ExplainSettings, MapStore, compute_store, fully_masked, load_maps

from tolerances import assert_maps_close, logit_scale
from toys import TinyNet

pytestmark = pytest.mark.slow

N, SHARD = 24, 4
SETTINGS = ExplainSettings(max_evals=60, masker="blur(8,8)", batch_size=20, seed=0)


def build_model(pid_dir: str | None = None, driver_pid: int | None = None) -> torch.nn.Module:
    """A fixed small CNN whose maps stand well above its logits' rounding (an untrained LeNet-5's
    do not); in a worker process it leaves a pid file so a test can kill it."""
    model = TinyNet(3, 10, seed=0, gain=20).eval()
    if pid_dir is not None and os.getpid() != driver_pid:
        Path(pid_dir, f"{os.getpid()}.pid").touch()
    return model


@pytest.fixture(scope="module")
def ray_local():
    # Workers unpickle this module's build_model by reference: let them import it.
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=2, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(digits):
    train, _ = digits
    return train.float_images(torch.arange(N)), train.labels[:N]


def new_store(path, images, labels, shard_size=SHARD):
    meta = SETTINGS.store_meta("c" * 64, "d" * 64, (32, 32))
    return MapStore.create_or_open(path, meta=meta, num_maps=N, map_shape=(32, 32, 3),
                                   shard_size=shard_size)


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """Maps computed by one plain process."""
    images, labels = inputs
    store = new_store(tmp_path_factory.mktemp("ref") / "maps", images, labels)
    compute_store(store, build_model(), images, labels, SETTINGS, progress=False)
    return store.load()


def close(maps, reference, inputs):
    """Equal up to the rounding of the model's logits under a worker's thread count."""
    x = inputs[0]
    assert_maps_close(maps, reference, logit_scale(build_model(), x, fully_masked(x, SETTINGS.masker)))


def run_ray(store, inputs, workers=2, **kw):
    from impactx_ray.explain.actors import compute_store_ray

    images, labels = inputs
    return compute_store_ray(store, kw.pop("build", build_model), images, labels, SETTINGS,
                             workers=workers, progress=False, **kw)


def test_two_workers_equal_one_process_despite_a_killed_worker(ray_local, inputs, reference,
                                                               tmp_path):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    build = partial(build_model, str(pid_dir), os.getpid())
    killed = []

    def kill_one_worker(shard):
        if not killed:  # after the first finished shard, SIGKILL a worker process mid-run
            pid = int(sorted(pid_dir.glob("*.pid"))[0].stem)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            # Hold the driver until Ray has restarted the actor (its __init__ leaves a new pid):
            # otherwise the other worker may finish every shard first and the pool closes the
            # restart unseen (it did, once the engine got faster)
            deadline = time.monotonic() + 120
            while len(list(pid_dir.glob("*.pid"))) < 3 and time.monotonic() < deadline:
                time.sleep(0.2)

    store = new_store(tmp_path / "maps", *inputs)
    run_ray(store, inputs, build=build, on_shard=kill_one_worker)
    assert killed, "the test never killed a worker"
    assert len(list(pid_dir.glob("*.pid"))) >= 3, "the killed worker was not replaced"
    assert store.is_complete()
    maps = load_maps(store.path)
    assert maps.shape == (N, 32, 32, 3)
    close(maps, reference, inputs)
    # each shard's sidecar says where it was made: this node, a worker process (not the driver)
    made_by = [store.shard_info(i)["made_by"] for i in range(store.num_shards)]
    assert {m["node_id"] for m in made_by} == {ray_local.get_runtime_context().get_node_id()}
    assert {m["pid"] for m in made_by} <= {int(p.stem) for p in pid_dir.glob("*.pid")}


def test_interrupted_run_resumes_without_recomputing(ray_local, inputs, reference, tmp_path):
    store = new_store(tmp_path / "maps", *inputs)
    first = []

    def interrupt_after_two(shard):
        first.append(shard)
        if len(first) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_ray(store, inputs, on_shard=interrupt_after_two)
    done = sorted(set(range(store.num_shards)) - set(store.missing_shards()))
    assert done == sorted(first) and 0 < len(done) < store.num_shards
    stamps = {i: (store.path / f"shard-{i:05d}.npy").stat().st_mtime_ns for i in done}

    second = []
    run_ray(store, inputs, on_shard=second.append)
    assert sorted(second) == sorted(set(range(store.num_shards)) - set(done))
    assert {i: (store.path / f"shard-{i:05d}.npy").stat().st_mtime_ns for i in done} == stamps
    close(store.load(), reference, inputs)


def test_truncated_shard_is_detected_and_recomputed(ray_local, inputs, reference, tmp_path):
    store = new_store(tmp_path / "maps", *inputs)
    run_ray(store, inputs)
    shard = store.path / "shard-00003.npy"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(UserError, match="3"):
        load_maps(store.path)
    redone = []
    run_ray(store, inputs, on_shard=redone.append)
    assert redone == [3]
    close(load_maps(store.path), reference, inputs)


def test_bad_worker_count(inputs, tmp_path):
    store = new_store(tmp_path / "maps", *inputs)
    with pytest.raises(UserError, match="--workers"):
        run_ray(store, inputs, workers=0)


# -- workers the cluster cannot place, stalls, transient errors (issue 13) -------------------------
def test_more_workers_than_the_cluster_can_place_are_clamped(ray_local, inputs, reference,
                                                             tmp_path):
    said = []
    store = new_store(tmp_path / "maps", *inputs)
    run_ray(store, inputs, workers=4, log=said.append)  # a 2-CPU cluster: 2 workers fit
    assert said == ["--workers 4: the Ray cluster (CPU 2) holds 2 map workers of CPU 1 each and "
                    "has no autoscaler; using 2"], said
    close(store.load(), reference, inputs)


def test_a_worker_that_cannot_be_placed_is_refused(ray_local, inputs, tmp_path):
    store = new_store(tmp_path / "maps", *inputs)
    with pytest.raises(UserError, match=r"^--workers: the Ray cluster \(CPU 2\) cannot place one of "
                       r"the map workers \(CPU 1, GPU 1 each\), and has no autoscaler"):
        run_ray(store, inputs, gpus_per_worker=1.0)
    assert store.missing_shards() == list(range(store.num_shards))


def test_a_worker_waiting_for_resources_gets_no_shard_and_the_watchdog_says_so(
        ray_local, inputs, reference, tmp_path):
    @ray.remote(num_cpus=1)
    class Hog:  # holds one of the two CPUs for the whole test
        def ping(self):
            return True

    hog = Hog.remote()
    ray.get(hog.ping.remote())
    said = []
    try:
        store = new_store(tmp_path / "maps", *inputs)
        run_ray(store, inputs, workers=2, log=said.append, watchdog_s=0.5,
                build=partial(Slow, os.getpid()))
    finally:
        ray.kill(hog)
    close(store.load(), reference, inputs)
    # Once one worker runs, the report names its shards and the worker still waiting.
    stalls = [s for s in said if "no shard finished" in s and "running: shard" in s]
    assert stalls, said
    assert ("1 worker not started yet: loading the model, or waiting for CPU 1 each (the "
            "cluster has no CPU or GPU free of CPU 2)") in stalls[-1], stalls


class Slow(torch.nn.Module):
    """build_model's net, taking 0.2 s per forward in a worker, so shards outlast the watchdog."""

    def __init__(self, driver_pid: int) -> None:
        super().__init__()
        self.model, self.in_worker = build_model(), os.getpid() != driver_pid

    def forward(self, x):
        if self.in_worker:
            import time

            time.sleep(0.2)
        return self.model(x)


class Flaky(torch.nn.Module):
    """build_model's net, whose first forward after ``flag`` appears raises Ray's transient error."""

    def __init__(self, flag: str) -> None:
        super().__init__()
        self.model, self.flag = build_model(), Path(flag)

    def forward(self, x):
        if self.flag.exists():
            from ray.exceptions import ActorUnavailableError

            self.flag.unlink()
            raise ActorUnavailableError("simulated network blip", None)
        return self.model(x)


def test_a_transient_actor_error_retries_the_shard_on_the_same_worker(ray_local, inputs,
                                                                      reference, tmp_path):
    from impactx_ray.explain.actors import MapPool

    images, labels = inputs
    flag = tmp_path / "flaky"
    said = []
    store = new_store(tmp_path / "maps", *inputs)
    with MapPool(partial(Flaky, str(flag)), images, labels, SETTINGS, workers=1,
                 log=said.append) as pool:
        pool.wait_ready()
        flag.touch()  # the worker's next forward fails once
        pool.compute(store, progress=False)  # one worker: dropping it would end the run
    assert not flag.exists()
    assert any("unavailable for shard" in s and "retrying" in s for s in said), said
    close(store.load(), reference, inputs)


class HangsWhenTold(torch.nn.Module):
    """build_model's net, whose forward blocks while ``<flag_dir>/hang-<its pid>`` exists: a shard
    held by a worker that never comes back."""

    def __init__(self, flag_dir: str) -> None:
        super().__init__()
        self.model, self.flag_dir = build_model(), Path(flag_dir)

    def forward(self, x):
        while (self.flag_dir / f"hang-{os.getpid()}").exists():
            time.sleep(0.05)
        return self.model(x)


def test_a_worker_stuck_restarting_has_its_shards_requeued(ray_local, inputs, reference,
                                                           tmp_path, monkeypatch):
    """Worker #1 holds its shards and Ray reports it RESTARTING (as when its node is gone and no
    node is free for it): after restart_timeout_s its shards go to worker #2, it is killed, and
    the maps are whole and right."""
    from impactx_ray.explain import dispatch
    from impactx_ray.explain.actors import MapPool

    images, labels = inputs
    said = []
    store = new_store(tmp_path / "maps", *inputs)
    monkeypatch.setattr(MapPool, "POLL_S", 0.2)
    with MapPool(partial(HangsWhenTold, str(tmp_path)), images, labels, SETTINGS, workers=2,
                 log=said.append, restart_timeout_s=1.0) as pool:
        stuck, alive = pool.wait_ready()
        (tmp_path / f"hang-{stuck}").touch()
        monkeypatch.setattr(dispatch, "actor_state",
                            lambda a: "RESTARTING" if a is pool.actors[0] else "ALIVE")
        pool.compute(store, progress=False)
    lines = [s for s in said if s.startswith("map worker #1 has been RESTARTING for ")]
    assert len(lines) == 1 and lines[0].endswith("go to the other workers"), said
    made_by = {json.loads(p.read_text())["made_by"]["pid"] for p in (tmp_path / "maps").glob("shard-*.json")}
    assert made_by == {alive}, (made_by, stuck, alive)
    close(store.load(), reference, inputs)


@pytest.mark.parametrize("cpus", [1, 2])
def test_each_worker_keeps_to_the_cpus_ray_gave_it(ray_local, inputs, cpus):
    """torch (intra- and inter-op), inductor's compile workers, numba and OpenCV all use the
    worker's Ray CPUs, not every core of the node (docs/map-engine.md, "Threads")."""
    from impactx_ray.explain.actors import MapPool

    images, labels = inputs
    with MapPool(build_model, images, labels, SETTINGS, workers=2 // cpus, cpus_per_worker=cpus,
                 gpus_per_worker=0.0) as pool:
        used = ray.get([a.threads_used.remote() for a in pool.actors])
    assert used == [{"torch": cpus, "torch_interop": cpus, "inductor_compile": cpus, "numba": cpus,
                     "cv2": cpus}] * (2 // cpus)
