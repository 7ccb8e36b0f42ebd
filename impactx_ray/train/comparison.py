"""Training for the comparison methods ABN and WAE, shaped like stages 1 and 2 (no Ray, no MLflow).

- ``train_abn`` is a stage-1 run of a different model: the ABN is built from the same backbone,
  with the same weights and hyperparameters (``cfg.lr``, ``cfg.batch_size``, ``cfg.epochs``), so
  ABN vs. the baseline A compares architectures, not tuning budgets.
- ``train_wae`` is a stage-2 run: the stage-1 backbone is M, frozen, and only the explanation
  encoder and C learn, with ``cfg.epochs2`` and ``cfg.lr2`` -- the same budget IMPACTX's stage 2 gets.

Both select the epoch with the best validation accuracy (of the perception branch for ABN).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from impactx_ray.config import RunConfig
from impactx_ray.data import ImageData, class_mean_maps
from impactx_ray.models import ABN, WAE, Backbone, abn_loss
from impactx_ray.train.loop import EpochCallback, FitState, StageResult, StateCallback, fit, seed_everything
from impactx_ray.train.stage1 import new_backbone


def _abn_step(model: ABN, x: Tensor, y: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    logits, att_logits, _ = model.outputs(x)
    loss, ce_att, ce_per = abn_loss(logits, att_logits, y)
    return loss, {"ce_attention": ce_att, "ce_perception": ce_per}


def _wae_step(model: WAE, x: Tensor, y: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    return F.cross_entropy(model(x), y), {}


def train_abn(cfg: RunConfig, train: ImageData, train_idx: Tensor, val_idx: Tensor, *,
              device: torch.device, on_epoch: EpochCallback | None = None,
              progress: bool = True, resume: FitState | None = None,
              on_state: StateCallback | None = None) -> StageResult:
    """Train an ABN on ``train[train_idx]`` for ``cfg.epochs``; select by accuracy on ``train[val_idx]``.

    History rows: epoch, train_loss (= train_ce_attention + train_ce_perception), val_accuracy.
    """
    generator = seed_everything(cfg.seed)
    model = ABN(new_backbone(cfg, train.num_classes)).to(device)
    return fit("ABN", model, _abn_step, list(model.parameters()), lr=cfg.lr, epochs=cfg.epochs,
               batch_size=cfg.batch_size, generator=generator, train=train, train_idx=train_idx,
               val_idx=val_idx, device=device, on_epoch=on_epoch, progress=progress, resume=resume,
               on_state=on_state)


def train_wae(cfg: RunConfig, backbone: Backbone, train: ImageData, maps: np.ndarray,
              train_idx: Tensor, val_idx: Tensor, *, device: torch.device,
              on_epoch: EpochCallback | None = None, progress: bool = True,
              resume: FitState | None = None,
              on_state: StateCallback | None = None) -> StageResult:
    """Train WAE around the trained, frozen ``backbone``; ``maps`` (N×H×W×C) holds one map per ``train`` image.

    The class means come from the maps of ``train_idx`` only, so validation labels stay unseen.
    """
    if len(maps) != len(train):
        raise ValueError(f"{len(maps)} maps for {len(train)} training images")
    means = class_mean_maps(maps, train.labels, train.num_classes, index=train_idx.cpu().numpy())
    generator = seed_everything(cfg.seed)
    model = WAE.from_backbone(backbone, means).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    return fit("WAE", model, _wae_step, params, lr=cfg.lr2, epochs=cfg.epochs2,
               batch_size=cfg.batch_size, generator=generator, train=train, train_idx=train_idx,
               val_idx=val_idx, device=device, on_epoch=on_epoch, progress=progress, resume=resume,
               on_state=on_state)
