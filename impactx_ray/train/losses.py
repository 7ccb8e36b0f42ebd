"""IMPACTX loss (paper eq. 1): L = CE(y, C(m, z)) + λ · MSE(r, D(z)), returned with its parts."""

from __future__ import annotations

import torch
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


def scale_maps(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Scale each map to [-1, 1] by its own max |value| (the decoder's tanh range).

    The store keeps raw shap values, whose scale follows the logit scale of the explained model;
    scaling per image makes the MSE term comparable across images and models. An all-zero map
    stays zero.
    """
    peak = maps.abs().flatten(1).amax(dim=1)               # N
    peak = torch.where(peak > eps, peak, torch.ones_like(peak))
    return maps / peak.view(-1, *([1] * (maps.dim() - 1)))  # N×... / N×1×1×1
