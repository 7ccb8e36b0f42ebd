"""Attribution maps as training data: per-image scaling, decoder targets and per-class means.

The map store keeps raw shap values (N×H×W×C, channels last), whose scale follows the logit scale
of the explained model. Everything that learns from maps -- IMPACTX's decoder targets, WAE's class
means -- first scales each map to [-1, 1] by its own max |value|, so every image counts the same.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def scale_maps(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Scale each map to [-1, 1] by its own max |value| (the decoder's tanh range).

    An all-zero map stays zero.
    """
    peak = maps.abs().flatten(1).amax(dim=1)               # N
    peak = torch.where(peak > eps, peak, torch.ones_like(peak))
    return maps / peak.view(-1, *([1] * (maps.dim() - 1)))  # N×... / N×1×1×1


def map_targets(maps: np.ndarray) -> Tensor:
    """Store layout N×H×W×C (raw shap values) → decoder targets N×C×H×W in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
    return scale_maps(t.permute(0, 3, 1, 2).contiguous())  # N×H×W×C -> N×C×H×W


def class_mean_maps(maps: np.ndarray | Tensor, labels: np.ndarray | Tensor, num_classes: int, *,
                    index: np.ndarray | Tensor | None = None, chunk: int = 2048) -> Tensor:
    """Per-class mean of the per-image-scaled maps: N×H×W×C (store layout) -> K×C×H×W float32.

    ``index`` restricts the mean to those rows of ``maps`` (``labels`` stays aligned with ``maps``);
    rows are converted ``chunk`` at a time, so a CIFAR-sized store is never copied whole. A class
    without rows gets an all-zero mean.
    """
    if maps.ndim != 4:
        raise ValueError(f"maps must be N×H×W×C, got shape {tuple(maps.shape)}")
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(y_all) != len(maps):
        raise ValueError(f"{len(maps)} maps for {len(y_all)} labels")
    rows = np.arange(len(maps)) if index is None else np.asarray(index, dtype=np.int64).reshape(-1)
    _, h, w, c = maps.shape
    sums = torch.zeros(num_classes, c, h, w)
    for start in range(0, len(rows), chunk):
        r = rows[start:start + chunk]
        t = torch.as_tensor(np.asarray(maps[r], dtype=np.float32))  # n×H×W×C
        scaled = scale_maps(t.permute(0, 3, 1, 2))  # n×H×W×C -> n×C×H×W, each in [-1, 1]
        sums.index_add_(0, y_all[r], scaled)
    counts = torch.bincount(y_all[rows], minlength=num_classes).clamp_min(1).to(sums.dtype)  # K
    return sums / counts.view(-1, 1, 1, 1)  # classes without images stay 0
