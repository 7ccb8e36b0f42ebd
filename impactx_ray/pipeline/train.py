"""The training step: one method of the table trained through the one loop, with what both
``impactx run`` and a sweep trial check around it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from impactx_ray.checks import constant_map_counts, constant_maps_warning
from impactx_ray.errors import UserError
from impactx_ray.methods import Method, TrainInputs, train_method
from impactx_ray.train import StageResult


def train_step(method: Method, inputs: TrainInputs,
               warn: Callable[[str], None]) -> tuple[StageResult, dict[str, Any]]:
    """``train_method``, after warning about constant maps (a collapsed stage 1 explains
    nothing); a diverged loss becomes one line naming the learning rate it diverged with."""
    if inputs.maps is not None:
        warning = constant_maps_warning([constant_map_counts(inputs.maps)], len(inputs.maps))
        if warning:
            warn(warning)
    try:
        return train_method(method, inputs)
    except FloatingPointError as e:  # a diverged loss: the learning rate, not a bug
        cfg = inputs.cfg
        lr = f"--stage2-lr {cfg.lr2:g}" if method.builds_on_stage1 else f"--lr {cfg.lr:g}"
        raise UserError(f"{method.title} diverged with {lr}: {e}; nothing of this step "
                        "was saved") from None
