"""One run on a run directory (layout: ``rundir.py``): stage 1 → SHAP maps → stage 2 and the
comparison methods → test accuracies. A short orchestrator over the method table (``methods.py``)
and the explain settings (``explain.ExplainSettings``), which the sweep uses as well.

Every step validates its inputs before writing anything, reuses finished work (``run`` skips a
method whose checkpoint was made with the same settings, and the map store resumes shard by
shard), and never overwrites a finished artifact: a redone checkpoint moves the old one aside.
"""

from __future__ import annotations

import sys
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from impactx_ray.checks import (
    chance_warning,
    constant_map_counts,
    constant_maps_warning,
    store_warning,
)
from impactx_ray.config import RunConfig
from impactx_ray.data import ImageData, dataset_fingerprint, load_dataset, train_val_split
from impactx_ray.defaults import DEFAULT_REPLACEMENTS, MORF_IMAGES
from impactx_ray.errors import UserError
from impactx_ray.explain import ExplainSettings, MapStore, load_checkpoint_maps
from impactx_ray.io import file_sha256, read_json, write_json
from impactx_ray.methods import (
    BASELINE,
    METHODS,
    Method,
    ModelSpec,
    TrainInputs,
    get_method,
    load_model,
    load_stage1,
    train_method,
)
from impactx_ray.pipeline import check_before_writing, compare_maps, impactx_to_compare, stage1_maps
from impactx_ray.pipeline.morf import IMPACTX_METHODS
from impactx_ray.rundir import RunDir
from impactx_ray.train import FitHooks, Split, accuracy, resolve_device
from impactx_ray.train.checkpoint import save_checkpoint


