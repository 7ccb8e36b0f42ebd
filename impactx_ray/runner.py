"""The CLI's driver: one run on a run directory (layout: ``rundir.py``), stage 1 → SHAP maps →
stage 2 and the comparison methods → test accuracies (→ MoRF), through the steps a sweep cell
runs too (``pipeline/``); the run's hyperparameters come from its config, its records go to files.

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

from impactx_ray import pipeline
from impactx_ray.checks import chance_warning
from impactx_ray.config import RunConfig
from impactx_ray.data import ImageData, load_dataset
from impactx_ray.defaults import DEFAULT_REPLACEMENTS, MORF_IMAGES
from impactx_ray.explain import ExplainSettings, MapStore, load_checkpoint_maps
from impactx_ray.io import file_sha256, write_json
from impactx_ray.methods import BASELINE, METHODS, Method, ModelSpec, TrainInputs, get_method, load_stage1
from impactx_ray.rundir import RunDir
from impactx_ray.train import FitHooks, Split, resolve_device


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

    def split(self) -> Split:
        """The training set's train and validation rows."""
        return Split.of(self.data[0], self.cfg.val_fraction, self.cfg.seed)

    # -- checks before writing --------------------------------------------------------------------
    def check_inputs(self, *, explains: bool = False, trains: tuple[Method, ...] = ()) -> None:
        """Everything a step can check before it writes: the data (loaded), the SHAP budget when
        it computes maps, the backbone (pretrained download, --weights) when it trains from it."""
        pipeline.check_before_writing(self.cfg, self.data[0], explains=explains,
                                      builds_backbone=any(not m.builds_on_stage1 for m in trains))

    def warn(self, message: str | None) -> None:
        """Say ``message`` once on stderr and keep it for result.json (None: nothing to say)."""
        if message and message not in self.warnings:
            self.warnings.append(message)
            print(f"impactx: warning: {message}", file=sys.stderr, flush=True)

    # -- SHAP maps --------------------------------------------------------------------------------
    def explain(self, checkpoint: Path | None = None) -> MapStore:
        """Compute the missing maps of the stage-1 checkpoint's store, here or on Ray workers."""
        self.dir.check_stage1(self.cfg, checkpoint)
        done = pipeline.stage1_maps(checkpoint or self.dir.checkpoint(BASELINE), self.spec,
                                    self.data[0], self.settings, self.dir.map_stores, device=self.device,
                                    workers=self.workers, gpus_per_worker=self.gpus_per_worker,
                                    worker_device=self.cfg.device, progress=self.progress)
        if done.computed:
            self.dir.record_timings(**done.timings())
        self.say(done.summary())
        for warning in done.warnings:
            self.warn(warning)
        return done.store

    # -- training ---------------------------------------------------------------------------------
    def train(self, method: Method, checkpoint: Path | None = None,
              store: Path | None = None) -> dict[str, Any]:
        """Train ``method`` (on ``checkpoint``, the stage-1 model, and its maps, from ``store`` or
        the run's own, when it needs them), save its checkpoint and history; returns the meta."""
        inputs = TrainInputs(self.cfg, self.split(), self.device, FitHooks(progress=self.progress))
        if method.builds_on_stage1:
            self.dir.check_stage1(self.cfg, checkpoint)
            inputs.stage1 = checkpoint or self.dir.checkpoint(BASELINE)
            load_stage1(inputs.stage1, self.spec)  # a bad checkpoint fails before the maps load
            if method.needs_maps:  # from --maps (checked) or the run's store
                inputs.maps = load_checkpoint_maps(file_sha256(inputs.stage1), self.settings,
                                                   self.dir.map_stores, store)
        else:
            self.check_inputs(trains=(method,))
        start = time.perf_counter()
        result, meta = pipeline.train_step(method, inputs, self.warn)
        self.dir.save_trained(method, result.model.state_dict(), meta, result.history,
                              wall=time.perf_counter() - start)
        if not method.builds_on_stage1:
            self.check_chance(method, meta["val_accuracy"])
        return meta

    def check_chance(self, method: Method, val_accuracy: float) -> None:
        self.warn(chance_warning(val_accuracy, self.data[0].labels[self.split().val_idx],
                                 f"{method.title} ({self.dir.checkpoint(method)})"))

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
        self.dir.save_config(self.cfg)
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
        trained = {m: self.dir.checkpoint(m) for m in METHODS.values()
                   if m is BASELINE or self.dir.checkpoint(m).exists()}
        evaluated = pipeline.evaluate_checkpoints(trained, self.spec, test, self.device)
        for done in evaluated:
            if not done.method.builds_on_stage1:
                self.check_chance(done.method, done.meta["val_accuracy"])
            elif done.method.needs_maps and not self.dir.stale(done.method):  # a collapsed stage 1?
                self.warn(pipeline.maps.run_store_warning(self.settings, self.dir.map_stores,
                                                          self.dir.checkpoint(BASELINE), train))
        # MoRF now, or an earlier one kept
        summary = self._morf(test, morf_images, replacements) if morf else self.dir.previous_morf()
        # the core every result shares (pipeline/result.py), then what a run adds
        result = {**pipeline.result_row(self.cfg, {k: v for d in evaluated for k, v in d.row().items()},
                                        summary, self.warnings),
                  "hyperparameters": self.cfg.to_dict(),
                  "trained_with": {d.method.name: d.meta.get("config") for d in evaluated},
                  "num_train": len(train), "num_test": len(test), "device": str(self.device),
                  "timings_s": self.dir.record_timings(**{d.method.name: d.meta["seconds"]
                                                          for d in evaluated}),
                  **({"morf": summary} if summary is not None else {})}
        write_json(self.dir.result, result)
        self.dir.record_evaluation(self.cfg, result, morf)
        return result

    def _morf(self, test: ImageData, n: int, replacements: tuple[str, ...]) -> dict[str, Any]:
        # the paper's two-stage IMPACTX; a run trained only single-stage is compared with that
        checkpoints = {m: self.dir.checkpoint(METHODS[m]) for m in ("impactx", "impactx_single", "abn")}
        name = pipeline.impactx_to_compare(checkpoints)
        if name != "impactx":
            self.say(f"MoRF: comparing {METHODS[name].title} (no two-stage IMPACTX here)")
        return pipeline.compare_maps(self.dir.morf, self.cfg, test, checkpoints, n=n,
                                     replacements=replacements, device=self.device,
                                     progress=self.progress)

    def say(self, msg: str) -> None:
        if self.progress:
            print(msg, flush=True)
