"""One IMPACTX run on a run directory: stage 1 → SHAP maps → stage 2 → test accuracies.

Layout of ``<out>``::

    config.json            the RunConfig every step reads (sub-commands may override parts of it)
    stage1/model.pt        A = Q∘M with the best validation accuracy, + stage1/history.json
    maps/<key>/            map store of that checkpoint (key = hash of checkpoint + shap settings)
    stage2/model.pt        IMPACTX (M frozen, LEP, D, C), + stage2/history.json
    abn/model.pt           ABN (``--method abn``), wae/model.pt: WAE (``--method wae``)
    morf/                  MoRF curves, AOPC and figures (``evaluate --morf``)
    result.json            test accuracies of A and IMPACTX, hyperparameters, timings
    timings.json           seconds per step and maps/s, merged across commands

Every step validates its inputs before writing anything, reuses finished work (a rerun of ``run``
skips stages whose outputs match the config, and the map store resumes shard by shard), and never
overwrites a finished artifact: a redone checkpoint moves the old one aside.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from impactx_ray.config import EXPLAIN_KEYS, STAGE1_KEYS, STAGE2_KEYS, RunConfig
from impactx_ray.data import ImageData, dataset_fingerprint, load_dataset, train_val_split
from impactx_ray.errors import UserError
from impactx_ray.explain import (MapStore, compute_store, default_masker, file_sha256, make_meta,
                                 validate_masker)
from impactx_ray.models import Backbone
from impactx_ray.train import train_stage1, train_stage2
from impactx_ray.train.stage1 import load_backbone
from impactx_ray.train.stage2 import load_impactx
from impactx_ray.train.baselines import load_abn, load_wae, train_abn, train_wae
from impactx_ray.eval.compare import METHODS, morf_comparison, write_morf
from impactx_ray.train.checkpoint import load_checkpoint, save_checkpoint
from impactx_ray.train.loop import accuracy, eval_mode, resolve_device


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; run `impactx run --out {path.parent}` first") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


@dataclass
class RunDir:
    root: Path

    @property
    def config(self) -> Path: return self.root / "config.json"
    @property
    def stage1(self) -> Path: return self.root / "stage1" / "model.pt"
    @property
    def stage2(self) -> Path: return self.root / "stage2" / "model.pt"
    @property
    def abn(self) -> Path: return self.root / "abn" / "model.pt"
    @property
    def wae(self) -> Path: return self.root / "wae" / "model.pt"
    @property
    def result(self) -> Path: return self.root / "result.json"
    @property
    def timings_file(self) -> Path: return self.root / "timings.json"

    def maps(self, key: str) -> Path:
        return self.root / "maps" / key


def load_run_config(out: Path, overrides: dict[str, Any]) -> RunConfig:
    """The run's saved config with ``overrides`` applied (validated; nothing is written)."""
    saved = read_json(RunDir(out).config)
    return RunConfig.from_dict({**saved, **overrides})


