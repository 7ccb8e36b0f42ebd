"""Stage 2: train LEP, D and C on CE + λ·MSE with M (the stage-1 classifier) frozen.

The targets are the stage-1 model's SHAP maps of the true class, each scaled to [-1, 1] by its own
max |value| (``impactx_ray.data.map_targets``). Selection, as in stage 1, is by validation accuracy.
"""

from __future__ import annotations

import numpy as np
import torch

from impactx_ray.config import RunConfig
from impactx_ray.data import ImageData, map_targets
from impactx_ray.models import Backbone, ImpactX
from impactx_ray.train.loop import Split, TrainPlan, index_batches
from impactx_ray.train.losses import impactx_loss


@torch.no_grad()
def map_mse(model: ImpactX, data: ImageData, targets: torch.Tensor, indices: torch.Tensor, *,
            device: torch.device, batch_size: int = 256) -> float:
    """Mean squared error between IMPACTX's own maps and the target maps over ``indices``."""
    model.eval()
    total = 0.0
    for idx in index_batches(indices, batch_size):
        pred = model.explain(data.float_images(idx).to(device))  # N×C×H×W
        total += ((pred - targets[idx].to(device)) ** 2).mean(dim=(1, 2, 3)).sum().item()
    return total / max(len(indices), 1)


def stage2_plan(cfg: RunConfig, backbone: Backbone, split: Split, maps: np.ndarray,
                device: torch.device) -> TrainPlan:
    """IMPACTX around the trained ``backbone`` (M, frozen): LEP, D and C learn at ``cfg.lr2``
    for ``cfg.epochs2``; ``maps`` (N×H×W×C) holds one map per training-set image."""
    train = split.data
    if len(maps) != len(train):
        raise ValueError(f"{len(maps)} maps for {len(train)} training images")
    targets = map_targets(maps)  # N×H×W×C raw -> N×C×H×W in [-1, 1]
    h, w = train.image_size
    model = ImpactX.from_backbone(backbone, image_size=(h, w), channels=maps.shape[-1]).to(device)
    model.freeze_backbone()  # M stays in eval mode: ImpactX.train keeps a frozen backbone frozen

    def step(model: ImpactX, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
        logits, pred_maps = model.outputs(x)
        loss, ce, mse = impactx_loss(logits, y, pred_maps, targets[idx].to(device), cfg.lam)
        return loss, {"ce": ce, "mse": mse}

    def validate(model: ImpactX, epoch: int) -> dict[str, float]:
        return {"val_mse": map_mse(model, train, targets, split.val_idx, device=device)}

    return TrainPlan("stage 2", model, step, [p for p in model.parameters() if p.requires_grad],
                     lr=cfg.lr2, epochs=cfg.epochs2, validate=validate)
