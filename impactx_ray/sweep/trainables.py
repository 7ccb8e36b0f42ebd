"""Thin Tune trainables around the pure training functions (stage 1, stage 2, ABN/WAE).

A trial's ``config`` is a flat dict: every ``RunConfig`` field, plus (stage 2) the paths of the
stage-1 winner's checkpoint and its map store. Each epoch is reported to Tune; the last report
adds the best validation accuracy, the test accuracy and the best model as a Tune checkpoint.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from ray import tune

from impactx_ray.config import EXPLAIN_KEYS, STAGE1_KEYS, STAGE2_KEYS, RunConfig
from impactx_ray.data import load_dataset, train_val_split
from impactx_ray.explain import file_sha256, load_maps
from impactx_ray.train import train_stage1, train_stage2
from impactx_ray.train.checkpoint import save_checkpoint
from impactx_ray.train.loop import accuracy, eval_mode, resolve_device
from impactx_ray.train.stage1 import StageResult, load_backbone

# Trial config entries that are not RunConfig fields.
STAGE1_CHECKPOINT, MAPS, CPUS, METHOD = "stage1_checkpoint", "maps", "cpus_per_trial", "method"
EXTRA_KEYS = (STAGE1_CHECKPOINT, MAPS, CPUS, METHOD)


def run_config(config: dict[str, Any]) -> RunConfig:
    return RunConfig.from_dict({k: v for k, v in config.items() if k not in EXTRA_KEYS})


def _setup(config: dict[str, Any]):
    cfg = run_config(config)
    torch.set_num_threads(max(1, int(config.get(CPUS, 1))))
    train, test = load_dataset(cfg.dataset, cfg.data_root, image_size=cfg.image_size)
    tr, va = train_val_split(len(train), cfg.val_fraction, seed=cfg.seed)
    return cfg, resolve_device(cfg.device), train, test, torch.as_tensor(tr), torch.as_tensor(va)


def _report_epoch(cfg_epochs: int):
    """An ``on_epoch`` that reports every epoch but the last (that one goes with the checkpoint),
    with the best validation accuracy so far (the metric Tune selects on)."""
    best = [float("-inf")]

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        best[0] = max(best[0], row["val_accuracy"])
        if epoch < cfg_epochs:
            tune.report({**row, "best_val_accuracy": best[0]})
    return on_epoch


def _final_report(result: StageResult, test_accuracy: float, meta: dict[str, Any]) -> None:
    metrics = {**result.history[-1], "best_val_accuracy": result.best_val_accuracy,
               "best_epoch": result.best_epoch, "test_accuracy": test_accuracy,
               "train_seconds": result.seconds}
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / "model.pt", result.model.state_dict(),
                        {**meta, "best_epoch": result.best_epoch,
                         "val_accuracy": result.best_val_accuracy, "seconds": result.seconds})
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def stage1_trainable(config: dict[str, Any]) -> None:
    """Train A for one grid point of Table 1."""
    cfg, device, train, test, tr, va = _setup(config)
    result = train_stage1(cfg, train, tr, va, device=device, on_epoch=_report_epoch(cfg.epochs),
                          progress=False)
    test_acc = accuracy(eval_mode(result.model), test, device=device)
    meta = {"kind": "stage1", "model": cfg.model, "num_classes": train.num_classes,
            "config": cfg.subset(STAGE1_KEYS)}
    _final_report(result, test_acc, meta)


def stage2_trainable(config: dict[str, Any]) -> None:
    """Train IMPACTX for one λ on the stage-1 winner (M frozen) and the shared map store."""
    cfg, device, train, test, tr, va = _setup(config)
    ckpt = Path(config[STAGE1_CHECKPOINT])
    backbone = load_backbone(ckpt, model=cfg.model, num_classes=train.num_classes,
                             input_size=cfg.input_size).to(device)
    maps = load_maps(config[MAPS])  # read from the shared store: computed once per winner
    result = train_stage2(cfg, backbone, train, maps, tr, va, device=device,
                          on_epoch=_report_epoch(cfg.epochs2), progress=False)
    test_acc = accuracy(eval_mode(result.model), test, device=device)
    meta = {"kind": "stage2", "model": cfg.model, "num_classes": train.num_classes,
            "stage1_hash": file_sha256(ckpt), "image_size": list(train.image_size),
            "channels": int(maps.shape[-1]),
            "config": cfg.subset(STAGE1_KEYS + EXPLAIN_KEYS + STAGE2_KEYS)}
    _final_report(result, test_acc, meta)


def comparison_trainable(config: dict[str, Any]) -> None:
    """ABN or WAE (``config["method"]``) with the stage-1 winner's hyperparameters."""
    from impactx_ray.train.baselines import train_abn, train_wae

    method = config[METHOD]
    cfg, device, train, test, tr, va = _setup(config)
    meta = {"kind": method, "model": cfg.model, "num_classes": train.num_classes}
    if method == "abn":
        result = train_abn(cfg, train, tr, va, device=device,
                           on_epoch=_report_epoch(cfg.epochs), progress=False)
    else:
        ckpt = Path(config[STAGE1_CHECKPOINT])
        backbone = load_backbone(ckpt, model=cfg.model, num_classes=train.num_classes,
                                 input_size=cfg.input_size).to(device)
        maps = load_maps(config[MAPS])
        result = train_wae(cfg, backbone, train, maps, tr, va, device=device,
                           on_epoch=_report_epoch(cfg.epochs2), progress=False)
        meta.update(stage1_hash=file_sha256(ckpt), image_size=list(train.image_size),
                    channels=int(maps.shape[-1]))
    test_acc = accuracy(eval_mode(result.model), test, device=device)
    _final_report(result, test_acc, meta)
