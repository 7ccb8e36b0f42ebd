"""Stage 2: train LEP, D and C on CE + λ·MSE with M (the stage-1 classifier) frozen.

The targets are the stage-1 model's SHAP maps of the true class, each scaled to [-1, 1] by its own
max |value| (``scale_maps``). Selection, as in stage 1, is by validation accuracy.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from impactx_ray.config import RunConfig
from impactx_ray.data import ImageData
from impactx_ray.errors import UserError
from impactx_ray.models import Backbone, ImpactX, create_backbone
from impactx_ray.train.checkpoint import check_meta, load_checkpoint
from impactx_ray.train.loop import (accuracy, check_finite, eval_mode, index_batches, num_batches,
                                    seed_everything)
from impactx_ray.train.losses import impactx_loss, scale_maps
from impactx_ray.train.stage1 import EpochCallback, StageResult


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
    try:
        impactx.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not fit IMPACTX on {model}: "
                        f"{str(e).splitlines()[0][:160]}") from None
    return impactx.eval()


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
    model.freeze_backbone()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr2)
    best_state, best_acc, best_epoch, history = None, -1.0, 0, []
    start = time.perf_counter()
    steps = num_batches(len(train_idx), cfg.batch_size)
    for epoch in range(1, cfg.epochs2 + 1):
        model.train()  # M stays in eval mode: ImpactX.train keeps the frozen backbone frozen
        sums = {"loss": 0.0, "ce": 0.0, "mse": 0.0}
        seen = 0
        bar = tqdm(index_batches(train_idx, cfg.batch_size, generator=generator), total=steps,
                   desc=f"stage 2 epoch {epoch}/{cfg.epochs2}", leave=False, disable=not progress)
        for idx in bar:
            x, y = train.float_images(idx).to(device), train.labels[idx].to(device)
            logits, pred_maps = model(x)
            loss, ce, mse = impactx_loss(logits, y, pred_maps, targets[idx].to(device), cfg.lam)
            check_finite(loss, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for k, v in (("loss", loss), ("ce", ce), ("mse", mse)):
                sums[k] += v.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(ce=f"{sums['ce'] / seen:.4f}", mse=f"{sums['mse'] / seen:.4f}",
                            refresh=False)
        val_acc = accuracy(eval_mode(model), train, device=device, indices=val_idx)
        val_mse = map_mse(model, train, targets, val_idx, device=device)
        row = {"epoch": epoch, "train_loss": sums["loss"] / seen, "train_ce": sums["ce"] / seen,
               "train_mse": sums["mse"] / seen, "val_accuracy": val_acc, "val_mse": val_mse}
        history.append(row)
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
            best_state = copy.deepcopy(model.state_dict())
        if progress:
            tqdm.write(f"stage 2 epoch {epoch}/{cfg.epochs2}: ce {row['train_ce']:.4f}, "
                       f"mse {row['train_mse']:.4f}, val acc {val_acc:.4f}, val mse {val_mse:.4f}"
                       f"{'  *best' if best_epoch == epoch else ''}")
        if on_epoch is not None:
            on_epoch(epoch, row)
    model.load_state_dict(best_state)
    model.eval()
    return StageResult(model, best_epoch, best_acc, history, time.perf_counter() - start)
