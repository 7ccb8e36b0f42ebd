"""IMPACTX loss (paper eq. 1): L = CE(y, C(m, z)) + λ · MSE(r, D(z)), returned with its parts."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def impactx_loss(logits: Tensor, labels: Tensor, pred_maps: Tensor, target_maps: Tensor,
                 lam: float) -> tuple[Tensor, Tensor, Tensor]:
    """Return (total, ce, mse); ``pred_maps`` and ``target_maps`` are both N×C×H×W."""
    if pred_maps.shape != target_maps.shape:
        raise ValueError(f"predicted maps {tuple(pred_maps.shape)} and target maps "
                         f"{tuple(target_maps.shape)} differ in shape")
    ce = F.cross_entropy(logits, labels)
    mse = F.mse_loss(pred_maps, target_maps)
    return ce + lam * mse, ce, mse
