"""Find and load the maps of a run directory or a map store, all or nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from impactx_ray.config import RunConfig
from impactx_ray.defaults import CHECKPOINT_FILE
from impactx_ray.errors import UserError
from impactx_ray.explain.settings import ExplainSettings
from impactx_ray.explain.store import MANIFEST, MapStore
from impactx_ray.io import file_sha256, read_json


def find_run_store(run_dir: str | Path, checkpoint_hash: str | None = None) -> MapStore:
    """The map store in ``run_dir/maps/`` made from the run's stage-1 checkpoint (or
    ``checkpoint_hash``) with the explain settings in the run's ``config.json``."""
    run_dir = Path(run_dir)
    cfg = RunConfig.from_saved(read_json(run_dir / "config.json"))
    if checkpoint_hash is None:
        stage1 = run_dir / "stage1" / CHECKPOINT_FILE
        if not stage1.is_file():
            raise UserError(f"{stage1} does not exist; run stage 1 before looking for its maps")
        checkpoint_hash = file_sha256(stage1)
    return ExplainSettings.from_config(cfg).find_store(run_dir / "maps", checkpoint_hash)


def load_checkpoint_maps(checkpoint_hash: str, settings: ExplainSettings, maps_root: Path,
                         store: Path | None = None) -> np.ndarray:
    """The complete maps of a stage-1 checkpoint: from the store at ``store`` (refused when it
    was built from another checkpoint) or the one under ``maps_root`` that ``settings`` find."""
    if store is None:
        found = settings.find_store(maps_root, checkpoint_hash)
    else:
        found = MapStore(store)
        built_from = str(found.meta.get("checkpoint_hash"))
        if built_from != checkpoint_hash:
            raise UserError(f"map store {store} was built from checkpoint {built_from[:12]}, "
                            f"but the stage-1 checkpoint is {checkpoint_hash[:12]}; "
                            "run `impactx explain` for this checkpoint")
        # The maps' settings are recorded with whatever is trained on them: they must be these.
        for key, value in settings.explainer_kwargs(found.map_shape[:2]).items():
            if found.meta.get(key) != value:
                raise UserError(f"map store {store} was made with {key}={found.meta.get(key)!r}, "
                                f"but this run's settings say {key}={value!r}; pass the store's "
                                "settings (e.g. --max-evals, --masker) or run `impactx explain`")
    if found.missing_shards():
        raise UserError(f"map store {found.path} is incomplete; rerun `impactx explain` to "
                        "finish it (finished shards are kept)")
    return found.load()


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
