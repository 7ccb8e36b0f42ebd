"""Stage 2: train LEP, D and C on CE + λ·MSE with M (the stage-1 classifier) frozen.

The targets are the stage-1 model's SHAP maps of the true class, each scaled to [-1, 1] by its own
max |value| (``scale_maps``). Selection, as in stage 1, is by validation accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from impactx_ray.config import RunConfig
from impactx_ray.data import ImageData
from impactx_ray.models import Backbone, ImpactX, create_backbone
from impactx_ray.train.checkpoint import check_meta, load_checkpoint, load_into
from impactx_ray.train.loop import index_batches, fit, seed_everything
from impactx_ray.train.losses import impactx_loss, scale_maps
from impactx_ray.train.loop import EpochCallback, StageResult


def map_targets(maps: np.ndarray) -> torch.Tensor:
    """Store layout N×H×W×C (raw shap values) → decoder targets N×C×H×W in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
    return scale_maps(t.permute(0, 3, 1, 2).contiguous())  # N×H×W×C -> N×C×H×W


@torch.no_grad()
def map_mse(model: ImpactX, data: ImageData, targets: torch.Tensor, indices: torch.Tensor, *,
            device: torch.device, batch_size: int = 256) -> float:
    """Mean squared error between predicted and target maps over ``indices``."""
    model.eval()
    total = 0.0
    for idx in index_batches(indices, batch_size):
        _, pred = model(data.float_images(idx).to(device))
        total += ((pred - targets[idx].to(device)) ** 2).mean(dim=(1, 2, 3)).sum().item()
    return total / max(len(indices), 1)


def load_impactx(path: str | Path, *, model: str, num_classes: int,
                 input_size: int | None = None) -> ImpactX:
    """A stage-2 checkpoint as a ready IMPACTX model; UserError if unreadable or of another model."""
    state, meta = load_checkpoint(path)
    check_meta(path, meta, {"kind": "stage2", "model": model, "num_classes": num_classes})
    backbone = create_backbone(model, num_classes, pretrained=False, input_size=input_size)
    impactx = ImpactX.from_backbone(backbone, image_size=tuple(meta["image_size"]),
                                    channels=meta["channels"])
    return load_into(impactx, state, path, f"IMPACTX on {model}")


def train_stage2(cfg: RunConfig, backbone: Backbone, train: ImageData, maps: np.ndarray,
                 train_idx: torch.Tensor, val_idx: torch.Tensor, *, device: torch.device,
                 on_epoch: EpochCallback | None = None, progress: bool = True) -> StageResult:
    """Train IMPACTX around the trained ``backbone``; ``maps`` holds one map per ``train`` image."""
    if len(maps) != len(train):
        raise ValueError(f"{len(maps)} maps for {len(train)} training images")
    targets = map_targets(maps)
    generator = seed_everything(cfg.seed)
    h, w = train.image_size
    model = ImpactX.from_backbone(backbone, image_size=(h, w), channels=maps.shape[-1]).to(device)
    model.freeze_backbone()  # M stays in eval mode: ImpactX.train keeps a frozen backbone frozen
    params = [p for p in model.parameters() if p.requires_grad]

    def step(model: ImpactX, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
        logits, pred_maps = model(x)
        loss, ce, mse = impactx_loss(logits, y, pred_maps, targets[idx].to(device), cfg.lam)
        return loss, {"ce": ce, "mse": mse}

    def validate(model: ImpactX) -> dict[str, float]:
        return {"val_mse": map_mse(model, train, targets, val_idx, device=device)}

    return fit("stage 2", model, step, params, lr=cfg.lr2, epochs=cfg.epochs2,
               batch_size=cfg.batch_size, generator=generator, train=train, train_idx=train_idx,
               val_idx=val_idx, device=device, on_epoch=on_epoch, progress=progress,
               validate=validate)
