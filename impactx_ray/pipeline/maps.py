"""The maps step: the stage-1 checkpoint's SHAP maps of the training set, into its map store."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from impactx_ray.checks import check_backbone, check_eval_budget, store_warning
from impactx_ray.config import RunConfig
from impactx_ray.data import ImageData, dataset_fingerprint
from impactx_ray.errors import UserError
from impactx_ray.explain import ExplainSettings, MapStore, compute_store
from impactx_ray.io import file_sha256
from impactx_ray.methods import ModelSpec, load_stage1


def check_before_writing(cfg: RunConfig, train: ImageData, *, explains: bool = True,
                         builds_backbone: bool = True) -> None:
    """What a run or a sweep cell checks before it writes anything: one image's masks fit the map
    engine's budget (when maps will be computed) and the backbone can be built as asked
    (pretrained download, ``--weights``; when a method trains from it)."""
    if explains:
        h, w = train.image_size
        check_eval_budget(cfg.max_evals, (h, w, int(train.images.shape[1])))
    if builds_backbone:
        check_backbone(cfg, train.num_classes)


@dataclass
class MapsDone:
    """A complete map store, how many maps this step computed and in how long, and what it
    found wrong with them (constant maps: a collapsed model explains nothing)."""

    store: MapStore
    computed: int
    seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def maps_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else float("nan")

    def timings(self) -> dict[str, float]:
        """What a run's timings record of this step (nothing when no map was computed)."""
        return {"explain": self.seconds, "maps_computed": self.computed,
                "maps_per_s": self.maps_per_s} if self.computed else {}

    def summary(self) -> str:
        if not self.computed:
            return f"SHAP maps: reusing {self.store.path}"
        return (f"SHAP maps: {self.computed} in {self.seconds:.1f} s ({self.maps_per_s:.2f} "
                f"maps/s) -> {self.store.path}")


def run_store_warning(settings: ExplainSettings, root: Path, checkpoint: Path,
                      train: ImageData) -> str | None:
    """The constant-maps warning of ``checkpoint``'s complete store of ``train`` under ``root``;
    None when there is no such store (maps from elsewhere) or it is incomplete."""
    try:
        store = settings.find_store(root, file_sha256(checkpoint), dataset_fingerprint(train))
    except UserError:
        return None
    return store_warning(store) if not store.missing_shards(verify=False) else None


def stage1_maps(checkpoint: Path, spec: ModelSpec, train: ImageData, settings: ExplainSettings,
                root: Path, *, device: torch.device, workers: int | None = None,
                gpus_per_worker: float | None = None, worker_device: str = "auto",
                workers_flag: str = "--workers",
                progress: bool = True) -> MapsDone:
    """Open (or find again) the store of ``checkpoint``'s maps of ``train`` under ``root`` and
    compute its missing shards: in this process (on ``device``), or on ``workers`` Ray map
    workers (``worker_device``: the ``--device`` asked for, which each worker resolves on its node).

    Before anything is written: the checkpoint loads as a stage-1 model of ``spec`` and one
    image's masks fit the map engine's budget. A store already complete computes nothing.
    """
    model = load_stage1(checkpoint, spec)  # a bad checkpoint fails before the store is touched
    h, w = train.image_size
    check_eval_budget(settings.max_evals, (h, w, int(train.images.shape[1])))
    store = settings.open_store(root, file_sha256(checkpoint), train)
    todo = sum(b - a for a, b in map(store.shard_range, store.missing_shards()))
    start = time.perf_counter()
    if workers is None:
        compute_store(store, model.to(device).eval(), train.float_images(), train.labels,
                      settings, progress=progress)
    else:
        from impactx_ray.explain.actors import compute_store_ray

        compute_store_ray(store, partial(load_stage1, checkpoint, spec), train.float_images(),
                          train.labels, settings, workers=workers,
                          gpus_per_worker=gpus_per_worker, device=worker_device, progress=progress,
                          flag=workers_flag)
    seconds = time.perf_counter() - start if todo else 0.0
    warning = store_warning(store)
    return MapsDone(store, todo, seconds, [warning] if warning else [])
