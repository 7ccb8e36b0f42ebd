"""Single-stage training (paper §3.3): M, LEP, D and C learn together from the start, and the
decoder's targets -- the SHAP maps of A = M's true-class logit -- are recomputed from the current
A as training goes.

Schedule, with E = ``refresh_every``: before epoch 1 every image's map is computed from the
freshly initialised A (the paper warns these early maps mean little); after epoch e < epochs the
images at positions p with p mod E = (e − 1) mod E are refreshed, so each image's map is at most
E epochs old and an epoch costs N/E maps instead of N. Validation images' maps are refreshed too
(they give ``val_mse``, as in stage 2).

Loss: CE(y, C(m, z)) + CE(y, M(x)) + λ·MSE(r, D(z)). The second term is not in eq. (1): in two
stages A is trained with CE in stage 1, and its true-class logit is what the maps explain;
trained only through C, M's K outputs would be hidden units and "the true class's logit" an
arbitrary one of them. It is logged as ``ce_A`` beside ``ce`` and ``mse``.

The map computation arrives as a function (``explain``): ``train/`` does not import the
explainer; the method table passes the batched engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from impactx_ray.config import RunConfig
from impactx_ray.data import ImageData, map_targets
from impactx_ray.models import ImpactX
from impactx_ray.train.loop import FitHooks, Split, TrainPlan
from impactx_ray.train.losses import impactx_loss
from impactx_ray.train.stage1 import new_backbone
from impactx_ray.train.stage2 import map_mse

# (A, images N×C×H×W on A's device, labels N) -> raw true-class maps N×H×W×C
ExplainFn = Callable[[nn.Module, Tensor, Tensor], np.ndarray]


def due(n: int, epoch: int, every: int) -> Tensor:
    """Positions whose maps are refreshed after ``epoch`` (1-based): p mod E = (epoch − 1) mod E."""
    return torch.arange((epoch - 1) % every, n, every)


def refresh(model: ImpactX, explain: ExplainFn, data: ImageData, targets: Tensor, idx: Tensor, *,
            device: torch.device, chunk: int = 1024) -> float:
    """Recompute the maps of ``idx`` from the current A (= M) into ``targets``; returns seconds."""
    start = time.perf_counter()
    was_training = model.M.training
    model.M.eval()
    for part in idx.split(chunk):  # bounded memory on CIFAR-sized sets
        maps = explain(model.M, data.float_images(part).to(device), data.labels[part])
        targets[part] = map_targets(maps)  # N×H×W×C raw -> N×C×H×W in [-1, 1]
    model.M.train(was_training)
    return time.perf_counter() - start


def single_stage_plan(cfg: RunConfig, split: Split, explain: ExplainFn, device: torch.device,
                      hooks: FitHooks) -> TrainPlan:
    """IMPACTX trained in one stage for ``cfg.epochs`` epochs at ``cfg.lr`` (see the module
    docstring); history rows add ``ce_A``, ``maps_refreshed`` and ``refresh_s`` to stage 2's.
    The fit state carries the targets of the moment, so a resumed fit needs no initial maps."""
    every, train = cfg.refresh_every, split.data
    h, w = train.image_size
    model = ImpactX.from_backbone(new_backbone(cfg, train.num_classes), image_size=(h, w),
                                  channels=int(train.images.shape[1]), freeze=False).to(device)
    if hooks.resume is not None:
        targets = hooks.resume["targets"].clone()
    else:
        targets = torch.empty(len(train), int(train.images.shape[1]), h, w)  # N×C×H×W
        if hooks.progress:
            print(f"single stage: maps of all {len(train)} training images from the initial A, "
                  f"then of 1/{every} of them after each epoch", flush=True)
        seconds = refresh(model, explain, train, targets, torch.arange(len(train)), device=device)
        if hooks.progress:
            print(f"single stage: {len(train)} maps of the initial A in {seconds:.1f} s", flush=True)

    def step(model: ImpactX, x: Tensor, y: Tensor, idx: Tensor):
        m = model.M(x)  # N×K: A's logits, what the maps explain
        z = model.lep(x)
        logits, pred_maps = model.C(torch.cat([m, z], dim=1)), model.decoder(z)
        loss, ce, mse = impactx_loss(logits, y, pred_maps, targets[idx].to(device), cfg.lam)
        ce_a = F.cross_entropy(m, y)
        return loss + ce_a, {"ce": ce, "ce_A": ce_a, "mse": mse}

    def validate(model: ImpactX, epoch: int) -> dict[str, float]:
        row = {"val_mse": map_mse(model, train, targets, split.val_idx, device=device)}
        idx = due(len(train), epoch, every) if epoch < cfg.epochs else torch.arange(0)
        row["maps_refreshed"] = float(len(idx))
        row["refresh_s"] = refresh(model, explain, train, targets, idx, device=device) if len(idx) else 0.0
        return row

    return TrainPlan("single stage", model, step, list(model.parameters()), lr=cfg.lr,
                     epochs=cfg.epochs, validate=validate,
                     extra_state=lambda: {"targets": targets.clone()})
