"""Checks around a run: of its inputs before anything is written, and of its products after.

*Before writing* (``UserError``, one line, exit 2): the SHAP budget against the memory the map
engine may take, and the backbone (pretrained download or ``--weights`` file) built exactly as
training will build it, so a bad weights file fails before ``config.json`` or stage 1 exist.

*After* (warnings, never errors: the run's products are still what was asked for): a stage-1
model at chance level and constant SHAP maps. Both mean stage 2 learns from noise, which is worth
saying in the output, ``result.json`` and MLflow rather than leaving for the user to find out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from impactx_ray.config import RunConfig
from impactx_ray.defaults import MASK_BYTES, MAX_EVALS
from impactx_ray.errors import UserError
from impactx_ray.explain import MapStore
from impactx_ray.train import new_backbone

# MASK_BYTES (defaults.py) is ``explain.batched.BatchedPartition``'s ``max_mask_bytes``: one bool
# row of H·W·C per evaluation, for at least one image in flight. shap's own engine keeps a
# comparable mask per evaluation, so the bound holds for both (tested to match).


#: the fewest validation images on which "at chance level" means something
MIN_VALIDATION = 20


def check_eval_budget(max_evals: int, hwc: tuple[int, int, int]) -> None:
    """UserError when one image's ``max_evals`` masks of H×W×C exceed :data:`MASK_BYTES`."""
    h, w, c = hwc
    need = (max_evals + 1) * h * w * c
    if need > MASK_BYTES:
        limit = MASK_BYTES // (h * w * c) - 1
        raise UserError(f"--max-evals {max_evals} needs {need / 2**30:,.1f} GiB of masks per "
                        f"{h}x{w}x{c} image, over the {MASK_BYTES >> 20} MiB the map engine may "
                        f"take; use at most {limit} (the paper uses {MAX_EVALS})")


def check_backbone(cfg: RunConfig, num_classes: int) -> None:
    """Build the backbone stage 1 and ABN start from (pretrained weights, ``--weights``), so
    that a missing download or an unreadable or mismatched weights file fails now."""
    new_backbone(cfg, num_classes)


def chance_warning(val_accuracy: float, val_labels: torch.Tensor | np.ndarray,
                   what: str = "stage 1") -> str | None:
    """A warning when ``val_accuracy`` is no better than always answering the validation set's
    most frequent class (within two binomial standard deviations); else None. Below
    :data:`MIN_VALIDATION` images the comparison says nothing, and nothing is said."""
    y = np.asarray(val_labels).reshape(-1)
    if len(y) < MIN_VALIDATION or not math.isfinite(val_accuracy):
        return None
    chance = np.bincount(y).max() / len(y)
    margin = 2 * math.sqrt(chance * (1 - chance) / len(y))
    if val_accuracy > chance + margin:
        return None
    return (f"{what} is at chance level: validation accuracy {val_accuracy:.4f}, and always "
            f"answering the most frequent class gives {chance:.4f}; its SHAP maps and everything "
            "built on them carry no information (lower --lr or train longer)")


def constant_map_counts(maps: np.ndarray) -> tuple[int, int]:
    """(maps whose values are all equal, of which all zero) in N×H×W×C ``maps``."""
    flat = maps.reshape(len(maps), -1)
    constant = (flat.max(axis=1) == flat.min(axis=1))
    zero = constant & (flat[:, 0] == 0) if flat.shape[1] else constant
    return int(constant.sum()), int(zero.sum())


def constant_maps_warning(counts: Iterable[tuple[int, int]], total: int) -> str | None:
    """A warning when any map is constant (``counts``: per chunk, as from
    :func:`constant_map_counts`); else None."""
    constant = zero = 0
    for c, z in counts:
        constant, zero = constant + c, zero + z
    if not constant:
        return None
    return (f"{constant} of {total} SHAP maps are constant ({zero} all zero): the model's "
            "true-class score does not change when the image is masked, so stage 2 has nothing "
            "to learn from those maps (is stage 1 at chance level?)")


def store_warning(store: MapStore) -> str | None:
    """:func:`constant_maps_warning` of a complete map store, read one shard at a time."""
    return constant_maps_warning((constant_map_counts(store.load_shard(i))
                                  for i in range(store.num_shards)), store.num_maps)
