"""A sweep's options: what ``sweeps/full_grid.py`` asks for, validated before Ray starts."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from impactx_ray.config import RunConfig
from impactx_ray.defaults import DEFAULT_REPLACEMENTS, SWEEP_MORF_IMAGES
from impactx_ray.errors import UserError
from impactx_ray.eval.road import REPLACEMENTS
from impactx_ray.sweep.search import SearchSpec
from impactx_ray.sweep.spaces import COMPARABLE_METHODS, COMPARISON_METHODS, Cell


@dataclass
class SweepOptions:
    out: Path
    cells: list[Cell]
    base: dict[str, Any]                  # RunConfig fields shared by every trial
    smoke: bool = False
    full_stage2: bool = False
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    map_workers: int | None = None        # None: one per GPU in (or that may join) the cluster,
    gpus_per_map_worker: float | None = None  # else one per CPU; None: 1 where GPUs are
    morf_images: int = SWEEP_MORF_IMAGES  # test images for MoRF (0: skip MoRF)
    replacements: tuple[str, ...] = DEFAULT_REPLACEMENTS  # what replaces removed regions
    comparison: tuple[str, ...] = COMPARISON_METHODS     # methods on the stage-1 winner's settings
    max_failures: int = 0
    name: str | None = None               # the sweep's name (default: from --out)
    restart: bool = False                 # start afresh, the old results kept aside
    strict: bool = False                  # refuse unreadable image files (default: skip, warn)
    tracking_outage_limit: float = 10.0   # minutes MLflow may stay unreachable before a stop
    search: SearchSpec = field(default_factory=SearchSpec)  # grid (the paper's) or optuna, ±asha
    log: Callable[[str], None] = field(default=print)

    def settings(self) -> dict[str, Any]:
        """What decides the sweep's results: a resumed sweep must be asked for the same."""
        # recorded only when not the default, so sweeps started before these options resume
        chosen = {k: list(v) for k, v, default in (
            ("replacements", self.replacements, DEFAULT_REPLACEMENTS),
            ("comparison", self.comparison, COMPARISON_METHODS)) if tuple(v) != default}
        return json.loads(json.dumps({
            "cells": [c.name for c in self.cells], "smoke": self.smoke,
            "full_stage2": self.full_stage2, "morf_images": self.morf_images, **self.base,
            **self.search.settings(), **chosen}))

    @property
    def small_spaces(self) -> bool:
        """--smoke shrinks the grids to a few points; a sampled search keeps Table 1's space
        (its budget is --num-samples)."""
        return self.smoke and self.search.search == "grid"


def options_from(out: Path, cells: list[Cell], **kw: Any) -> SweepOptions:
    """SweepOptions with a validated base RunConfig (bad values fail before Ray starts)."""
    names = {f.name for f in dataclasses.fields(SweepOptions)}
    base = {k: v for k, v in kw.items() if k not in names}
    for cell in cells:
        RunConfig.from_dict({**base, "model": cell.model, "dataset": cell.dataset})
    for flag, key, minimum in (("--cpus-per-trial", "cpus_per_trial", 1e-9),
                               ("--gpus-per-trial", "gpus_per_trial", 0.0),
                               ("--map-workers", "map_workers", 1),
                               ("--gpus-per-map-worker", "gpus_per_map_worker", 0.0),
                               ("--max-failures", "max_failures", 0),
                               ("--morf-images", "morf_images", 0),
                               ("--tracking-outage-limit", "tracking_outage_limit", 0.0)):
        value = kw.get(key)
        if value is not None and value < minimum:
            raise UserError(f"{flag} must be >= {minimum:g}, got {value!r}")
    for flag, key, allowed in (("--comparison", "comparison", tuple(COMPARABLE_METHODS)),
                               ("--replacement", "replacements", REPLACEMENTS)):
        for value in kw.get(key) or ():
            if value not in allowed:
                raise UserError(f"{flag}: unknown {value!r}; use one or more of "
                                f"{', '.join(allowed)}")
        if key in kw and not kw[key]:
            raise UserError(f"{flag} needs at least one of {', '.join(allowed)}")
        if key in kw:
            kw[key] = tuple(dict.fromkeys(kw[key]))  # in the order asked, once each
    return SweepOptions(out=out, cells=cells, base=base, **{k: v for k, v in kw.items()
                                                           if k in names})
