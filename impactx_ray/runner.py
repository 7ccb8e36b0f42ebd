"""One run on a run directory (layout: ``rundir.py``): stage 1 → SHAP maps → stage 2 and the
comparison methods → test accuracies. A short orchestrator over the method table (``methods.py``)
and the explain settings (``explain.ExplainSettings``), which the sweep uses as well.

Every step validates its inputs before writing anything, reuses finished work (``run`` skips a
method whose checkpoint was made with the same settings, and the map store resumes shard by
shard), and never overwrites a finished artifact: a redone checkpoint moves the old one aside.
"""

from __future__ import annotations

import time
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from impactx_ray.config import EXPLAIN_SETTINGS, STAGE1_SETTINGS, STAGE2_SETTINGS, RunConfig
from impactx_ray.data import ImageData, load_dataset, train_val_split
from impactx_ray.errors import UserError
from impactx_ray.explain import ExplainSettings, MapStore, compute_store, load_checkpoint_maps
from impactx_ray.io import file_sha256, read_json, write_json
from impactx_ray.methods import (BASELINE, METHODS, Method, ModelSpec, TrainInputs, get_method,
                                 load_model, load_stage1, train_method)
from impactx_ray.rundir import RunDir
from impactx_ray.train import accuracy, resolve_device
from impactx_ray.train.checkpoint import save_checkpoint


