"""Stage 1: train the plain classifier A = Q∘M and keep the weights with the best validation accuracy.

Pure PyTorch: the caller passes data and gets back the model and its history; writing files, Tune
reports and MLflow logging hook in through ``on_epoch``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from impactx_ray.config import RunConfig
from impactx_ray.errors import UserError
from impactx_ray.data import ImageData
from impactx_ray.models import Backbone, create_backbone, default_pretrained
from impactx_ray.train.checkpoint import check_meta, load_checkpoint
from impactx_ray.train.loop import (accuracy, check_finite, eval_mode, index_batches, num_batches,
                                    seed_everything)

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class StageResult:
    model: torch.nn.Module
    best_epoch: int
    best_val_accuracy: float
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


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
    try:
        backbone.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not fit a {model}: "
                        f"{str(e).splitlines()[0][:160]}") from None
    return backbone.eval()


def train_stage1(cfg: RunConfig, train: ImageData, train_idx: torch.Tensor, val_idx: torch.Tensor,
                 *, device: torch.device, on_epoch: EpochCallback | None = None,
                 progress: bool = True) -> StageResult:
    """Train A on ``train[train_idx]`` for ``cfg.epochs``; select by accuracy on ``train[val_idx]``."""
    generator = seed_everything(cfg.seed)
    model = build_backbone(cfg, train.num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    best_state, best_acc, best_epoch, history = None, -1.0, 0, []
    start = time.perf_counter()
    steps = num_batches(len(train_idx), cfg.batch_size)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        total, seen = 0.0, 0
        bar = tqdm(index_batches(train_idx, cfg.batch_size, generator=generator), total=steps,
                   desc=f"stage 1 epoch {epoch}/{cfg.epochs}", leave=False, disable=not progress)
        for idx in bar:
            x, y = train.float_images(idx).to(device), train.labels[idx].to(device)
            loss = F.cross_entropy(model(x), y)
            check_finite(loss, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}", refresh=False)
        val_acc = accuracy(eval_mode(model), train, device=device, indices=val_idx)
        row = {"epoch": epoch, "train_loss": total / seen, "val_accuracy": val_acc}
        history.append(row)
        if val_acc > best_acc:  # strictly better: the earliest best epoch wins ties
            best_acc, best_epoch = val_acc, epoch
            best_state = copy.deepcopy(model.state_dict())
        if progress:
            tqdm.write(f"stage 1 epoch {epoch}/{cfg.epochs}: loss {row['train_loss']:.4f}, "
                       f"val acc {val_acc:.4f}{'  *best' if best_epoch == epoch else ''}")
        if on_epoch is not None:
            on_epoch(epoch, row)
    model.load_state_dict(best_state)
    model.eval()
    return StageResult(model, best_epoch, best_acc, history, time.perf_counter() - start)
