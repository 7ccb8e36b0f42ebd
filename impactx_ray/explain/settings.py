"""One explain-settings object: what, besides the model and the images, decides a SHAP map, and
so which map store holds it.

Every caller -- ``impactx explain``/``stage2``, the runner, the sweep, the Ray workers and
``load_maps`` -- builds an :class:`ExplainSettings` (``from_config`` for a RunConfig) and asks it for
the store's meta, its path and the store itself, so a store is identified one way everywhere:

    meta = {checkpoint_hash, data_fingerprint, masker, max_evals, batch_size, seed, engine,
            shap_version} (+ precision, when not fp32)
    path = <maps root>/<sha256(meta as sorted JSON)[:16]>

``precision`` changes the maps (bf16/fp16 forwards), so a reduced-precision store has its own key;
fp32 is left out of the meta so that every store made before precisions existed keeps its key.
``compile`` changes only how fast the maps come (compiled and eager forwards differ by float
rounding, like two forward batch sizes), so it is no part of a store's identity.

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
from impactx_ray.defaults import MAX_EVALS, SHAP_BATCH_SIZE
from impactx_ray.errors import UserError, is_int
from impactx_ray.explain.forward import DEFAULT_COMPILE, DEFAULT_PRECISION, check_compile, check_precision
from impactx_ray.explain.shap_maps import DEFAULT_ENGINE, check_engine, check_max_evals, default_masker, validate_masker
from impactx_ray.explain.store import MANIFEST, MapStore

#: Settings that decide how maps are computed but not what they are: not in a store's meta.
RUN_ONLY = ("compile",)


@dataclass(frozen=True)
class ExplainSettings:
    """The SHAP settings of a map: masker, evaluations, shap's batch size, tie-break seed, engine,
    the forward's precision; and whether the engine may compile the forward (run-only)."""

    masker: str | None = None          # None: default_masker(H, W), a blur a quarter of the image wide
    max_evals: int = MAX_EVALS         # model evaluations per map (paper: 2000)
    batch_size: int = SHAP_BATCH_SIZE  # shap's explainer batch_size (maps depend on it)
    seed: int = 0                      # seeds shap's random tie-breaking, per image
    engine: str = DEFAULT_ENGINE       # "batched" (exact, fast) or "shap" (the reference)
    precision: str = DEFAULT_PRECISION  # forward precision: fp32 (shap-exact), bf16 or fp16
    compile: str = DEFAULT_COMPILE     # torch.compile the batched engine's forward: auto, on, off

    def __post_init__(self) -> None:
        if self.masker is not None:
            validate_masker(self.masker)
        check_max_evals(self.max_evals)
        if not is_int(self.batch_size, 1):
            raise UserError(f"batch_size={self.batch_size!r} is invalid; use an int >= 1")
        if not is_int(self.seed):
            raise UserError(f"seed={self.seed!r} is invalid; use an int")
        check_engine(self.engine)
        check_precision(self.precision)
        check_compile(self.compile)

    @classmethod
    def from_config(cls, cfg: Any) -> ExplainSettings:
        """The settings of a ``RunConfig`` (its ``shap_batch_size`` is shap's ``batch_size``)."""
        return cls(masker=cfg.masker, max_evals=cfg.max_evals, batch_size=cfg.shap_batch_size,
                   seed=cfg.seed, engine=cfg.engine, precision=cfg.precision, compile=cfg.compile)

    def resolved(self, image_size: tuple[int, int]) -> ExplainSettings:
        """The same settings with the default masker made explicit for H×W images."""
        h, w = image_size
        return dataclasses.replace(self, masker=self.masker or default_masker(h, w))

    def explainer_kwargs(self, image_size: tuple[int, int]) -> dict[str, Any]:
        """Keyword arguments of ``TrueClassExplainer``/``explain_true_class``/``compute_store``."""
        return dataclasses.asdict(self.resolved(image_size))

    def identity(self, image_size: tuple[int, int]) -> dict[str, Any]:
        """The settings that decide the maps, as a store's meta records them (fp32 left out)."""
        kwargs = {k: v for k, v in self.explainer_kwargs(image_size).items() if k not in RUN_ONLY}
        if kwargs["precision"] == DEFAULT_PRECISION:
            del kwargs["precision"]
        return kwargs

    @staticmethod
    def recorded(meta: dict[str, Any], key: str) -> Any:
        """``meta[key]`` of a store, with the value a store without it was made with."""
        return meta.get(key, DEFAULT_PRECISION) if key == "precision" else meta.get(key)

    # -- the map store --------------------------------------------------------------------------
    def store_meta(self, checkpoint_hash: str, data_fingerprint: str,
                   image_size: tuple[int, int]) -> dict[str, Any]:
        """The meta a store of these settings records (``MapStore`` refuses any other)."""
        import shap  # the version is part of a map's provenance

        return {"checkpoint_hash": checkpoint_hash, "data_fingerprint": data_fingerprint,
                **self.identity(image_size), "shap_version": shap.__version__}

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
        wanted = {"checkpoint_hash": checkpoint_hash, "precision": self.precision, **self.identity((h, w))}
        if data_fingerprint is not None:
            wanted["data_fingerprint"] = data_fingerprint
        return all(self.recorded(store.meta, k) == v for k, v in wanted.items())

    def find_store(self, maps_root: str | Path, checkpoint_hash: str,
                   data_fingerprint: str | None = None) -> MapStore:
        """The one store under ``maps_root`` that :meth:`matches`; UserError if none or several."""
        root = Path(maps_root)
        stores = [MapStore(p.parent) for p in sorted(root.glob(f"*/{MANIFEST}"))]
        found = [s for s in stores if self.matches(s, checkpoint_hash, data_fingerprint)]
        if not found:
            raise UserError(f"no map store in {root} for stage-1 checkpoint {checkpoint_hash[:12]} "
                            f"with max_evals={self.max_evals}, engine={self.engine}, "
                            f"precision={self.precision}; run "
                            "`impactx explain` for it first")
        if len(found) > 1:
            raise UserError(f"several map stores in {root} fit checkpoint {checkpoint_hash[:12]} "
                            f"({', '.join(s.path.name for s in found)}); pass the store's path "
                            "with --maps")
        return found[0]