class Run:
    """The steps of one run. Construct it, then call ``stage1``/``explain``/``stage2``/``evaluate``."""

    def __init__(self, cfg: RunConfig, out: str | Path, *, progress: bool = True):
        self.cfg, self.dir, self.progress = cfg, RunDir(Path(out)), progress
        self.device = resolve_device(cfg.device)
        self._data: tuple[ImageData, ImageData] | None = None
        self.gpus_per_worker: float | None = None  # Ray map workers; None: 1 if the cluster has GPUs
        self.timings: dict[str, float] = {}

    # -- shared inputs ----------------------------------------------------------------------------
    @property
    def train_data(self) -> ImageData:
        return self._load()[0]

    @property
    def test_data(self) -> ImageData:
        return self._load()[1]

    def _load(self) -> tuple[ImageData, ImageData]:
        if self._data is None:
            self._data = load_dataset(self.cfg.dataset, self.cfg.data_root,
                                      download=self.cfg.download, image_size=self.cfg.image_size)
        return self._data

    def split(self) -> tuple[torch.Tensor, torch.Tensor]:
        tr, va = train_val_split(len(self.train_data), self.cfg.val_fraction, seed=self.cfg.seed)
        return torch.as_tensor(tr), torch.as_tensor(va)

    def save_config(self) -> None:
        write_json(self.dir.config, self.cfg.to_dict())

    def check_compatible(self) -> None:
        """Refuse to mix a new config into a directory that already holds a different run."""
        if not self.dir.config.exists():
            return
        saved = read_json(self.dir.config)
        for key in STAGE1_KEYS + EXPLAIN_KEYS + STAGE2_KEYS:
            if key in saved and saved[key] != getattr(self.cfg, key):
                raise UserError(f"{self.dir.root} already holds a run with {key}={saved[key]!r} "
                                f"(asked: {getattr(self.cfg, key)!r}); choose another --out, or "
                                "redo one step with `impactx stage1|explain|stage2 --out`")

    # -- stage 1 ----------------------------------------------------------------------------------
    def stage1_meta(self) -> dict[str, Any]:
        return {"kind": "stage1", "model": self.cfg.model, "num_classes": self.train_data.num_classes,
                "config": self.cfg.subset(STAGE1_KEYS)}

    def stage1(self) -> dict[str, Any]:
        train_idx, val_idx = self.split()
        result = train_stage1(self.cfg, self.train_data, train_idx, val_idx, device=self.device,
                              progress=self.progress)
        meta = {**self.stage1_meta(), "best_epoch": result.best_epoch,
                "val_accuracy": result.best_val_accuracy, "seconds": result.seconds}
        save_checkpoint(self.dir.stage1, result.model.state_dict(), meta)
        write_json(self.dir.stage1.with_name("history.json"), result.history)
        return meta

    def load_stage1(self, path: Path | None = None) -> tuple[Backbone, str]:
        """The stage-1 model (from ``path`` or the run's own checkpoint) and its file hash."""
        path = path or self.dir.stage1
        model = load_backbone(path, **self.backbone_spec())
        return model.to(self.device).eval(), file_sha256(path)

    def backbone_spec(self) -> dict[str, Any]:
        return {"model": self.cfg.model, "num_classes": self.train_data.num_classes,
                "input_size": self.cfg.input_size}

    # -- SHAP maps --------------------------------------------------------------------------------
    def map_meta(self, checkpoint_hash: str) -> dict[str, Any]:
        h, w = self.train_data.image_size
        return make_meta(checkpoint_hash=checkpoint_hash,
                         data_fingerprint=dataset_fingerprint(self.train_data),
                         masker=validate_masker(self.cfg.masker or default_masker(h, w)),
                         max_evals=self.cfg.max_evals, batch_size=self.cfg.shap_batch_size,
                         seed=self.cfg.seed, engine=self.cfg.engine)

    def map_store_path(self, meta: dict[str, Any]) -> Path:
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        return self.dir.maps(key)

    def open_map_store(self, checkpoint_hash: str) -> MapStore:
        meta = self.map_meta(checkpoint_hash)
        data = self.train_data
        c = data.images.shape[1]
        h, w = data.image_size
        return MapStore.create_or_open(self.map_store_path(meta), meta=meta, num_maps=len(data),
                                       map_shape=(h, w, c))

    def explain(self, checkpoint: Path | None = None, workers: int | None = None) -> MapStore:
        """Compute the missing maps of the checkpoint's store, in this process or on ``workers``
        Ray actors; records maps/s in ``timings``."""
        model, ckpt_hash = self.load_stage1(checkpoint)
        store = self.open_map_store(ckpt_hash)
        data, meta = self.train_data, store.meta
        todo = sum(b - a for a, b in map(store.shard_range, store.missing_shards()))
        settings = {"max_evals": meta["max_evals"], "masker": meta["masker"],
                    "batch_size": meta["batch_size"], "seed": meta["seed"],
                    "engine": meta["engine"], "progress": self.progress}
        start = time.perf_counter()
        if workers is None:
            compute_store(store, model, data.float_images(), data.labels, **settings)
        else:
            from impactx_ray.explain.actors import compute_store_ray

            build = partial(load_backbone, checkpoint or self.dir.stage1, **self.backbone_spec())
            compute_store_ray(store, build, data.float_images(), data.labels, workers=workers,
                              gpus_per_worker=self.gpus_per_worker, **settings)
        seconds = time.perf_counter() - start
        if todo:
            self.timings.update(explain=seconds, maps_computed=todo, maps_per_s=todo / seconds)
            self.record_timings()
            self.say(f"SHAP maps: {todo} in {seconds:.1f} s ({todo / seconds:.2f} maps/s) "
                     f"-> {store.path}")
        else:
            self.say(f"SHAP maps: reusing {store.path}")
        return store

    def load_maps(self, ckpt_hash: str, maps: Path | None = None) -> np.ndarray:
        """Maps for ``ckpt_hash``: from ``maps`` (checked to match) or the run's own store."""
        if maps is not None:
            store = MapStore(maps)
            built_from = store.meta.get("checkpoint_hash")
            if built_from != ckpt_hash:
                raise UserError(f"map store {maps} was built from checkpoint {str(built_from)[:12]}, "
                                f"but the stage-1 checkpoint is {ckpt_hash[:12]}; "
                                "run `impactx explain` for this checkpoint")
        else:
            path = self.map_store_path(self.map_meta(ckpt_hash))
            if not (path / "manifest.json").exists():
                raise UserError(f"no SHAP maps for stage-1 checkpoint {ckpt_hash[:12]} with these "
                                f"settings; run `impactx explain --out {self.dir.root}` first")
            store = MapStore(path)
        if len(store.missing_shards()) > 0:
            raise UserError(f"map store {store.path} is incomplete; rerun `impactx explain` to "
                            "finish it (finished shards are kept)")
        return store.load()

    # -- stage 2 ----------------------------------------------------------------------------------
    def stage2(self, checkpoint: Path | None = None, maps: Path | None = None) -> dict[str, Any]:
        backbone, ckpt_hash = self.load_stage1(checkpoint)
        all_maps = self.load_maps(ckpt_hash, maps)
        train_idx, val_idx = self.split()
        result = train_stage2(self.cfg, backbone, self.train_data, all_maps, train_idx, val_idx,
                              device=self.device, progress=self.progress)
        meta = {"kind": "stage2", "model": self.cfg.model,
                "num_classes": self.train_data.num_classes, "stage1_hash": ckpt_hash,
                "image_size": list(self.train_data.image_size), "channels": int(all_maps.shape[-1]),
                "config": self.cfg.subset(STAGE1_KEYS + EXPLAIN_KEYS + STAGE2_KEYS),
                "best_epoch": result.best_epoch, "val_accuracy": result.best_val_accuracy,
                "seconds": result.seconds}
        save_checkpoint(self.dir.stage2, result.model.state_dict(), meta)
        write_json(self.dir.stage2.with_name("history.json"), result.history)
        return meta

    # -- comparison methods -----------------------------------------------------------------------
    def train_abn(self) -> dict[str, Any]:
        """ABN with stage 1's hyperparameters (a stage-1-type model: no maps needed)."""
        train_idx, val_idx = self.split()
        result = train_abn(self.cfg, self.train_data, train_idx, val_idx, device=self.device,
                           progress=self.progress)
        meta = {"kind": "abn", "model": self.cfg.model, "num_classes": self.train_data.num_classes,
                "config": self.cfg.subset(STAGE1_KEYS), "best_epoch": result.best_epoch,
                "val_accuracy": result.best_val_accuracy, "seconds": result.seconds}
        save_checkpoint(self.dir.abn, result.model.state_dict(), meta)
        write_json(self.dir.abn.with_name("history.json"), result.history)
        return meta

    def train_wae(self) -> dict[str, Any]:
        """WAE on the frozen stage-1 model and its SHAP maps (stage 2's budget, no λ)."""
        backbone, ckpt_hash = self.load_stage1()
        maps = self.load_maps(ckpt_hash)
        train_idx, val_idx = self.split()
        result = train_wae(self.cfg, backbone, self.train_data, maps, train_idx, val_idx,
                           device=self.device, progress=self.progress)
        meta = {"kind": "wae", "model": self.cfg.model, "num_classes": self.train_data.num_classes,
                "stage1_hash": ckpt_hash, "image_size": list(self.train_data.image_size),
                "channels": int(maps.shape[-1]),
                "config": self.cfg.subset(STAGE1_KEYS + EXPLAIN_KEYS + ("stage2_epochs",
                                                                        "stage2_lr")),
                "best_epoch": result.best_epoch, "val_accuracy": result.best_val_accuracy,
                "seconds": result.seconds}
        save_checkpoint(self.dir.wae, result.model.state_dict(), meta)
        write_json(self.dir.wae.with_name("history.json"), result.history)
        return meta

    def done(self, path: Path, keys: tuple[str, ...]) -> bool:
        """Whether ``path`` holds a checkpoint made with this config (and this stage-1 model)."""
        if not path.exists():
            return False
        _, meta = load_checkpoint(path)
        if "stage1_hash" in meta and (not self.dir.stage1.exists() or
                                      meta["stage1_hash"] != file_sha256(self.dir.stage1)):
            return False
        return meta.get("config") == self.cfg.subset(keys)

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, morf: bool = False, morf_images: int = 100) -> dict[str, Any]:
        """Test accuracy of every method trained in this directory; MoRF/AOPC with ``morf``."""
        spec, test = self.backbone_spec(), self.test_data
        loaders = {"baseline": (self.dir.stage1, load_backbone),
                   "impactx": (self.dir.stage2, load_impactx),
                   "abn": (self.dir.abn, load_abn), "wae": (self.dir.wae, load_wae)}
        result: dict[str, Any] = {"hyperparameters": self.cfg.to_dict(),
                                  "num_train": len(self.train_data), "num_test": len(test),
                                  "device": str(self.device)}
        models: dict[str, torch.nn.Module] = {}
        seconds: dict[str, float] = {}
        for method, (path, load) in loaders.items():
            if method != "baseline" and not path.exists():
                continue
            models[method] = load(path, **spec).to(self.device).eval()
            _, meta = load_checkpoint(path)
            result[f"{method}_val_accuracy"] = meta["val_accuracy"]
            result[f"{method}_test_accuracy"] = accuracy(eval_mode(models[method]), test,
                                                         device=self.device)
            seconds[method] = meta["seconds"]
        if morf:
            if "impactx" not in models:
                raise UserError(f"--morf needs IMPACTX: {self.dir.stage2} does not exist")
            curves, maps, x, y = morf_comparison(
                models["impactx"], test, abn=models.get("abn"), n=morf_images,
                seed=self.cfg.seed, max_evals=self.cfg.max_evals, masker=self.cfg.masker,
                shap_batch_size=self.cfg.shap_batch_size, device=self.device,
                progress=self.progress)
            result["morf"] = write_morf(self.dir.root / "morf", curves, maps, x, y, test.classes)
        elif self.dir.result.exists():  # keep an earlier MoRF evaluation in the result
            previous = read_json(self.dir.result)
            if "morf" in previous:
                result["morf"] = previous["morf"]
        result["timings_s"] = self.record_timings(**seconds)
        write_json(self.dir.result, result)
        return result

    # -- everything -------------------------------------------------------------------------------
    def run_all(self, workers: int | None = None,
                methods: tuple[str, ...] = ("impactx",)) -> dict[str, Any]:
        """Stage 1 (the baseline) and every step ``methods`` need; reuses finished steps."""
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise UserError(f"unknown --method {unknown[0]!r}; use {', '.join(METHODS)}")
        self.check_compatible()
        self._load()  # missing data fails here, before anything is written
        self.save_config()
        self.step("stage 1", self.dir.stage1, STAGE1_KEYS, self.stage1)
        if {"impactx", "wae"} & set(methods):
            self.explain(workers=workers)
        if "impactx" in methods:
            self.step("stage 2", self.dir.stage2, STAGE1_KEYS + EXPLAIN_KEYS + STAGE2_KEYS,
                      self.stage2)
        if "abn" in methods:
            self.step("ABN", self.dir.abn, STAGE1_KEYS, self.train_abn)
        if "wae" in methods:
            self.step("WAE", self.dir.wae, STAGE1_KEYS + EXPLAIN_KEYS + ("stage2_epochs",
                                                                         "stage2_lr"),
                      self.train_wae)
        return self.evaluate()

    def step(self, name: str, path: Path, keys: tuple[str, ...], train) -> None:
        if self.done(path, keys):
            self.say(f"{name}: reusing {path}")
        else:
            self.timed(f"{name.replace(' ', '')}_wall", train)

    def record_timings(self, **extra: float) -> dict[str, float]:
        """Merge this process's timings into ``timings.json`` (steps may run in separate commands)."""
        saved = read_json(self.dir.timings_file) if self.dir.timings_file.exists() else {}
        merged = {**saved, **self.timings, **extra}
        write_json(self.dir.timings_file, merged)
        return merged

    def timed(self, name: str, fn) -> Any:
        t = time.perf_counter()
        out = fn()
        self.timings[name] = time.perf_counter() - t
        return out

    def say(self, msg: str) -> None:
        if self.progress:
            print(msg, flush=True)
