"""Stage 1: the plain classifier A = Q∘M, trained with cross-entropy; the loop keeps the weights
with the best validation accuracy.

Pure PyTorch: a plan for the one loop (``loop.fit``); writing files, Tune reports and MLflow
logging hook in through the loop's ``FitHooks``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from impactx_ray.config import RunConfig
from impactx_ray.models import Backbone, create_backbone, default_pretrained
from impactx_ray.train.loop import TrainPlan


def new_backbone(cfg: RunConfig, num_classes: int) -> Backbone:
    """The untrained backbone ``cfg`` asks for: its pretrained weights (timm default, --weights)
    or a random initialisation (--no-pretrained, lenet5). Stage 1 and ABN both start here."""
    pretrained = default_pretrained(cfg.model) if cfg.pretrained is None else cfg.pretrained
    return create_backbone(cfg.model, num_classes, pretrained=pretrained, weights=cfg.weights,
                           input_size=cfg.input_size)


def stage1_plan(cfg: RunConfig, num_classes: int, device: torch.device) -> TrainPlan:
    """A, all of it learning at ``cfg.lr`` for ``cfg.epochs``."""
    model = new_backbone(cfg, num_classes).to(device)
    return TrainPlan("stage 1", model, ce_step, list(model.parameters()), lr=cfg.lr,
                     epochs=cfg.epochs)


def ce_step(model: nn.Module, x: Tensor, y: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    return F.cross_entropy(model(x), y), {}
