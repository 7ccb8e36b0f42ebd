"""The paper's experiment on Ray Tune: per (model, dataset) cell, the Table 1 grid for stage 1,
SHAP maps of the winner over Ray workers, the λ grid for stage 2, ABN and WAE (and, when asked,
single-stage IMPACTX) with the stage-1 winner's hyperparameters, test accuracies of the winners and
the MoRF/LeRF comparison of the maps with its sanity checks.

Layout of ``<out>``: ``tune/<cell>-{stage1,stage2,comparison}/`` (Tune experiments, restorable),
``cells/<cell>/maps/<key>/`` (the winner's map store), ``cells/<cell>/{result.json,morf/}``,
``mlflow.db`` (embedded tracking, unless ``MLFLOW_TRACKING_URI``), ``tracking/`` (the journal of
what was logged, sweep/journal.py), ``summary.{md,csv}``.
Rerunning the same command resumes: finished Tune experiments are restored (finished trials are
not rerun), the map store resumes by shard, and MLflow runs are found again by key instead of
duplicated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from impactx_ray.capacity import Bundle, at_once
from impactx_ray.checks import chance_warning
from impactx_ray.config import RunConfig
from impactx_ray.data import ImageData, load_dataset
from impactx_ray.defaults import CHECKPOINT_FILE
from impactx_ray.explain import ExplainSettings
from impactx_ray.io import write_json
from impactx_ray.lock import hold
from impactx_ray.methods import METHODS, ModelSpec, load_model, load_stage1
from impactx_ray.pipeline import MapsDone, result_row, stage1_maps
from impactx_ray.pipeline.record import record_evaluation
from impactx_ray.report import write_summary
from impactx_ray.serve import registered_name
from impactx_ray.sweep.identity import SweepIdentity, claim
from impactx_ray.sweep.morf_task import morf_task
from impactx_ray.sweep.options import SweepOptions
from impactx_ray.sweep.spaces import STAGE1_SEARCHED, STAGE2_SEARCHED, Cell, Space, stage1_space, stage2_space
from impactx_ray.sweep.stage import METRIC, StageFailed, best, run_stage
from impactx_ray.sweep.tracking import Tracker, artifact_location, tracking_uri
from impactx_ray.sweep.trainables import MAP_STORE, METHOD, STAGE1_CHECKPOINT, STAGE_METHODS
from impactx_ray.train import Split

TRACKING_JOURNAL = "tracking"  # <out>/tracking: what the sweep logs, kept until MLflow has it


def compute_maps(opts: SweepOptions, cfg: RunConfig, cell: Cell, checkpoint: Path,
                 train: ImageData) -> MapsDone:
    """The winner's SHAP maps over Ray workers (the shared maps step), into a store shared by
    every stage-2 trial."""
    from impactx_ray.explain.actors import default_gpus_per_worker, init_ray

    init_ray()
    gpus = (opts.gpus_per_map_worker if opts.gpus_per_map_worker is not None
            else default_gpus_per_worker(opts.log))
    # as asked; by default one per GPU (or CPU) the cluster has, or its autoscaler may launch
    workers = opts.map_workers or at_once(Bundle(1.0, gpus))
    return stage1_maps(checkpoint, ModelSpec.of(cfg, train), train, ExplainSettings.from_config(cfg),
                       opts.out / "cells" / cell.name / "maps", device=torch.device("cpu"),
                       workers=workers, gpus_per_worker=gpus, worker_device=cfg.device,
                       progress=True, workers_flag="--map-workers")


def log_winner(tracker: Tracker, stage_run: str, params: dict, metrics: dict) -> None:
    """A stage's parent run carries its best child's params and metrics."""
    tracker.params(stage_run, {f"best_{k}": v for k, v in params.items()})
    tracker.metrics(stage_run, {k: v for k, v in metrics.items()
                                if k.startswith(("best_", "test_", "val_"))})


def register_winner(tracker: Tracker, run: str, cell: Cell, method: str, checkpoint: Path,
                    metrics: dict, test: ImageData, sweep_name: str) -> None:
    """The winner of ``method`` in ``cell`` as a registered pyfunc model (a new version of
    ``impactx-<cell>-<method>`` per sweep), logged in its stage's run ``run``."""
    example = test.images[:2].permute(0, 2, 3, 1).numpy()  # 2×3×H×W -> 2×H×W×3, the model's input
    tracker.register(run, checkpoint, registered_name(cell.name, method), example,
                     {"impactx.sweep": sweep_name, "impactx.cell": cell.name, "impactx.method": method,
                      "test_accuracy": metrics["test_accuracy"], "val_accuracy": metrics[METRIC],
                      "impactx.checkpoint": checkpoint.resolve()})


