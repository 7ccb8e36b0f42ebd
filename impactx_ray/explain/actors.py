"""SHAP map generation over Ray actors: parallel, resumable, fault tolerant.

How the work flows:

* The driver puts the images (N×H×W×C) and labels in the object store once. Every actor gets
  them by reference, builds the model once (``build_model`` loads the checkpoint) and then
  computes whole shards on request: a task carries only ``(shard, start, stop)``.
* Each result comes back with its shard index and is written to the ``MapStore`` by the driver
  as soon as it arrives, so the driver never holds more than the shards in flight, and a killed
  run keeps every shard it finished (a rerun computes only the missing ones). The driver writes,
  so the store needs to be reachable from the driver only; on a cluster it may be shared storage.
* A worker process that dies is restarted by Ray (``max_restarts``) and its in-flight shard is
  retried (``max_task_retries``); a worker that is gone for good has its shard queued again for
  the others. ``ActorUnavailableError``, which Ray documents as transient, retries the shard on
  the same worker. Maps are deterministic per image (shap's tie-breaking RNG is seeded per
  image), so N workers give the same maps as one.
* The workers are a request (``capacity.make_room``): what the nodes up now cannot hold is asked
  of the cluster's autoscaler, and a line says what is still waited for; without an autoscaler
  they are clamped to what fits, with a message. Shards go only to workers that have started: a
  worker waiting for a node holds no work, so the run cannot hang on it. A worker stuck
  restarting (its node gone, no other node free for it) has its shards handed to the others
  after ``restart_timeout_s``. A watchdog line says, when no shard has finished for a while,
  which shards run where and what the others wait on.

Ray stays here: the model, explainer and store are plain PyTorch/NumPy.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import ray
import torch
from tqdm.auto import tqdm

from impactx_ray.capacity import Bundle, Room, gpus_by_default, make_room
from impactx_ray.devices import worker_device
from impactx_ray.errors import UserError, is_int
from impactx_ray.explain.compute import check_fits, check_settings
from impactx_ray.explain.dispatch import Dispatch
from impactx_ray.explain.settings import ExplainSettings
from impactx_ray.explain.shap_maps import TrueClassExplainer, check_images, labels_array, to_hwc
from impactx_ray.explain.store import MapStore
from impactx_ray.explain.threads import keep_to, threads_in_use
from impactx_ray.heap import keep_heap

ModelBuilder = Callable[[], torch.nn.Module]


def init_ray() -> None:
    """``ray.init()`` that attaches to the cluster in ``RAY_ADDRESS`` when set (a Ray job's driver
    has it), else starts a local Ray of its own: never a stranger's cluster that happens to run on
    this machine (which a bare ``ray.init()`` would join through /tmp/ray/ray_current_cluster)."""
    if not ray.is_initialized():
        address = None if os.environ.get("RAY_ADDRESS") else "local"
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)


def allotted_cores() -> int:
    """The CPUs Ray gave this worker, as a thread count (at least 1; 0.5 CPU is one thread)."""
    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def here() -> dict[str, Any]:
    """Where this Ray worker runs: its node id, host and pid (recorded beside what it made)."""
    import socket

    return {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "pid": os.getpid()}


def ray_device(requested: str, what: str) -> torch.device:
    """The torch device of ``what`` (a trial, a map worker, the MoRF task) running in a Ray
    worker: ``devices.worker_device`` with the GPUs Ray gave this worker, and its node named in
    the one-line error when it holds a GPU that torch cannot use."""
    where = here()
    return worker_device(requested, ray.get_gpu_ids(),
                         f"{what} on node {where['host']} ({where['node_id'][:12]})")


def default_gpus_per_worker(log: Callable[[str], None] | None = None) -> float:
    """One GPU per worker when the cluster has GPUs or its autoscaler may launch GPU nodes (the
    driver's machine may have none); ``log`` hears why, where that is not evident."""
    init_ray()
    gpus, why = gpus_by_default()
    if why and log is not None:
        log(f"map workers: {why}")
    return gpus


class MapWorker:
    """One Ray actor: a model loaded once and a reusable shap explainer; computes whole shards."""

    def __init__(self, build_model: ModelBuilder, explainer_kwargs: dict[str, Any],
                 threads: int | None = None, device: str = "auto") -> None:
        # parallelism comes from actors: each keeps to the CPUs Ray gave it (explain/threads.py)
        self.threads = keep_to(threads or allotted_cores())
        keep_heap()  # eager forwards reuse freed memory instead of page-faulting (impactx_ray/heap.py)
        # the GPU Ray gave this actor, or the device asked for; never a GPU it was not given
        self.model = build_model().to(ray_device(device, "a SHAP map worker")).eval()
        self.explainer_kwargs = explainer_kwargs
        self.images: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        self.explainer: TrueClassExplainer | None = None

    def _data(self, data_refs: list[ray.ObjectRef]) -> None:
        """Fetch the images and labels once (lazily: a restarted actor fetches them again).

        The refs travel inside a list, so Ray hands them over unresolved and the actor gets
        read-only zero-copy views of the object store's copy (N×H×W×C float32 and N labels).
        """
        if self.images is None:
            self.images, self.labels = ray.get(data_refs)
            h, w, c = self.images.shape[1:]
            self.explainer = TrueClassExplainer(self.model, (c, h, w), **self.explainer_kwargs)

    def threads_used(self) -> dict[str, Any]:
        """What torch, inductor, numba and OpenCV would each use now in this worker."""
        return threads_in_use()

    def warm_up(self, data_refs: list[ray.ObjectRef]) -> int:
        """Explain one image on a small budget, so shap's numba kernels are compiled; the pid."""
        self._data(data_refs)
        c = self.images.shape[-1]
        TrueClassExplainer(self.model, (c, *self.images.shape[1:3]), max_evals=32,
                           masker=self.explainer.masker, engine=self.explainer.engine).explain(self.images[0], 0)
        return os.getpid()

    def explain_shard(self, shard: int, start: int, stop: int,
                      data_refs: list[ray.ObjectRef]) -> tuple[int, np.ndarray, dict[str, Any]]:
        """Maps of samples [start, stop), returned with their shard index and where they were
        made (the shard's sidecar records it)."""
        self._data(data_refs)
        maps = self.explainer.explain_many(self.images[start:stop], self.labels[start:stop])
        return shard, maps, here()


def _stderr(message: str) -> None:
    tqdm.write(f"impactx: {message}", file=sys.stderr)


class MapPool:
    """Ray actors holding one model and one image set, computing map shards on request.

    Create it once (workers load the checkpoint and receive the images once), then ``compute``
    any number of stores over the same images; ``close`` (or ``with``) releases the actors.
    ``workers`` is a request: an autoscaler is asked for what the nodes up now cannot hold; with
    none, more than fit are clamped, with a message (``log``; ``flag`` names the request in it).
    ``device`` is ``--device``: ``auto`` runs a worker on the GPU Ray gave it (and stops it with
    one line if torch cannot use that GPU), ``cpu`` on its CPU even on a GPU node.
    """

    #: consecutive ``ActorUnavailableError`` s of one shard before its worker counts as gone
    TRANSIENT_RETRIES = 5
    #: how often the dispatcher looks at stuck workers, and says what it waits for
    POLL_S, WAITING_LINE_S = 5.0, 30.0

    def __init__(self, build_model: ModelBuilder, images: torch.Tensor,
                 labels: torch.Tensor | np.ndarray | Sequence[int], settings: ExplainSettings, *,
                 workers: int, forward_batch: int | None = None,
                 gpus_per_worker: float | None = None, cpus_per_worker: float = 1.0,
                 threads: int | None = None, max_restarts: int = 3, device: str = "auto",
                 log: Callable[[str], None] = _stderr, watchdog_s: float = 60.0,
                 restart_timeout_s: float = 300.0, flag: str = "--workers") -> None:
        if not is_int(workers, 1):
            raise UserError(f"--workers must be an integer >= 1, got {workers!r}")
        check_images(images)
        n, c, h, w = images.shape
        self.images_shape, self.labels = (n, c, h, w), labels_array(labels, n)
        self.settings, self.log, self.watchdog_s = settings, log, watchdog_s
        self.restart_timeout_s = restart_timeout_s
        self.explainer_kwargs = settings.explainer_kwargs((h, w))
        hwc = to_hwc(images)
        # Validate the settings and labels here, where an error can be a clean one-liner.
        explainer = TrueClassExplainer(build_model().eval(), (c, h, w), **self.explainer_kwargs)
        explainer.check_labels(hwc, self.labels)

        init_ray()
        if gpus_per_worker is None:
            gpus_per_worker = default_gpus_per_worker(log)
        self.needs = Bundle(cpus_per_worker, gpus_per_worker)
        # as many as asked when they fit or an autoscaler may add nodes; else clamped, said once
        self.room: Room = make_room("map workers", flag, self.needs, workers, log)
        workers = self.room.count
        # Put once; every task carries these refs (not the data), and the pool keeps them alive
        # so that a restarted actor can fetch them again.
        self.data_refs = [ray.put(hwc), ray.put(self.labels)]
        actor_cls = ray.remote(MapWorker).options(
            num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=max_restarts,
            max_task_retries=max_restarts)
        self.actors = [actor_cls.remote(build_model, {**self.explainer_kwargs, "forward_batch": forward_batch},
                                         threads, device)
                       for _ in range(workers)]
        self.ready: list[Any] = []  # actors that finished warm_up: only they are handed shards

    def wait_ready(self) -> list[int]:
        """Block until every worker has loaded its model and compiled shap's kernels; their pids."""
        pids = ray.get([a.warm_up.remote(self.data_refs) for a in self.actors])
        self.ready = list(self.actors)
        return pids

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors, self.ready = [], []
        self.room.release()  # the autoscaler may let the idle nodes go

    def __enter__(self) -> MapPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def compute(self, store: MapStore, *, progress: bool = True,
                on_shard: Callable[[int], None] | None = None) -> MapStore:
        """Compute the store's missing shards, writing each as it arrives.

        Shards go only to workers that have started (warmed up), two at a time each, so a worker
        still waiting for resources holds no work. ``on_shard(i)`` is called after shard ``i`` is
        written (progress hooks, tests). Every ``watchdog_s`` without a finished shard, ``log``
        says which shards are running where and what the rest wait on.
        """
        n, c, h, w = check_fits(store, torch.empty(self.images_shape))
        check_settings(store, self.settings, (h, w))
        missing = store.missing_shards(verify=True)
        run = Dispatch(self, store, deque(missing))
        total = sum(b - a for a, b in map(store.shard_range, missing))
        with tqdm(total=total, unit="map", desc=f"SHAP maps ({len(self.actors)} workers)",
                  disable=not progress or not missing, dynamic_ncols=True) as bar:
            for shard, maps, made_by in run:
                store.write_shard(shard, maps, made_by)
                bar.update(len(maps))
                if on_shard is not None:
                    on_shard(shard)
        return store


def compute_store_ray(store: MapStore, build_model: ModelBuilder, images: torch.Tensor,
                      labels: torch.Tensor | np.ndarray | Sequence[int], settings: ExplainSettings,
                      *, workers: int, progress: bool = True,
                      on_shard: Callable[[int], None] | None = None,
                      **pool_options: Any) -> MapStore:
    """Compute the store's missing shards on ``workers`` Ray actors: the Ray twin of
    ``compute_store``, with the same maps. ``pool_options`` as for ``MapPool`` (forward_batch,
    gpus_per_worker -- None: 1 when the cluster has GPUs, else 0 --, cpus_per_worker, ...).
    """
    if not is_int(workers, 1):
        raise UserError(f"--workers must be an integer >= 1, got {workers!r}")
    check_fits(store, images)
    check_settings(store, settings, tuple(images.shape[-2:]))
    missing = store.missing_shards(verify=True)
    if not missing:
        return store
    with MapPool(build_model, images, labels, settings, workers=min(workers, len(missing)),
                 **pool_options) as pool:
        return pool.compute(store, progress=progress, on_shard=on_shard)
