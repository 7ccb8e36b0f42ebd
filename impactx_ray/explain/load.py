"""Find and load the maps of a run directory or a map store, all or nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from impactx_ray.errors import UserError
from impactx_ray.explain.store import MANIFEST, MapStore, file_sha256


def find_run_store(run_dir: str | Path, checkpoint_hash: str | None = None) -> MapStore:
    """The map store in ``run_dir/maps/`` made from the run's stage-1 checkpoint (or
    ``checkpoint_hash``) with the shap settings in the run's ``config.json``."""
    run_dir = Path(run_dir)
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{run_dir} is not a readable run directory: {e}") from None
    if checkpoint_hash is None:
        stage1 = run_dir / "stage1" / "model.pt"
        if not stage1.is_file():
            raise UserError(f"{stage1} does not exist; run stage 1 before looking for its maps")
        checkpoint_hash = file_sha256(stage1)
    wanted = {"checkpoint_hash": checkpoint_hash, "max_evals": cfg.get("max_evals"),
              "batch_size": cfg.get("shap_batch_size"), "seed": cfg.get("seed"),
              "engine": cfg.get("engine", "batched")}
    if cfg.get("masker"):
        wanted["masker"] = cfg["masker"]
    stores = [MapStore(p.parent) for p in sorted((run_dir / "maps").glob(f"*/{MANIFEST}"))]
    matches = [s for s in stores if all(s.meta.get(k) == v for k, v in wanted.items())]
    if not matches:
        raise UserError(f"no map store in {run_dir / 'maps'} for stage-1 checkpoint "
                        f"{checkpoint_hash[:12]} with max_evals={wanted['max_evals']}; run "
                        f"`impactx explain --out {run_dir}`")
    if len(matches) > 1:
        raise UserError(f"several map stores in {run_dir / 'maps'} fit checkpoint "
                        f"{checkpoint_hash[:12]} ({', '.join(s.path.name for s in matches)}); "
                        "pass the store's path instead")
    return matches[0]


def load_maps(path: str | Path) -> np.ndarray:
    """All maps of a map store or run directory: N×H×W×C float32 in sample order.

    Raises ``UserError`` naming the shards if any map is missing or fails its checksum.
    """
    path = Path(path)
    if (path / MANIFEST).exists():
        store = MapStore(path)
    elif (path / "config.json").exists():
        store = find_run_store(path)
    else:
        raise UserError(f"{path} is neither a map store ({MANIFEST}) nor a run directory "
                        "(config.json)")
    bad = store.missing_shards(verify=True)
    if bad:
        head = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        raise UserError(f"map store {store.path}: {len(bad)} of {store.num_shards} shards missing "
                        f"or corrupt ({head}); rerun `impactx explain` to recompute them")
    return store.load()
