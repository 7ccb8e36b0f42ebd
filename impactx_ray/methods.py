"""The method table: every classifier impactx-ray trains and compares, described once.

    method    trains                                checkpoint depends on              needs
    baseline  A = Q∘M (stage 1)                     STAGE1_SETTINGS                    the data
    impactx   LEP, D, C around the frozen M         + EXPLAIN_ + STAGE2_SETTINGS        stage-1 model, maps
    impactx_single  M, LEP, D, C together, maps     + EXPLAIN_ + SINGLE_STAGE_SETTINGS  the data (maps made
                    refreshed every E epochs                                          as it trains)
    abn       an attention branch on the backbone   STAGE1_SETTINGS                    the data
    wae       explanation encoder, C around M       + EXPLAIN_SETTINGS + STAGE2_BUDGET  stage-1 model, maps

``impactx run`` and the ``impactx <step>`` commands (through ``runner.py``) and the sweep's
trainable all go through :func:`train_method`, :func:`checkpoint_meta` and :func:`load_model`, so
a checkpoint means the same thing whoever wrote it. A new method is one :func:`register_method`
call: a plan for the one training loop (``train.TrainPlan``: model, step, parameters, epochs) made
from :class:`TrainInputs`, and a builder of its untrained model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from impactx_ray.config import (
    EXPLAIN_SETTINGS,
    SINGLE_STAGE_SETTINGS,
    STAGE1_SETTINGS,
    STAGE2_BUDGET,
    STAGE2_SETTINGS,
    RunConfig,
)
from impactx_ray.data import ImageData
from impactx_ray.errors import UserError
from impactx_ray.io import file_sha256
from impactx_ray.models import ABN, WAE, Backbone, ImpactX, create_backbone
from impactx_ray.train import (
    FitHooks,
    Split,
    StageResult,
    TrainPlan,
    abn_plan,
    stage1_plan,
    stage2_plan,
    train,
    wae_plan,
)
from impactx_ray.train.checkpoint import check_meta, load_checkpoint, load_into


@dataclass(frozen=True)
class ModelSpec:
    """What rebuilding a model for a checkpoint needs besides the checkpoint's own meta."""

    model: str
    num_classes: int
    input_size: int | None = None

    @classmethod
    def of(cls, cfg: RunConfig, data: ImageData) -> ModelSpec:
        return cls(cfg.model, data.num_classes, cfg.input_size)

    def backbone(self) -> Backbone:
        """An untrained backbone of this shape (weights come from the checkpoint)."""
        return create_backbone(self.model, self.num_classes, pretrained=False,
                               input_size=self.input_size)


@dataclass
class TrainInputs:
    """Everything a method's training reads. ``stage1``/``maps`` only for methods built on the
    stage-1 model."""

    cfg: RunConfig
    split: Split                      # the training set: train and validation rows
    device: torch.device
    hooks: FitHooks = field(default_factory=FitHooks)  # progress, per-epoch callbacks, resume
    stage1: Path | None = None        # the stage-1 checkpoint (M, frozen)
    maps: np.ndarray | None = None    # its SHAP maps of the training set, N×H×W×C

    @property
    def data(self) -> ImageData:
        return self.split.data


@dataclass(frozen=True)
class Method:
    name: str                         # --method value, checkpoint kind, result.json prefix
    title: str                        # how tables and the CLI print it
    directory: str                    # its folder in a run directory
    settings: tuple[str, ...]         # RunConfig fields its checkpoint depends on (and records)
    builds_on_stage1: bool            # around the frozen stage-1 model, with stage 2's budget
    needs_maps: bool                  # trained on the stage-1 model's SHAP maps
    plan: Callable[[TrainInputs, Backbone | None], TrainPlan]  # the stage-1 model when it builds on it
    build: Callable[[ModelSpec, dict[str, Any]], nn.Module]  # untrained, shaped as the meta says
    meta: tuple[tuple[str, Any], ...] = ()  # fixed facts its checkpoints record (how to build them)

    def epochs(self, cfg: RunConfig) -> int:
        return cfg.epochs2 if self.builds_on_stage1 else cfg.epochs


