"""The paper's experiment on Ray Tune: per (model, dataset) cell, the Table 1 grid for stage 1,
SHAP maps of the winner over Ray workers, the λ grid for stage 2, ABN and WAE (and, when asked,
single-stage IMPACTX) with the stage-1 winner's hyperparameters, test accuracies of the winners and
the MoRF/LeRF comparison of the maps with its sanity checks.

Layout of ``<out>``: ``tune/<cell>-{stage1,stage2,comparison}/`` (Tune experiments, restorable),
``cells/<cell>/maps/<key>/`` (the winner's map store), ``cells/<cell>/{result.json,morf/}``,
``mlflow.db`` (embedded tracking, unless ``MLFLOW_TRACKING_URI``), ``summary.{md,csv}``.
Rerunning the same command resumes: finished Tune experiments are restored (finished trials are
not rerun), the map store resumes by shard, and MLflow runs are found again by key instead of
duplicated.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from ray import tune

from impactx_ray.checks import chance_warning
from impactx_ray.config import RunConfig
from impactx_ray.data import ImageData, load_dataset, train_val_split
from impactx_ray.defaults import CHECKPOINT_FILE, DEFAULT_REPLACEMENTS, SELECTION_METRIC, SWEEP_MORF_IMAGES
from impactx_ray.errors import UserError
from impactx_ray.eval.road import REPLACEMENTS
from impactx_ray.explain import ExplainSettings
from impactx_ray.io import write_json
from impactx_ray.lock import hold
from impactx_ray.methods import METHODS, ModelSpec, get_method, load_model, load_stage1
from impactx_ray.pipeline import MapsDone, stage1_maps
from impactx_ray.report import write_summary
from impactx_ray.sweep.identity import SweepIdentity, claim
from impactx_ray.sweep.morf_task import morf_task
from impactx_ray.sweep.progress import StageProgress
from impactx_ray.sweep.search import SearchSpec, stopped_early, tune_plan
from impactx_ray.sweep.spaces import (
    COMPARABLE_METHODS,
    COMPARISON_METHODS,
    STAGE1_SEARCHED,
    STAGE2_SEARCHED,
    Cell,
    Space,
    stage1_space,
    stage2_space,
)
from impactx_ray.sweep.tracking import MLflowTrialLogger, Tracker, artifact_location, tracking_uri
from impactx_ray.sweep.trainables import (
    CPUS,
    MAPS,
    METHOD,
    STAGE1_CHECKPOINT,
    STAGE_METHODS,
    STAGE_TRAINABLES,
    run_config,
    trial_params,
    trial_tags,
)

METRIC = SELECTION_METRIC  # selection is by validation accuracy, never test accuracy


@dataclass
class SweepOptions:
    out: Path
    cells: list[Cell]
    base: dict[str, Any]                  # RunConfig fields shared by every trial
    smoke: bool = False
    full_stage2: bool = False
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    map_workers: int | None = None        # None: one per GPU in the cluster, else one per CPU
    morf_images: int = SWEEP_MORF_IMAGES  # test images for MoRF (0: skip MoRF)
    replacements: tuple[str, ...] = DEFAULT_REPLACEMENTS  # what replaces removed regions
    comparison: tuple[str, ...] = COMPARISON_METHODS     # methods on the stage-1 winner's settings
    max_failures: int = 0
    name: str | None = None               # the sweep's name (default: from --out)
    restart: bool = False                 # start afresh, the old results kept aside
    strict: bool = False                  # refuse unreadable image files (default: skip, warn)
    search: SearchSpec = field(default_factory=SearchSpec)  # grid (the paper's) or optuna, ±asha
    log: Callable[[str], None] = field(default=print)

    def settings(self) -> dict[str, Any]:
        """What decides the sweep's results: a resumed sweep must be asked for the same."""
        # recorded only when not the default, so sweeps started before these options resume
        chosen = {k: list(v) for k, v, default in (
            ("replacements", self.replacements, DEFAULT_REPLACEMENTS),
            ("comparison", self.comparison, COMPARISON_METHODS)) if tuple(v) != default}
        return json.loads(json.dumps({
            "cells": [c.name for c in self.cells], "smoke": self.smoke,
            "full_stage2": self.full_stage2, "morf_images": self.morf_images, **self.base,
            **self.search.settings(), **chosen}))

    @property
    def small_spaces(self) -> bool:
        """--smoke shrinks the grids to a few points; a sampled search keeps Table 1's space
        (its budget is --num-samples)."""
        return self.smoke and self.search.search == "grid"


