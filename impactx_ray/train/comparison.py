"""Training for the comparison methods ABN and WAE, shaped like stages 1 and 2 (no Ray, no MLflow).

- ``abn_plan`` is a stage-1 run of a different model: the ABN is built from the same backbone,
  with the same weights and hyperparameters (``cfg.lr``, ``cfg.batch_size``, ``cfg.epochs``), so
  ABN vs. the baseline A compares architectures, not tuning budgets.
- ``wae_plan`` is a stage-2 run: the stage-1 backbone is M, frozen, and only the explanation
  encoder and C learn, with ``cfg.epochs2`` and ``cfg.lr2`` -- the same budget IMPACTX's stage 2 gets.

Both select the epoch with the best validation accuracy (of the perception branch for ABN).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from impactx_ray.config import RunConfig
from impactx_ray.data import class_mean_maps
from impactx_ray.models import ABN, WAE, Backbone, abn_loss
from impactx_ray.train.loop import Split, TrainPlan
from impactx_ray.train.stage1 import new_backbone


def _abn_step(model: ABN, x: Tensor, y: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    logits, att_logits, _ = model.outputs(x)
    loss, ce_att, ce_per = abn_loss(logits, att_logits, y)
    return loss, {"ce_attention": ce_att, "ce_perception": ce_per}


def _wae_step(model: WAE, x: Tensor, y: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    return F.cross_entropy(model(x), y), {}


def abn_plan(cfg: RunConfig, num_classes: int, device: torch.device) -> TrainPlan:
    """An ABN on the backbone ``cfg`` asks for, all of it learning at ``cfg.lr`` for
    ``cfg.epochs``. History rows: train_loss = train_ce_attention + train_ce_perception."""
    model = ABN(new_backbone(cfg, num_classes)).to(device)
    return TrainPlan("ABN", model, _abn_step, list(model.parameters()), lr=cfg.lr,
                     epochs=cfg.epochs)


def wae_plan(cfg: RunConfig, backbone: Backbone, split: Split, maps: np.ndarray,
             device: torch.device) -> TrainPlan:
    """WAE around the trained, frozen ``backbone``; ``maps`` (N×H×W×C) holds one map per
    training-set image. The class means come from the maps of the training rows only, so
    validation labels stay unseen."""
    train = split.data
    if len(maps) != len(train):
        raise ValueError(f"{len(maps)} maps for {len(train)} training images")
    means = class_mean_maps(maps, train.labels, train.num_classes,
                            index=split.train_idx.cpu().numpy())
    model = WAE.from_backbone(backbone, means).to(device)
    return TrainPlan("WAE", model, _wae_step, [p for p in model.parameters() if p.requires_grad],
                     lr=cfg.lr2, epochs=cfg.epochs2)
