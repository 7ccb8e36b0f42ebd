"""The MoRF/LeRF comparison of a sweep cell's winners, as a Ray task: it runs with a trial's
resources (a GPU when trials get one), not in the driver, whose node may have none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from impactx_ray.config import RunConfig
from impactx_ray.data import ImageData
from impactx_ray.defaults import DEFAULT_REPLACEMENTS
from impactx_ray.explain import ExplainSettings
from impactx_ray.methods import METHODS, ModelSpec, load_model


def morf_task(out: str, cfg: dict[str, Any], test: ImageData, impactx_ckpt: Path,
              abn_ckpt: Path | None, n: int,
              replacements: tuple[str, ...] = DEFAULT_REPLACEMENTS) -> dict[str, Any]:
    """MoRF and LeRF of IMPACTX's and ABN's maps, SHAP of each and random, per replacement, and
    the sanity checks, on ``n`` test images; curves, ``morf.json`` and figures written to ``out``;
    returns ``morf.json``'s summary."""
    from impactx_ray.eval.compare import morf_comparison, write_morf
    from impactx_ray.train import resolve_device

    run_cfg = RunConfig.from_dict(cfg)
    spec, device = ModelSpec.of(run_cfg, test), resolve_device("auto")
    abn = load_model(abn_ckpt, spec, METHODS["abn"])[0] if abn_ckpt is not None else None
    impactx = load_model(impactx_ckpt, spec, METHODS["impactx"])[0]
    curves, maps, x, y = morf_comparison(impactx, test, ExplainSettings.from_config(run_cfg),
                                         abn=abn, n=n, seed=run_cfg.seed, device=device,
                                         progress=False, replacements=tuple(replacements))
    return write_morf(Path(out), curves, maps, x, y, test.classes)
