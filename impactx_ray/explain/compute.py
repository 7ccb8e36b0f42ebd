"""Fill a map store: compute its missing shards in this process (the Ray twin is ``actors.py``).

Shards already written and intact are never recomputed, so a killed run resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from impactx_ray.errors import UserError
from impactx_ray.explain.settings import ExplainSettings
from impactx_ray.explain.shap_maps import (
    TrueClassExplainer,
    check_images,
    in_eval_mode,
    labels_array,
    to_hwc,
    torch_threads_ctx,
)
from impactx_ray.explain.store import MapStore


def check_fits(store: MapStore, images: torch.Tensor) -> tuple[int, int, int, int]:
    """(N, C, H, W) of ``images``; UserError unless they are the store's N images of its shape."""
    check_images(images)
    n, c, h, w = images.shape
    if n != store.num_maps or (h, w, c) != store.map_shape:
        raise UserError(
            f"images {tuple(images.shape)} do not fit map store {store.path} "
            f"({store.num_maps} maps of H x W x C {store.map_shape}); use the data the store was made for"
        )
    return n, c, h, w


def check_settings(store: MapStore, settings: ExplainSettings,
                   image_size: tuple[int, int]) -> dict[str, object]:
    """The explainer keyword arguments of ``settings``, checked against the store's meta (the
    settings that decide the maps; ``compile`` does not)."""
    kwargs = settings.explainer_kwargs(image_size)
    for key, value in {"precision": settings.precision, **settings.identity(image_size)}.items():
        have = settings.recorded(store.meta, key)
        if (key in store.meta or key == "precision") and have != value:
            raise UserError(
                f"map store {store.path} was made with {key}={have!r}, not {key}={value!r}; "
                "use the store's settings or another directory"
            )
    return kwargs


def compute_store(
    store: MapStore,
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    settings: ExplainSettings,
    *,
    progress: bool = True,
    torch_threads: int | None = None,
    forward_batch: int | None = None,
) -> MapStore:
    """Compute the store's missing shards (true class), writing each as it finishes.

    The settings must equal the store's meta (else UserError); the caller vouches that
    ``images``/``labels`` are what ``meta['data_fingerprint']`` names and ``model`` what
    ``meta['checkpoint_hash']`` names. ``torch_threads`` as in :func:`explain_true_class`.
    """
    n, c, h, w = check_fits(store, images)
    y = labels_array(labels, n)
    kwargs = check_settings(store, settings, (h, w))
    missing = store.missing_shards(verify=True)
    if not missing:
        return store
    ex = TrueClassExplainer(model, (c, h, w), dtype=images.dtype, forward_batch=forward_batch, **kwargs)
    hwc = to_hwc(images)
    total = sum(b - a for a, b in map(store.shard_range, missing))
    bar = tqdm(total=total, unit="map", desc="SHAP maps", disable=not progress, dynamic_ncols=True)
    with in_eval_mode(model), torch_threads_ctx(torch_threads), bar:
        ex.check_labels(hwc, y)
        for i in missing:
            start, stop = store.shard_range(i)
            store.write_shard(i, ex.explain_many(hwc[start:stop], y[start:stop]))
            bar.update(stop - start)
    return store