METHODS: dict[str, Method] = {}
# Checkpoint kinds written before the method table (runner and sweep of 2026-11).
LEGACY_KINDS = {"stage1": "baseline", "stage2": "impactx"}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; use one of {', '.join(METHODS)}")
    return METHODS[name]


# -- the table ------------------------------------------------------------------------------------
def _plan_baseline(i: TrainInputs, _: None) -> TrainPlan:
    return stage1_plan(i.cfg, i.data.num_classes, i.device)


def _plan_impactx(i: TrainInputs, m: Backbone) -> TrainPlan:
    return stage2_plan(i.cfg, m, i.split, i.maps, i.device)


def _plan_abn(i: TrainInputs, _: None) -> TrainPlan:
    return abn_plan(i.cfg, i.data.num_classes, i.device)


def _plan_wae(i: TrainInputs, m: Backbone) -> TrainPlan:
    return wae_plan(i.cfg, m, i.split, i.maps, i.device)


def _plan_single_stage(i: TrainInputs, _: None) -> TrainPlan:
    from impactx_ray.explain import ExplainSettings, explain_true_class
    from impactx_ray.train.single_stage import single_stage_plan

    kwargs = ExplainSettings.from_config(i.cfg).explainer_kwargs(i.data.image_size)

    def maps_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        return explain_true_class(model, x, y, progress=i.hooks.progress, **kwargs)  # a bar per refresh

    return single_stage_plan(i.cfg, i.split, maps_of, i.device, i.hooks)


def _build_baseline(spec: ModelSpec, meta: dict[str, Any]) -> nn.Module:
    return spec.backbone()


# Checkpoints of IMPACTX record the LEP they hold; those without it kept LeNet-5's FC120 → FC84.
LEP_META = ("lep", "fc-layers-replaced")


def _build_impactx(spec: ModelSpec, meta: dict[str, Any]) -> nn.Module:
    return ImpactX.from_backbone(spec.backbone(), image_size=tuple(meta["image_size"]),
                                 channels=meta["channels"],
                                 lep_keeps_fc=meta.get(LEP_META[0]) != LEP_META[1])


def _build_single_stage(spec: ModelSpec, meta: dict[str, Any]) -> nn.Module:
    return ImpactX.from_backbone(spec.backbone(), image_size=tuple(meta["image_size"]),
                                 channels=meta["channels"], freeze=False)


def _build_abn(spec: ModelSpec, meta: dict[str, Any]) -> nn.Module:
    return ABN(spec.backbone())


def _build_wae(spec: ModelSpec, meta: dict[str, Any]) -> nn.Module:
    # zeros stand in for the class means: the checkpoint's buffer replaces them
    means = torch.zeros(spec.num_classes, meta["channels"], *meta["image_size"])  # K×C×H×W
    return WAE.from_backbone(spec.backbone(), means)


BASELINE = register_method(Method("baseline", "baseline (A)", "stage1", STAGE1_SETTINGS,
                                  builds_on_stage1=False, needs_maps=False, plan=_plan_baseline,
                                  build=_build_baseline))
register_method(Method("impactx", "IMPACTX", "stage2",
                       STAGE1_SETTINGS + EXPLAIN_SETTINGS + STAGE2_SETTINGS,
                       builds_on_stage1=True, needs_maps=True, plan=_plan_impactx,
                       build=_build_impactx, meta=(LEP_META,)))
register_method(Method("abn", "ABN", "abn", STAGE1_SETTINGS, builds_on_stage1=False,
                       needs_maps=False, plan=_plan_abn, build=_build_abn))
register_method(Method("wae", "WAE", "wae", STAGE1_SETTINGS + EXPLAIN_SETTINGS + STAGE2_BUDGET,
                       builds_on_stage1=True, needs_maps=True, plan=_plan_wae, build=_build_wae))