def run_cell(opts: SweepOptions, tracker: Tracker, cell: Cell, sweep_run: str,
             sweep_name: str) -> dict[str, Any]:
    cell_run = tracker.start(cell.name, cell.name, parent=sweep_run)
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
    store_path = done.store.path.resolve()
    val = Split.of(train, winner_cfg.val_fraction, winner_cfg.seed).val_idx
    chance = chance_warning(m1[METRIC], train.labels[val])
    found = ([chance] if chance else []) + done.warnings  # chance level, flat maps
    for warning in found:
        opts.log(f"{cell.name}: warning: {warning}")
    warnings = data_warnings + found
    if warnings:
        tracker.tags(cell_run, {"impactx.warnings": "\n".join(warnings)})
    load_stage1(ckpt1, spec)  # a winner that does not load stops the cell here
    log_winner(tracker, s1_run, p1, m1)
    register_winner(tracker, s1_run, cell, "baseline", Path(ckpt1), m1, test, sweep_name)
    tracker.finish(s1_run)

    # Stage 2 and the comparison methods read the stage-1 winner and its map store.
    on_winner = {**base_dict, STAGE1_CHECKPOINT: str(ckpt1), MAP_STORE: str(store_path)}
    space2 = stage2_space(opts.small_spaces, opts.full_stage2, winner=p1)
    s2, s2_run, o2 = run_stage(opts, tracker, cell, "stage2", cell_run, space2, {**on_winner, **p1},
                           (train, test))
    p2, m2, ckpt2 = best(s2, tuple(space2.grid))
    opts.log(f"{cell.name} stage 2 winner: {p2} val acc {m2[METRIC]:.4f} "
             f"test acc {m2['test_accuracy']:.4f}")
    load_model(ckpt2, spec, METHODS["impactx"])
    log_winner(tracker, s2_run, p2, m2)
    register_winner(tracker, s2_run, cell, "impactx", Path(ckpt2), m2, test, sweep_name)
    tracker.finish(s2_run)

    # ABN and WAE (single-stage IMPACTX, if asked) with the stage-1 winner's hyperparameters;
    # single-stage IMPACTX takes stage 2's λ (the other two have none).
    s3, s3_run, _ = run_stage(opts, tracker, cell, "comparison", cell_run,
                           Space({**{k: (v,) for k, v in p1.items()}, METHOD: opts.comparison}),
                           {**on_winner, "lam": p2.get("lam", base.lam)}, (train, test))
    others = {r.config[METHOD]: r for r in s3 if r.error is None and r.checkpoint is not None}
    tracker.metrics(s3_run, {f"{m}_test_accuracy": r.metrics["test_accuracy"]
                             for m, r in others.items()})
    for m, r in others.items():
        register_winner(tracker, s3_run, cell, m, Path(r.checkpoint.path) / CHECKPOINT_FILE,
                        r.metrics, test, sweep_name)
    tracker.finish(s3_run)

    summary = None
    if opts.morf_images:
        abn = others.get("abn")
        summary = morf_for_cell(opts, cell, winner_cfg, test, ckpt2,
                                Path(abn.checkpoint.path) / CHECKPOINT_FILE if abn else None)
    winners = {"baseline": m1, "impactx": m2, **{m: r.metrics for m, r in others.items()}}
    accuracies = {f"{m}_{which}_accuracy": metrics[key] for m, metrics in winners.items()
                  for which, key in (("val", METRIC), ("test", "test_accuracy"))}
    # the core every result shares (pipeline/result.py), then how the cell's stages went
    row = {**result_row(winner_cfg.replace(lam=p2.get("lam", base.lam)), accuracies, summary,
                        warnings),
           "stage1_failed": len(s1.errors), "stage2_failed": len(s2.errors),
           "comparison_failed": len(s3.errors), **o1.row("stage1"), **o2.row("stage2")}
    tracker.params(cell_run, {k: row[k] for k in (*STAGE1_SEARCHED, *STAGE2_SEARCHED)})
    record_evaluation(tracker, cell_run, row, summary, opts.out / "cells" / cell.name / "morf")
    tracker.finish(cell_run)
    write_json(opts.out / "cells" / cell.name / "result.json", row, sort_keys=False)
    return row


def morf_for_cell(opts: SweepOptions, cell: Cell, cfg: RunConfig, test: ImageData,
                  impactx_ckpt: Path, abn_ckpt: Path | None) -> dict[str, Any]:
    """The cell's MoRF comparison (``morf_task`` on the cluster); returns ``morf.json``'s
    summary."""
    import ray

    out = (opts.out / "cells" / cell.name / "morf").resolve()
    opts.log(f"{cell.name}: MoRF/LeRF comparison and sanity checks on {opts.morf_images} test "
             f"images ({', '.join(opts.replacements)}) -> {out}")
    task = ray.remote(num_cpus=opts.cpus_per_trial, num_gpus=opts.gpus_per_trial)(morf_task)
    return ray.get(task.remote(str(out), cfg.to_dict(), test, impactx_ckpt, abn_ckpt,
                               opts.morf_images, opts.replacements))


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
    # every record goes through the journal in <out>/tracking: a tracking server that goes away
    # stops no training, and what it missed is logged once it answers (docs/sweeps.md)
    tracker = Tracker(tracking_uri(opts.out), experiment=sweep.experiment,
                      artifact_location=artifact_location(opts.out),
                      key_prefix=sweep.key(""), tags={"impactx.sweep": sweep.name},
                      journal=opts.out / TRACKING_JOURNAL,
                      outage_limit_s=opts.tracking_outage_limit * 60, log=opts.log)
    sweep_run = tracker.start("sweep", f"sweep {sweep.name}")
    tracker.params(sweep_run, {"smoke": opts.smoke, "full_stage2": opts.full_stage2,
                               "cells": ",".join(c.name for c in opts.cells),
                               "search": opts.search.label, **opts.search.settings(),
                               **{k: v for k, v in opts.base.items() if v is not None}})
    rows = []
    for cell in opts.cells:
        try:
            rows.append(run_cell(opts, tracker, cell, sweep_run, sweep.name))
        except StageFailed as e:
            opts.log(f"{cell.name}: stopped: {e}; the sweep goes on with the other cells")
            tracker.finish(tracker.start(cell.name, cell.name, parent=sweep_run), ok=False)
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
    tracker.drain()  # every record in MLflow before the sweep says it is done
    return rows
