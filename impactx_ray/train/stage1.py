"""Stage 1: train the plain classifier A = Q∘M and keep the weights with the best validation accuracy.

Pure PyTorch: the caller passes data and gets back the model and its history; writing files, Tune
reports and MLflow logging hook in through ``on_epoch``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from impactx_ray.config import RunConfig
from impactx_ray.data import ImageData
from impactx_ray.models import Backbone, create_backbone, default_pretrained
from impactx_ray.train.checkpoint import check_meta, load_checkpoint, load_into
from impactx_ray.train.loop import EpochCallback, StageResult, fit, seed_everything

__all__ = ["EpochCallback", "StageResult", "build_backbone", "load_backbone", "train_stage1"]


def build_backbone(cfg: RunConfig, num_classes: int) -> Backbone:
    pretrained = default_pretrained(cfg.model) if cfg.pretrained is None else cfg.pretrained
    return create_backbone(cfg.model, num_classes, pretrained=pretrained, weights=cfg.weights,
                           input_size=cfg.input_size)


def load_backbone(path: str | Path, *, model: str, num_classes: int,
                  input_size: int | None = None) -> Backbone:
    """A stage-1 checkpoint as a ready model; UserError if it is unreadable or of another model.

    Module-level and argument-only so that Ray can ship it to map workers, each of which loads
    the checkpoint once.
    """
    state, meta = load_checkpoint(path)
    check_meta(path, meta, {"kind": "stage1", "model": model, "num_classes": num_classes})
    backbone = create_backbone(model, num_classes, pretrained=False, input_size=input_size)
    return load_into(backbone, state, path, f"a {model}")


def train_stage1(cfg: RunConfig, train: ImageData, train_idx: torch.Tensor, val_idx: torch.Tensor,
                 *, device: torch.device, on_epoch: EpochCallback | None = None,
                 progress: bool = True) -> StageResult:
    """Train A on ``train[train_idx]`` for ``cfg.epochs``; select by accuracy on ``train[val_idx]``."""
    generator = seed_everything(cfg.seed)
    model = build_backbone(cfg, train.num_classes).to(device)
    return fit("stage 1", model, _ce_step, list(model.parameters()), lr=cfg.lr,
               epochs=cfg.epochs, batch_size=cfg.batch_size, generator=generator, train=train,
               train_idx=train_idx, val_idx=val_idx, device=device, on_epoch=on_epoch,
               progress=progress)


def _ce_step(model: nn.Module, x: Tensor, y: Tensor, idx: Tensor
             ) -> tuple[Tensor, dict[str, Tensor]]:
    return F.cross_entropy(model(x), y), {}
