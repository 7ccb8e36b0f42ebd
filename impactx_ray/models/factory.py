"""Build a backbone by name: a registered one (LeNet-5, the paper's timm models) or any timm name.

The registry (``registry.py``) only holds factories; this module imports the modules that
register them, so the import graph stays one-way: registry ← lenet5, timm_backbones ← factory.
"""

from __future__ import annotations

from pathlib import Path

import timm

from impactx_ray.errors import UserError, is_int
from impactx_ray.models import lenet5 as _lenet5  # noqa: F401  (registers "lenet5")
from impactx_ray.models.registry import _DEFAULT_PRETRAINED, BACKBONES, Backbone, list_backbones
from impactx_ray.models.timm_backbones import create_timm_backbone


def check_backbone_name(name: str) -> None:
    """Raise UserError unless ``name`` is registered or a timm model name."""
    # timm.is_model accepts 'arch' and 'arch.pretrained_tag'
    if isinstance(name, str) and (name in BACKBONES or timm.is_model(name)):
        return
    raise UserError(
        f"unknown backbone {name!r}; use one of {', '.join(list_backbones())} "
        "or a timm model name (see timm.list_models())"
    )


def default_pretrained(name: str) -> bool:
    """True for the timm backbones (the paper fine-tunes ImageNet / Noisy Student weights), False for lenet5."""
    check_backbone_name(name)
    return _DEFAULT_PRETRAINED.get(name, True)


def resolve_weights(name: str, weights: str | Path | None) -> Path | None:
    """The weights path as a Path, or UserError naming it when it is not a readable file."""
    if weights is None:
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(
            f"weights file {str(path)!r} for backbone {name!r} does not exist; "
            "pass --weights with an existing state-dict file, or --no-pretrained"
        )
    return path


def create_backbone(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    weights: str | Path | None = None,
    input_size: int | None = None,
) -> Backbone:
    """Build a backbone by name.

    ``weights=PATH`` loads that local state dict (and implies ``pretrained``); ``pretrained=True``
    without it fetches timm's published weights, raising UserError when they cannot be had -- the
    model is never silently left at random initialisation. ``input_size`` (square side in pixels)
    overrides the size images are resized to; None keeps the model's own.
    """
    check_backbone_name(name)
    if not is_int(num_classes, 1):
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    if input_size is not None and not is_int(input_size, 8):
        raise UserError(f"input_size must be an integer >= 8 pixels, got {input_size!r}; or leave it unset")
    path = resolve_weights(name, weights)
    if name in BACKBONES:
        return BACKBONES[name](num_classes, bool(pretrained), path, input_size)
    return create_timm_backbone(name, num_classes, bool(pretrained), path, input_size)
