"""Stage 1: train the plain classifier A = Q∘M and keep the weights with the best validation accuracy.

Pure PyTorch: the caller passes data and gets back the model and its history; writing files, Tune
reports and MLflow logging hook in through ``on_epoch``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from impactx_ray.config import RunConfig
from impactx_ray.data import ImageData
from impactx_ray.models import Backbone, create_backbone, default_pretrained
from impactx_ray.train.loop import EpochCallback, FitState, StageResult, StateCallback, fit, seed_everything

__all__ = ["EpochCallback", "StageResult", "new_backbone", "train_stage1"]


def new_backbone(cfg: RunConfig, num_classes: int) -> Backbone:
    """The untrained backbone ``cfg`` asks for: its pretrained weights (timm default, --weights)
    or a random initialisation (--no-pretrained, lenet5). Stage 1 and ABN both start here."""
    pretrained = default_pretrained(cfg.model) if cfg.pretrained is None else cfg.pretrained
    return create_backbone(cfg.model, num_classes, pretrained=pretrained, weights=cfg.weights,
                           input_size=cfg.input_size)


def train_stage1(cfg: RunConfig, train: ImageData, train_idx: torch.Tensor, val_idx: torch.Tensor,
                 *, device: torch.device, on_epoch: EpochCallback | None = None,
                 progress: bool = True, resume: FitState | None = None,
                 on_state: StateCallback | None = None) -> StageResult:
    """Train A on ``train[train_idx]`` for ``cfg.epochs``; select by accuracy on ``train[val_idx]``."""
    generator = seed_everything(cfg.seed)
    model = new_backbone(cfg, train.num_classes).to(device)
    return fit("stage 1", model, _ce_step, list(model.parameters()), lr=cfg.lr,
               epochs=cfg.epochs, batch_size=cfg.batch_size, generator=generator, train=train,
               train_idx=train_idx, val_idx=val_idx, device=device, on_epoch=on_epoch,
               progress=progress, resume=resume,
               on_state=on_state)


def _ce_step(model: nn.Module, x: Tensor, y: Tensor, idx: Tensor
             ) -> tuple[Tensor, dict[str, Tensor]]:
    return F.cross_entropy(model(x), y), {}