class Run:
    """The steps of one run: ``explain``, ``train(method)``, ``evaluate``, or ``run_all``."""

    def __init__(self, cfg: RunConfig, out: str | Path, *, progress: bool = True,
                 workers: int | None = None, gpus_per_worker: float | None = None) -> None:
        self.cfg, self.dir, self.progress = cfg, RunDir(Path(out)), progress
        self.settings = ExplainSettings.from_config(cfg)
        self.device = resolve_device(cfg.device)
        self.workers, self.gpus_per_worker = workers, gpus_per_worker  # Ray map workers

    @cached_property
    def data(self) -> tuple[ImageData, ImageData]:
        """(train, test), loaded once; missing data is a UserError before anything is written."""
        return load_dataset(self.cfg.dataset, self.cfg.data_root, download=self.cfg.download,
                            image_size=self.cfg.image_size)

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.of(self.cfg, self.data[0])

    def check_compatible(self) -> None:
        """Refuse to mix a new config into a directory that already holds a different run."""
        saved = self.dir.saved_config() or {}
        for key in STAGE1_SETTINGS + EXPLAIN_SETTINGS + STAGE2_SETTINGS:
            if key in saved and saved[key] != getattr(self.cfg, key):
                raise UserError(f"{self.dir.root} already holds a run with {key}={saved[key]!r} "
                                f"(asked: {getattr(self.cfg, key)!r}); choose another --out, or "
                                "redo one step with `impactx stage1|explain|stage2 --out`")

    def save_config(self) -> None:
        write_json(self.dir.config, self.cfg.to_dict())

    # -- SHAP maps --------------------------------------------------------------------------------
    def explain(self, checkpoint: Path | None = None) -> MapStore:
        """Compute the missing maps of the stage-1 checkpoint's store, here or on Ray workers."""
        checkpoint = checkpoint or self.dir.checkpoint(BASELINE)
        model = load_stage1(checkpoint, self.spec).to(self.device).eval()  # checked before writing
        train = self.data[0]
        store = self.settings.open_store(self.dir.maps, file_sha256(checkpoint), train)
        todo = sum(b - a for a, b in map(store.shard_range, store.missing_shards()))
        start = time.perf_counter()
        if self.workers is None:
            compute_store(store, model, train.float_images(), train.labels, self.settings,
                          progress=self.progress)
        else:
            from impactx_ray.explain.actors import compute_store_ray

            compute_store_ray(store, partial(load_stage1, checkpoint, self.spec),
                              train.float_images(), train.labels, self.settings,
                              workers=self.workers, gpus_per_worker=self.gpus_per_worker,
                              progress=self.progress)
        seconds = time.perf_counter() - start
        if todo:
            self.dir.record_timings(explain=seconds, maps_computed=todo, maps_per_s=todo / seconds)
            self.say(f"SHAP maps: {todo} in {seconds:.1f} s ({todo / seconds:.2f} maps/s) "
                     f"-> {store.path}")
        else:
            self.say(f"SHAP maps: reusing {store.path}")
        return store

    def maps(self, checkpoint: Path, maps: Path | None = None) -> np.ndarray:
        """The complete maps of a stage-1 checkpoint: from ``maps`` (checked) or the run's store."""
        return load_checkpoint_maps(file_sha256(checkpoint), self.settings, self.dir.maps, maps)

    # -- training ---------------------------------------------------------------------------------
    def train(self, method: Method, checkpoint: Path | None = None,
              maps: Path | None = None) -> dict[str, Any]:
        """Train ``method`` (on ``checkpoint``, the stage-1 model, and its ``maps`` when it needs
        them), save its checkpoint and history; returns the checkpoint's meta."""
        train = self.data[0]
        tr, va = (torch.as_tensor(i) for i in train_val_split(len(train), self.cfg.val_fraction,
                                                              seed=self.cfg.seed))
        inputs = TrainInputs(self.cfg, train, tr, va, self.device, progress=self.progress)
        if method.on_stage1:
            inputs.stage1 = checkpoint or self.dir.checkpoint(BASELINE)
            load_stage1(inputs.stage1, self.spec)  # a bad checkpoint fails before the maps load
            inputs.maps = self.maps(inputs.stage1, maps) if method.needs_maps else None
        start = time.perf_counter()
        result, meta = train_method(method, inputs)
        save_checkpoint(self.dir.checkpoint(method), result.model.state_dict(), meta)
        write_json(self.dir.history(method), result.history)
        self.dir.record_timings(**{f"{method.name}_wall": time.perf_counter() - start})
        return meta

    def run_all(self, methods: tuple[str, ...] = ("impactx",)) -> dict[str, Any]:
        """The baseline and every method in ``methods``, each unless already done; then evaluate."""
        wanted = {BASELINE.name, *(get_method(m).name for m in methods)}
        self.check_compatible()
        self.data  # noqa: B018 - missing data fails here, before anything is written
        self.save_config()
        explained = False
        for method in (m for m in METHODS.values() if m.name in wanted):  # the table's order
            if method.needs_maps and not explained:
                self.explain()
                explained = True
            if self.dir.holds(method, self.cfg):
                self.say(f"{method.title}: reusing {self.dir.checkpoint(method)}")
            else:
                self.train(method)
        return self.evaluate()

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, morf: bool = False, morf_images: int = 100,
                 replacements: tuple[str, ...] = ("noise",)) -> dict[str, Any]:
        """Test accuracy of every method trained here; MoRF/AOPC and figures with ``morf``."""
        train, test = self.data
        result: dict[str, Any] = {"hyperparameters": self.cfg.to_dict(), "num_train": len(train),
                                  "num_test": len(test), "device": str(self.device)}
        models, seconds = {}, {}
        for method in METHODS.values():
            path = self.dir.checkpoint(method)
            if method is not BASELINE and not path.exists():
                continue
            model, meta = load_model(path, self.spec, method)
            models[method.name] = model.to(self.device)
            result[f"{method.name}_val_accuracy"] = meta["val_accuracy"]
            result[f"{method.name}_test_accuracy"] = accuracy(model, test, device=self.device)
            seconds[method.name] = meta["seconds"]
        previous = read_json(self.dir.result) if self.dir.result.exists() else {}
        if morf:
            result["morf"] = self._morf(models, test, morf_images, replacements)
        elif "morf" in previous:  # keep an earlier MoRF evaluation in the result
            result["morf"] = previous["morf"]
        result["timings_s"] = self.dir.record_timings(**seconds)
        write_json(self.dir.result, result)
        return result

    def _morf(self, models: dict[str, torch.nn.Module], test: ImageData, n: int,
              replacements: tuple[str, ...] = ("noise",)) -> dict[str, Any]:
        from impactx_ray.eval.compare import morf_comparison, write_morf

        if "impactx" not in models:
            raise UserError(f"--morf needs IMPACTX: {self.dir.checkpoint(METHODS['impactx'])} "
                            "does not exist")
        curves, maps, x, y = morf_comparison(models["impactx"], test, self.settings,
                                             abn=models.get("abn"), n=n, seed=self.cfg.seed,
                                             device=self.device, progress=self.progress,
                                             replacements=replacements)
        return write_morf(self.dir.morf, curves, maps, x, y, test.classes)

    def say(self, msg: str) -> None:
        if self.progress:
            print(msg, flush=True)