class Run:
    """The steps of one run: ``explain``, ``train(method)``, ``evaluate``, or ``run_all``."""

    def __init__(self, cfg: RunConfig, out: str | Path, *, progress: bool = True,
                 workers: int | None = None, gpus_per_worker: float | None = None,
                 strict: bool = False) -> None:
        self.cfg, self.dir, self.progress = cfg, RunDir(Path(out)), progress
        self.settings = ExplainSettings.from_config(cfg)
        self.device = resolve_device(cfg.device)
        self.workers, self.gpus_per_worker = workers, gpus_per_worker  # Ray map workers
        self.strict = strict  # refuse unreadable image files instead of skipping them
        self.warnings: list[str] = []  # said on stderr as they arise, and kept in result.json

    @cached_property
    def data(self) -> tuple[ImageData, ImageData]:
        """(train, test), loaded once; missing data is a UserError before anything is written."""
        return load_dataset(self.cfg.dataset, self.cfg.data_root, download=self.cfg.download,
                            image_size=self.cfg.image_size, strict=self.strict, warn=self.warn)

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.of(self.cfg, self.data[0])

    def split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(train rows, validation rows) of the training set."""
        tr, va = train_val_split(len(self.data[0]), self.cfg.val_fraction, seed=self.cfg.seed)
        return torch.as_tensor(tr), torch.as_tensor(va)

    # -- checks before writing --------------------------------------------------------------------
    def check_inputs(self, *, explains: bool = False, trains: tuple[Method, ...] = ()) -> None:
        """Everything a step can check before it writes: the data (loaded), the SHAP budget when
        it computes maps, the backbone (pretrained download, --weights) when it trains from it."""
        check_before_writing(self.cfg, self.data[0], explains=explains,
                             builds_backbone=any(not m.builds_on_stage1 for m in trains))

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            print(f"impactx: warning: {message}", file=sys.stderr, flush=True)

    def save_config(self) -> None:
        write_json(self.dir.config, self.cfg.to_dict())

    # -- SHAP maps --------------------------------------------------------------------------------
    def explain(self, checkpoint: Path | None = None) -> MapStore:
        """Compute the missing maps of the stage-1 checkpoint's store, here or on Ray workers."""
        self.dir.check_stage1(self.cfg, checkpoint)
        done = stage1_maps(checkpoint or self.dir.checkpoint(BASELINE), self.spec, self.data[0],
                           self.settings, self.dir.maps, device=self.device, workers=self.workers,
                           gpus_per_worker=self.gpus_per_worker, progress=self.progress)
        if done.computed:
            self.dir.record_timings(explain=done.seconds, maps_computed=done.computed,
                                    maps_per_s=done.maps_per_s)
            self.say(f"SHAP maps: {done.computed} in {done.seconds:.1f} s "
                     f"({done.maps_per_s:.2f} maps/s) -> {done.store.path}")
        else:
            self.say(f"SHAP maps: reusing {done.store.path}")
        for warning in done.warnings:
            self.warn(warning)
        return done.store

    def check_maps(self, store: MapStore) -> None:
        """Warn about constant maps in a complete store (a collapsed model explains nothing)."""
        if not store.missing_shards(verify=False):
            warning = store_warning(store)
            if warning:
                self.warn(warning)

    def maps(self, checkpoint: Path, maps: Path | None = None) -> np.ndarray:
        """The complete maps of a stage-1 checkpoint: from ``maps`` (checked) or the run's store."""
        return load_checkpoint_maps(file_sha256(checkpoint), self.settings, self.dir.maps, maps)

    # -- training ---------------------------------------------------------------------------------
    def train(self, method: Method, checkpoint: Path | None = None,
              maps: Path | None = None) -> dict[str, Any]:
        """Train ``method`` (on ``checkpoint``, the stage-1 model, and its ``maps`` when it needs
        them), save its checkpoint and history; returns the checkpoint's meta."""
        train = self.data[0]
        tr, va = self.split()
        inputs = TrainInputs(self.cfg, Split(train, tr, va), self.device,
                             FitHooks(progress=self.progress))
        if method.builds_on_stage1:
            self.dir.check_stage1(self.cfg, checkpoint)
            inputs.stage1 = checkpoint or self.dir.checkpoint(BASELINE)
            load_stage1(inputs.stage1, self.spec)  # a bad checkpoint fails before the maps load
            inputs.maps = self.maps(inputs.stage1, maps) if method.needs_maps else None
            if inputs.maps is not None:
                warning = constant_maps_warning([constant_map_counts(inputs.maps)],
                                                len(inputs.maps))
                if warning:
                    self.warn(warning)
        else:
            self.check_inputs(trains=(method,))
        start = time.perf_counter()
        try:
            result, meta = train_method(method, inputs)
        except FloatingPointError as e:  # a diverged loss: the learning rate, not a bug
            lr = f"--stage2-lr {self.cfg.lr2:g}" if method.builds_on_stage1 else f"--lr {self.cfg.lr:g}"
            raise UserError(f"{method.title} diverged with {lr}: {e}; nothing of this step "
                            "was saved") from None
        save_checkpoint(self.dir.checkpoint(method), result.model.state_dict(), meta)
        write_json(self.dir.history(method), result.history)
        self.dir.record_timings(**{f"{method.name}_wall": time.perf_counter() - start})
        if not method.builds_on_stage1:
            self.check_chance(method, meta["val_accuracy"])
        return meta

    def check_chance(self, method: Method, val_accuracy: float) -> None:
        warning = chance_warning(val_accuracy, self.data[0].labels[self.split()[1]],
                                 f"{method.title} ({self.dir.checkpoint(method)})")
        if warning:
            self.warn(warning)

    def run_all(self, methods: tuple[str, ...] = ("impactx",)) -> dict[str, Any]:
        """The baseline and every method in ``methods``, each unless already done; then evaluate."""
        wanted = {BASELINE.name, *(get_method(m).name for m in methods)}
        self.dir.check_compatible(self.cfg, tuple(METHODS.values()),
                                  "choose another --out, or redo one step with "
                                  f"`impactx stage1|explain|stage2 --out {self.dir.root}`",
                                  skip_stale=True)
        todo = tuple(m for m in METHODS.values()
                     if m.name in wanted and not self.dir.holds(m, self.cfg))
        self.check_inputs(explains=any(m.needs_maps for m in todo), trains=todo)
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
    def evaluate(self, morf: bool = False, morf_images: int = MORF_IMAGES,
                 replacements: tuple[str, ...] = DEFAULT_REPLACEMENTS) -> dict[str, Any]:
        """Test accuracy of every method trained here; MoRF/AOPC and figures with ``morf``."""
        train, test = self.data
        self.dir.check_compatible(self.cfg, tuple(METHODS.values()),
                                  "evaluate with the settings it was trained with, or redo it "
                                  f"(`impactx stage1|stage2 --out {self.dir.root}` with these flags)")
        result: dict[str, Any] = {"hyperparameters": self.cfg.to_dict(), "num_train": len(train),
                                  "num_test": len(test), "device": str(self.device),
                                  "trained_with": {}}
        models, seconds = {}, {}
        for method in METHODS.values():
            path = self.dir.checkpoint(method)
            if method is not BASELINE and not path.exists():
                continue
            model, meta = load_model(path, self.spec, method)
            result["trained_with"][method.name] = meta.get("config")
            if not method.builds_on_stage1:
                self.check_chance(method, meta["val_accuracy"])
            elif method.needs_maps and not self.dir.stale(method):
                self.check_run_maps()
            models[method.name] = model.to(self.device)
            result[f"{method.name}_val_accuracy"] = meta["val_accuracy"]
            result[f"{method.name}_test_accuracy"] = accuracy(model, test, device=self.device)
            seconds[method.name] = meta["seconds"]
        previous = read_json(self.dir.result) if self.dir.result.exists() else {}
        if morf:
            result["morf"] = self._morf(tuple(models), test, morf_images, replacements)
        elif "morf" in previous:  # keep an earlier MoRF evaluation in the result
            result["morf"] = previous["morf"]
        result["timings_s"] = self.dir.record_timings(**seconds)
        result["warnings"] = list(self.warnings)
        write_json(self.dir.result, result)
        return result

    def check_run_maps(self) -> None:
        """:meth:`check_maps` of the run's own store for its stage-1 checkpoint, if there is one."""
        try:
            store = self.settings.find_store(self.dir.maps, file_sha256(self.dir.checkpoint(BASELINE)),
                                             dataset_fingerprint(self.data[0]))
        except UserError:  # maps from --maps elsewhere, or none: nothing here to check
            return
        self.check_maps(store)

    def _morf(self, trained: tuple[str, ...], test: ImageData, n: int,
              replacements: tuple[str, ...] = DEFAULT_REPLACEMENTS) -> dict[str, Any]:
        # the paper's two-stage IMPACTX; a run trained only single-stage is compared with that
        checkpoints = {m: self.dir.checkpoint(METHODS[m]) for m in trained}
        if not any(m in checkpoints for m in IMPACTX_METHODS):
            raise UserError(f"--morf needs IMPACTX: neither {self.dir.checkpoint(METHODS['impactx'])}"
                            f" nor {self.dir.checkpoint(METHODS['impactx_single'])} exists")
        name = impactx_to_compare(checkpoints)
        if name != "impactx":
            self.say(f"MoRF: comparing {METHODS[name].title} (no two-stage IMPACTX here)")
        return compare_maps(self.dir.morf, self.cfg, test, checkpoints, n=n,
                            replacements=replacements, device=self.device, progress=self.progress)

    def say(self, msg: str) -> None:
        if self.progress:
            print(msg, flush=True)