register_method(Method("impactx_single", "IMPACTX single-stage", "single_stage",
                       STAGE1_SETTINGS + EXPLAIN_SETTINGS + SINGLE_STAGE_SETTINGS,
                       builds_on_stage1=False, needs_maps=False, plan=_plan_single_stage,
                       build=_build_single_stage, meta=(LEP_META,)))


# -- checkpoints ----------------------------------------------------------------------------------
def checkpoint_meta(method: Method, cfg: RunConfig, data: ImageData, *,
                    stage1_hash: str | None = None,
                    result: StageResult | None = None) -> dict[str, Any]:
    """The meta every checkpoint of ``method`` carries: what it is, what it was made from (the
    settings it depends on, the stage-1 checkpoint's hash) and, once trained, how it did."""
    if method.builds_on_stage1 and stage1_hash is None:
        raise ValueError(f"{method.name} is built on a stage-1 model: pass its stage1_hash")
    meta: dict[str, Any] = {"kind": method.name, "model": cfg.model,
                            "num_classes": data.num_classes, "classes": list(data.classes),
                            "image_size": list(data.image_size),
                            "channels": int(data.images.shape[1]),
                            "config": cfg.subset(method.settings), **dict(method.meta)}
    if stage1_hash is not None:
        meta["stage1_hash"] = stage1_hash
    if result is not None:
        meta.update(best_epoch=result.best_epoch, val_accuracy=result.best_val_accuracy,
                    seconds=result.seconds)
    return meta


def load_model(path: str | Path, spec: ModelSpec, method: Method | None = None
               ) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, meta) of a checkpoint of ``method`` (any method when None).

    UserError, on one line, when the file is unreadable or holds another method, model or class
    count. Old checkpoints (kinds ``stage1``/``stage2``) read as ``baseline``/``impactx``.
    """
    state, meta = load_checkpoint(path)
    kind = LEGACY_KINDS.get(meta.get("kind"), meta.get("kind"))
    if method is not None and kind != method.name:
        raise UserError(f"checkpoint {path} holds {kind!r}, but this step needs a {method.name!r} "
                        "checkpoint; point at the matching checkpoint or redo the stage")
    check_meta(path, meta, {"model": spec.model, "num_classes": spec.num_classes})
    owner = get_method(kind)
    model = load_into(owner.build(spec, meta), state, path, f"{owner.title} on {spec.model}")
    return model, {**meta, "kind": kind}


def load_stage1(path: str | Path, spec: ModelSpec) -> Backbone:
    """The stage-1 model of a checkpoint; module-level and argument-only so that Ray can ship
    ``partial(load_stage1, path, spec)`` to map workers, each of which loads it once."""
    return load_model(path, spec, BASELINE)[0]  # type: ignore[return-value]


# -- training -------------------------------------------------------------------------------------
def train_method(method: Method, inputs: TrainInputs) -> tuple[StageResult, dict[str, Any]]:
    """Train ``method`` through the one loop and return (result, its checkpoint meta); nothing is
    written here."""
    stage1, stage1_hash = None, None
    if method.builds_on_stage1:
        if inputs.stage1 is None:
            raise ValueError(f"{method.name} needs the stage-1 checkpoint (TrainInputs.stage1)")
        stage1_hash = file_sha256(inputs.stage1)
        spec = ModelSpec.of(inputs.cfg, inputs.data)
        stage1 = load_stage1(inputs.stage1, spec).to(inputs.device).eval()
    if method.needs_maps and inputs.maps is None:
        raise ValueError(f"{method.name} needs the stage-1 model's SHAP maps (TrainInputs.maps)")
    cfg = inputs.cfg
    result = train(lambda: method.plan(inputs, stage1), inputs.split, seed=cfg.seed,
                   batch_size=cfg.batch_size, device=inputs.device, hooks=inputs.hooks)
    return result, checkpoint_meta(method, inputs.cfg, inputs.data, stage1_hash=stage1_hash,
                                   result=result)