@dataclass
class StageOutcome:
    """How a stage's winner was found: the search, trials run, stopped early, failed, and the
    trial-epochs they took (the compute a search spends)."""

    search: str
    trials: int
    early_stopped: int
    failed: int
    trial_epochs: int

    @classmethod
    def of(cls, search: str, results: Any) -> StageOutcome:
        ended = [r for r in results if r.error is None]
        return cls(search, len(results), sum(stopped_early(r.metrics) for r in ended),
                   len(results.errors),
                   sum(int(r.metrics.get("epoch", 0)) for r in results if r.metrics))

    def row(self, stage: str) -> dict[str, Any]:
        return {f"{stage}_{k}": v for k, v in dataclasses.asdict(self).items()}


def run_stage(opts: SweepOptions, tracker: Tracker, cell: Cell, stage: str, parent: str,
              space: Space, base: dict[str, Any], data: tuple[ImageData, ImageData]
              ) -> tuple[Any, str, StageOutcome]:
    """Run (or restore and finish) one stage's search over ``space``: the grid, or Optuna's
    sample, ASHA stopping trials if asked (the comparison stage's two fixed trials always run
    whole). Returns (ResultGrid, stage run id, how the stage went)."""
    key = f"{cell.name}/{stage}"
    stage_run = tracker.run_id(key, f"{cell.name} {stage}", parent=parent)
    tracker.tags(stage_run, {"impactx.cell": cell.name, "impactx.stage": stage})
    search = (opts.search if stage in STAGE_METHODS else SearchSpec()).for_space(space)
    plan = tune_plan(space, search, get_method(STAGE_METHODS.get(stage, "baseline")).epochs(
        run_config(base)), METRIC, slots=trial_slots(opts))
    storage = (opts.out / "tune").resolve()
    path = storage / f"{cell.name}-{stage}"
    resources = {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial}
    # the cell's data goes to the object store once; every trial on a node reads that copy
    trainable = tune.with_resources(tune.with_parameters(STAGE_TRAINABLES[stage], data=data),
                                    resources)
    if tune.Tuner.can_restore(path):
        opts.log(f"{key}: resuming the Tune experiment in {path}")
        tuner = tune.Tuner.restore(str(path), trainable, resume_errored=False)
    else:
        opts.log(f"{key}: {search.label}, {plan.trials} trials")
        logger = MLflowTrialLogger(tracker, key, stage_run, tuple(space.grid),
                                   params_of=partial(trial_params, stage, tuple(space.grid)),
                                   tags_of=partial(trial_tags, cell.name, stage),
                                   sampled=search.search != "grid")
        tuner = tune.Tuner(
            trainable,
            param_space={**base, CPUS: opts.cpus_per_trial, **plan.param_space},
            tune_config=tune.TuneConfig(**plan.tune_config),
            run_config=tune.RunConfig(
                name=path.name, storage_path=str(storage), verbose=0,
                callbacks=[logger, StageProgress(key, plan.trials, opts.log)],
                failure_config=tune.FailureConfig(max_failures=opts.max_failures),
                # the last checkpoint holds the last epoch's state and the best weights so far
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    results = tuner.fit()
    outcome = StageOutcome.of(search.label, results)
    tracker.params(stage_run, {"search": outcome.search})
    tracker.metrics(stage_run, {"trials": outcome.trials, "trials_early_stopped":
                                outcome.early_stopped, "trials_failed": outcome.failed,
                                "trial_epochs": outcome.trial_epochs})
    if outcome.early_stopped:
        opts.log(f"{key}: ASHA stopped {outcome.early_stopped} of {outcome.trials} trials early; "
                 f"{outcome.trial_epochs} trial-epochs in all")
    if len(results) and len(results.errors) == len(results):
        tracker.finish(stage_run, ok=False)
    if results.errors:
        opts.log(f"{key}: {len(results.errors)} of {len(results)} trials failed (marked FAILED "
                 "in MLflow); the sweep goes on with the others")
    return results, stage_run, outcome


def trial_slots(opts: SweepOptions) -> int:
    """How many trials the cluster fits at once, now (by CPUs, and GPUs where trials take them)."""
    import ray

    have = ray.cluster_resources()
    fits = have.get("CPU", 1) / opts.cpus_per_trial
    if opts.gpus_per_trial:
        fits = min(fits, have.get("GPU", 0) / opts.gpus_per_trial)
    return max(1, int(fits))


class StageFailed(Exception):
    """No trial of a stage finished: the cell cannot go on (the sweep goes on with the others)."""

    def __init__(self, message: str, failed: int) -> None:
        super().__init__(message)
        self.failed = failed


def best(results: Any, keys: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """(hyperparameters, final metrics, checkpoint file) of the best trial by validation accuracy,
    among the trials that finished: one stopped early by ASHA has no final model (and its
    accuracy so far is below the trials that went on)."""
    finished = [r for r in results if r.error is None and r.checkpoint is not None
                and r.metrics and not stopped_early(r.metrics)
                and math.isfinite(r.metrics.get(METRIC, math.nan))]
    winner = max(finished, key=lambda r: r.metrics[METRIC], default=None)  # first of ties
    if winner is None:
        first = str(results.errors[0]).strip().splitlines()[-1][:200] if results.errors else "-"
        raise StageFailed(f"none of its {len(results)} trials finished (first error: {first})",
                          failed=len(results.errors))
    params = {k: winner.config[k] for k in keys}
    return params, dict(winner.metrics), Path(winner.checkpoint.path) / CHECKPOINT_FILE


def compute_maps(opts: SweepOptions, cfg: RunConfig, cell: Cell, checkpoint: Path,
                 train: ImageData) -> MapsDone:
    """The winner's SHAP maps over Ray workers (the shared maps step), into a store shared by
    every stage-2 trial."""
    from impactx_ray.explain.actors import default_gpus_per_worker, init_ray

    init_ray()
    import ray

    gpus = default_gpus_per_worker()
    workers = opts.map_workers or max(1, int(ray.cluster_resources().get("GPU" if gpus else "CPU", 1)))
    return stage1_maps(checkpoint, ModelSpec.of(cfg, train), train, ExplainSettings.from_config(cfg),
                       opts.out / "cells" / cell.name / "maps", device=torch.device("cpu"),
                       workers=workers, gpus_per_worker=gpus, progress=True)


def log_winner(tracker: Tracker, stage_run: str, params: dict, metrics: dict, model: Any) -> None:
    """A stage's parent run carries its best child's params and metrics, and its model."""
    tracker.params(stage_run, {f"best_{k}": v for k, v in params.items()})
    tracker.metrics(stage_run, {k: v for k, v in metrics.items()
                                if k.startswith(("best_", "test_", "val_"))})
    tracker.model(stage_run, model)
    tracker.finish(stage_run)


def run_cell(opts: SweepOptions, tracker: Tracker, cell: Cell, sweep_run: str) -> dict[str, Any]:
    cell_run = tracker.run_id(cell.name, cell.name, parent=sweep_run)
    tracker.tags(cell_run, {"impactx.cell": cell.name})
    base = RunConfig.from_dict({**opts.base, "model": cell.model, "dataset": cell.dataset})
    tracker.params(cell_run, {"model": cell.model, "dataset": cell.dataset})
    # Loaded once, in the driver, before any trial: missing data fails here.
    data_warnings: list[str] = []  # skipped unreadable image files, said now and in the row
    train, test = load_dataset(base.dataset, base.data_root, download=base.download,
                               image_size=base.image_size, strict=opts.strict,
                               warn=data_warnings.append)
    for warning in data_warnings:
        opts.log(f"{cell.name}: warning: {warning}")
    spec = ModelSpec.of(base, train)
    base_dict = {**base.to_dict(), "download": False}

    s1, s1_run, o1 = run_stage(opts, tracker, cell, "stage1", cell_run,
                               stage1_space(opts.small_spaces), base_dict, (train, test))
    p1, m1, ckpt1 = best(s1, STAGE1_SEARCHED)
    opts.log(f"{cell.name} stage 1 winner: {p1} val acc {m1[METRIC]:.4f} "
             f"test acc {m1['test_accuracy']:.4f}")
    winner_cfg = RunConfig.from_dict({**base_dict, **p1})
    done = compute_maps(opts, winner_cfg, cell, ckpt1, train)
    maps = done.store.path.resolve()
    _, val = train_val_split(len(train), winner_cfg.val_fraction, seed=winner_cfg.seed)
    chance = chance_warning(m1[METRIC], train.labels[torch.as_tensor(val)])
    found = ([chance] if chance else []) + done.warnings  # chance level, flat maps
    for warning in found:
        opts.log(f"{cell.name}: warning: {warning}")
    warnings = data_warnings + found
    if warnings:
        tracker.tags(cell_run, {"impactx.warnings": "\n".join(warnings)})
    log_winner(tracker, s1_run, p1, m1, load_stage1(ckpt1, spec))

    # Stage 2 and the comparison methods read the stage-1 winner and its map store.
    on_winner = {**base_dict, STAGE1_CHECKPOINT: str(ckpt1), MAPS: str(maps)}
    space2 = stage2_space(opts.small_spaces, opts.full_stage2, winner=p1)
    s2, s2_run, o2 = run_stage(opts, tracker, cell, "stage2", cell_run, space2, {**on_winner, **p1},
                           (train, test))
    p2, m2, ckpt2 = best(s2, tuple(space2.grid))
    opts.log(f"{cell.name} stage 2 winner: {p2} val acc {m2[METRIC]:.4f} "
             f"test acc {m2['test_accuracy']:.4f}")
    log_winner(tracker, s2_run, p2, m2, load_model(ckpt2, spec, METHODS["impactx"])[0])

    # ABN and WAE (single-stage IMPACTX, if asked) with the stage-1 winner's hyperparameters;
    # single-stage IMPACTX takes stage 2's λ (the other two have none).
    s3, s3_run, _ = run_stage(opts, tracker, cell, "comparison", cell_run,
                           Space({**{k: (v,) for k, v in p1.items()}, METHOD: opts.comparison}),
                           {**on_winner, "lam": p2.get("lam", base.lam)}, (train, test))
    others = {r.config[METHOD]: r for r in s3 if r.error is None and r.checkpoint is not None}
    tracker.metrics(s3_run, {f"{m}_test_accuracy": r.metrics["test_accuracy"]
                             for m, r in others.items()})
    tracker.finish(s3_run)

    row = {"model": cell.model, "dataset": cell.dataset,
           "baseline_test_accuracy": m1["test_accuracy"], "impactx_test_accuracy": m2["test_accuracy"],
           **{f"{m}_test_accuracy": r.metrics["test_accuracy"] for m, r in others.items()},
           "baseline_val_accuracy": m1[METRIC], "impactx_val_accuracy": m2[METRIC],
           **{k: p1[k] for k in STAGE1_SEARCHED}, "lam": p2.get("lam"),
           "stage1_failed": len(s1.errors), "stage2_failed": len(s2.errors),
           "comparison_failed": len(s3.errors), "warnings": warnings, **o1.row("stage1"),
           **o2.row("stage2")}
    if opts.morf_images:
        abn = others.get("abn")
        summary = morf_for_cell(opts, tracker, cell, cell_run, winner_cfg, test, ckpt2,
                                Path(abn.checkpoint.path) / CHECKPOINT_FILE if abn else None)
        row.update(aopc=summary["aopc"], metrics=summary["metrics"], sanity=summary["sanity"])
        tracker.metrics(cell_run, summary["flat_metrics"])  # morf.<replacement>.<method>.<measure>
    tracker.params(cell_run, {k: row[k] for k in (*STAGE1_SEARCHED, *STAGE2_SEARCHED)})
    tracker.metrics(cell_run, {k: v for k, v in row.items() if k.endswith("accuracy")})
    tracker.metrics(cell_run, {f"aopc_{m.replace(' ', '_').replace('(', '').replace(')', '')}": v
                               for m, v in (row.get("aopc") or {}).items()})
    tracker.finish(cell_run)
    write_json(opts.out / "cells" / cell.name / "result.json", row, sort_keys=False)
    return row


def morf_for_cell(opts: SweepOptions, tracker: Tracker, cell: Cell, cell_run: str,
                  cfg: RunConfig, test: ImageData, impactx_ckpt: Path,
                  abn_ckpt: Path | None) -> dict[str, Any]:
    """The cell's MoRF comparison (``morf_task`` on the cluster); its figures logged to MLflow.
    Returns ``morf.json``'s summary."""
    import ray

    out = (opts.out / "cells" / cell.name / "morf").resolve()
    opts.log(f"{cell.name}: MoRF/LeRF comparison and sanity checks on {opts.morf_images} test "
             f"images ({', '.join(opts.replacements)}) -> {out}")
    task = ray.remote(num_cpus=opts.cpus_per_trial, num_gpus=opts.gpus_per_trial)(morf_task)
    summary = ray.get(task.remote(str(out), cfg.to_dict(), test, impactx_ckpt, abn_ckpt,
                                  opts.morf_images, opts.replacements))
    for figure in summary["figures"]:
        tracker.artifact(cell_run, figure, "figures")
    tracker.artifact(cell_run, out / "morf.json", "morf")  # the curves' measures with their CIs
    return summary


def claim_out(opts: SweepOptions) -> SweepIdentity:
    """The sweep's identity in ``--out``, checked against a sweep already there (before Ray
    starts; a mismatch is a one-line UserError and changes nothing)."""
    opts.out.mkdir(parents=True, exist_ok=True)
    hold(opts.out, what="sweep directory")  # until this driver exits: one sweep per --out
    return claim(opts.out, opts.settings(), name=opts.name, restart=opts.restart, log=opts.log)


def run_sweep(opts: SweepOptions, sweep: SweepIdentity | None = None) -> list[dict[str, Any]]:
    sweep = sweep or claim_out(opts)
    opts.log(f"sweep {sweep.name}: MLflow experiment {sweep.experiment!r} at "
             f"{tracking_uri(opts.out)}")
    tracker = Tracker(tracking_uri(opts.out), experiment=sweep.experiment,
                      artifact_location=artifact_location(opts.out),
                      key_prefix=sweep.key(""), tags={"impactx.sweep": sweep.name})
    sweep_run = tracker.run_id("sweep", f"sweep {sweep.name}")
    tracker.params(sweep_run, {"smoke": opts.smoke, "full_stage2": opts.full_stage2,
                               "cells": ",".join(c.name for c in opts.cells),
                               "search": opts.search.label, **opts.search.settings(),
                               **{k: v for k, v in opts.base.items() if v is not None}})
    rows = []
    for cell in opts.cells:
        try:
            rows.append(run_cell(opts, tracker, cell, sweep_run))
        except StageFailed as e:
            opts.log(f"{cell.name}: stopped: {e}; the sweep goes on with the other cells")
            tracker.finish(tracker.run_id(cell.name, cell.name, parent=sweep_run), ok=False)
            rows.append({"model": cell.model, "dataset": cell.dataset, "error": str(e),
                         "failed_trials": e.failed})
    # the sweep run answers "what won, found how" without opening the cells
    tracker.params(sweep_run, {f"winner.{Cell(r['model'], r['dataset']).name}":
                               ", ".join(f"{k}={r.get(k)}" for k in (*STAGE1_SEARCHED,
                                                                    *STAGE2_SEARCHED))
                               + f" ({r.get('stage1_search')}, {r.get('stage2_search')})"
                               for r in rows if "error" not in r})
    tracker.metrics(sweep_run, {f"{stage}_{k}": sum(r.get(f"{stage}_{k}", 0) for r in rows)
                                for stage in STAGE_METHODS
                                for k in ("trials", "early_stopped", "trial_epochs")})
    paths = write_summary(opts.out, rows)
    for path in paths:
        tracker.artifact(sweep_run, path)
    tracker.finish(sweep_run)
    return rows


def options_from(out: Path, cells: list[Cell], **kw: Any) -> SweepOptions:
    """SweepOptions with a validated base RunConfig (bad values fail before Ray starts)."""
    names = {f.name for f in dataclasses.fields(SweepOptions)}
    base = {k: v for k, v in kw.items() if k not in names}
    for cell in cells:
        RunConfig.from_dict({**base, "model": cell.model, "dataset": cell.dataset})
    for flag, key, minimum in (("--cpus-per-trial", "cpus_per_trial", 1e-9),
                               ("--gpus-per-trial", "gpus_per_trial", 0.0),
                               ("--map-workers", "map_workers", 1),
                               ("--max-failures", "max_failures", 0),
                               ("--morf-images", "morf_images", 0)):
        value = kw.get(key)
        if value is not None and value < minimum:
            raise UserError(f"{flag} must be >= {minimum:g}, got {value!r}")
    for flag, key, allowed in (("--comparison", "comparison", tuple(COMPARABLE_METHODS)),
                               ("--replacement", "replacements", REPLACEMENTS)):
        for value in kw.get(key) or ():
            if value not in allowed:
                raise UserError(f"{flag}: unknown {value!r}; use one or more of "
                                f"{', '.join(allowed)}")
        if key in kw and not kw[key]:
            raise UserError(f"{flag} needs at least one of {', '.join(allowed)}")
        if key in kw:
            kw[key] = tuple(dict.fromkeys(kw[key]))  # in the order asked, once each
    return SweepOptions(out=out, cells=cells, base=base, **{k: v for k, v in kw.items()
                                                           if k in names})
