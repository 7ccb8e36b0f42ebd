"""The MoRF/LeRF comparison of a sweep cell's winners (the shared comparison step) as a Ray task:
it runs with a trial's resources (a GPU when trials get one), not in the driver, whose node may
have none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from impactx_ray.config import RunConfig
from impactx_ray.data import ImageData
from impactx_ray.defaults import DEFAULT_REPLACEMENTS
from impactx_ray.io import write_json
from impactx_ray.pipeline import compare_maps

MADE_BY = "made_by.json"  # where the task ran, beside morf.json


def morf_task(out: str, cfg: dict[str, Any], test: ImageData, impactx_ckpt: Path,
              abn_ckpt: Path | None, n: int,
              replacements: tuple[str, ...] = DEFAULT_REPLACEMENTS) -> dict[str, Any]:
    """``pipeline.compare_maps`` of the cell's IMPACTX and ABN winners on ``n`` test images,
    written to ``out`` with ``made_by.json`` (the node, host and pid it ran on); returns
    ``morf.json``'s summary."""
    from impactx_ray.explain.actors import here, ray_device

    checkpoints = {"impactx": Path(impactx_ckpt)}
    if abn_ckpt is not None:
        checkpoints["abn"] = Path(abn_ckpt)
    summary = compare_maps(Path(out), RunConfig.from_dict(cfg), test, checkpoints, n=n,
                           replacements=tuple(replacements),
                           device=ray_device(cfg.get("device", "auto"), "the MoRF task"),
                           progress=False)
    write_json(Path(out) / MADE_BY, here())
    return summary
