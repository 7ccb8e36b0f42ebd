"""One explain-settings object: what, besides the model and the images, decides a SHAP map, and
so which map store holds it.

Every caller -- ``impactx explain``/``stage2``, the runner, the sweep, the Ray workers and
``load_maps`` -- builds an :class:`ExplainSettings` (``from_config`` for a RunConfig) and asks it for
the store's meta, its path and the store itself, so a store is identified one way everywhere:

    meta = {checkpoint_hash, data_fingerprint, masker, max_evals, batch_size, seed, engine,
            shap_version}
    path = <maps root>/<sha256(meta as sorted JSON)[:16]>

``find_store`` also accepts stores at other paths under the same root whose meta matches
(sweeps before this scheme named them by checkpoint hash), so old run directories still load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from impactx_ray.data import ImageData, dataset_fingerprint
from impactx_ray.errors import UserError
from impactx_ray.explain.shap_maps import (DEFAULT_ENGINE, DEFAULT_MAX_EVALS, MIN_MAX_EVALS,
                                           check_engine, default_masker, validate_masker)
from impactx_ray.explain.store import MANIFEST, MapStore

DEFAULT_SHAP_BATCH_SIZE = 100


@dataclass(frozen=True)
class ExplainSettings:
    """The SHAP settings of a map: masker, evaluations, shap's batch size, tie-break seed, engine."""

    masker: str | None = None          # None: default_masker(H, W), a blur a quarter of the image wide
    max_evals: int = DEFAULT_MAX_EVALS  # model evaluations per map (paper: 2000)
    batch_size: int = DEFAULT_SHAP_BATCH_SIZE  # shap's explainer batch_size (maps depend on it)
    seed: int = 0                      # seeds shap's random tie-breaking, per image
    engine: str = DEFAULT_ENGINE       # "batched" (exact, fast) or "shap" (the reference)

    def __post_init__(self) -> None:
        if self.masker is not None:
            validate_masker(self.masker)
        for name, value, minimum in (("max_evals", self.max_evals, MIN_MAX_EVALS),
                                     ("batch_size", self.batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise UserError(f"{name}={value!r} is invalid; use an int >= {minimum}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UserError(f"seed={self.seed!r} is invalid; use an int")
        check_engine(self.engine)

    @classmethod
    def from_config(cls, cfg: Any) -> ExplainSettings:
        """The settings of a ``RunConfig`` (its ``shap_batch_size`` is shap's ``batch_size``)."""
        return cls(masker=cfg.masker, max_evals=cfg.max_evals, batch_size=cfg.shap_batch_size,
                   seed=cfg.seed, engine=cfg.engine)

    def resolved(self, image_size: tuple[int, int]) -> ExplainSettings:
        """The same settings with the default masker made explicit for H×W images."""
        h, w = image_size
        return dataclasses.replace(self, masker=self.masker or default_masker(h, w))

    def explainer_kwargs(self, image_size: tuple[int, int]) -> dict[str, Any]:
        """Keyword arguments of ``TrueClassExplainer``/``explain_true_class``/``compute_store``."""
        return dataclasses.asdict(self.resolved(image_size))

    # -- the map store --------------------------------------------------------------------------
    def store_meta(self, checkpoint_hash: str, data_fingerprint: str,
                   image_size: tuple[int, int]) -> dict[str, Any]:
        """The meta a store of these settings records (``MapStore`` refuses any other)."""
        import shap  # the version is part of a map's provenance

        return {"checkpoint_hash": checkpoint_hash, "data_fingerprint": data_fingerprint,
                **self.explainer_kwargs(image_size), "shap_version": shap.__version__}

    @staticmethod
    def store_key(meta: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]

    def store_path(self, maps_root: str | Path, checkpoint_hash: str, data: ImageData) -> Path:
        meta = self.store_meta(checkpoint_hash, dataset_fingerprint(data), data.image_size)
        return Path(maps_root) / self.store_key(meta)

    def open_store(self, maps_root: str | Path, checkpoint_hash: str, data: ImageData) -> MapStore:
        """The store of the maps of ``data`` under the checkpoint: the existing one (resumed shard
        by shard), or a new, empty one at :meth:`store_path`."""
        fingerprint = dataset_fingerprint(data)
        try:
            return self.find_store(maps_root, checkpoint_hash, fingerprint)
        except UserError:
            pass
        meta = self.store_meta(checkpoint_hash, fingerprint, data.image_size)
        h, w = data.image_size
        return MapStore.create_or_open(Path(maps_root) / self.store_key(meta), meta=meta,
                                       num_maps=len(data), map_shape=(h, w, data.images.shape[1]))

    def matches(self, store: MapStore, checkpoint_hash: str,
                data_fingerprint: str | None = None) -> bool:
        """Whether ``store`` holds maps of the checkpoint with these settings (and of the data
        with ``data_fingerprint``, when given)."""
        h, w, _ = store.map_shape
        wanted = {"checkpoint_hash": checkpoint_hash, **self.explainer_kwargs((h, w))}
        if data_fingerprint is not None:
            wanted["data_fingerprint"] = data_fingerprint
        return all(store.meta.get(k) == v for k, v in wanted.items())

    def find_store(self, maps_root: str | Path, checkpoint_hash: str,
                   data_fingerprint: str | None = None) -> MapStore:
        """The one store under ``maps_root`` that :meth:`matches`; UserError if none or several."""
        root = Path(maps_root)
        stores = [MapStore(p.parent) for p in sorted(root.glob(f"*/{MANIFEST}"))]
        found = [s for s in stores if self.matches(s, checkpoint_hash, data_fingerprint)]
        if not found:
            raise UserError(f"no map store in {root} for stage-1 checkpoint {checkpoint_hash[:12]} "
                            f"with max_evals={self.max_evals}, engine={self.engine}; run "
                            "`impactx explain` for it first")
        if len(found) > 1:
            raise UserError(f"several map stores in {root} fit checkpoint {checkpoint_hash[:12]} "
                            f"({', '.join(s.path.name for s in found)}); pass the store's path "
                            "with --maps")
        return found[0]
