"""The comparison step: MoRF and LeRF curves of IMPACTX's maps (and ABN's, when trained) beside
SHAP of the same model and random maps, per replacement, with the sanity checks; curves,
``morf.json`` and figures written to one folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from impactx_ray.config import RunConfig
from impactx_ray.data import ImageData
from impactx_ray.defaults import DEFAULT_REPLACEMENTS, MORF_IMAGES
from impactx_ray.errors import UserError
from impactx_ray.explain import ExplainSettings
from impactx_ray.methods import METHODS, ModelSpec, load_model

#: The model whose maps are compared: the paper's two-stage IMPACTX, else single-stage IMPACTX.
IMPACTX_METHODS = ("impactx", "impactx_single")


def impactx_to_compare(checkpoints: dict[str, Path]) -> str:
    """Which IMPACTX of ``checkpoints`` ({method: checkpoint file}; files that do not exist are
    not there) the comparison takes."""
    name = next((m for m in IMPACTX_METHODS if m in checkpoints and checkpoints[m].exists()), None)
    if name is None:
        looked = [str(checkpoints[m]) for m in IMPACTX_METHODS if m in checkpoints]
        raise UserError("the MoRF comparison needs IMPACTX: "
                        + (f"{' and '.join(looked)} do not exist" if looked else
                           f"no checkpoint of {' or '.join(IMPACTX_METHODS)} was given"))
    return name


def compare_maps(out: Path, cfg: RunConfig, test: ImageData, checkpoints: dict[str, Path], *,
                 n: int = MORF_IMAGES, replacements: tuple[str, ...] = DEFAULT_REPLACEMENTS,
                 device: torch.device, progress: bool = True) -> dict[str, Any]:
    """The comparison on ``n`` test images of the IMPACTX in ``checkpoints`` (and of ABN, when
    its file exists); returns ``morf.json``'s summary, which says which IMPACTX was compared."""
    from impactx_ray.eval.compare import morf_comparison, write_morf

    name = impactx_to_compare(checkpoints)
    spec = ModelSpec.of(cfg, test)
    impactx = load_model(checkpoints[name], spec, METHODS[name])[0]
    abn = (load_model(checkpoints["abn"], spec, METHODS["abn"])[0]
           if "abn" in checkpoints and checkpoints["abn"].exists() else None)
    curves, maps, x, y = morf_comparison(impactx, test, ExplainSettings.from_config(cfg), abn=abn,
                                         n=n, seed=cfg.seed, device=device, progress=progress,
                                         replacements=tuple(replacements))
    return write_morf(out, curves, maps, x, y, test.classes, about={"impactx_method": name})
