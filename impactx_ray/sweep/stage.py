"""One stage of a sweep cell on Ray Tune: its search run (or restored), how it went, its winner."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ray import tune

from impactx_ray.capacity import Bundle, at_once, make_room
from impactx_ray.data import ImageData
from impactx_ray.defaults import CHECKPOINT_FILE, SELECTION_METRIC
from impactx_ray.errors import UserError
from impactx_ray.explain.dispatch import user_error_in
from impactx_ray.methods import get_method
from impactx_ray.sweep.options import SweepOptions
from impactx_ray.sweep.progress import StageProgress
from impactx_ray.sweep.search import SearchSpec, stopped_early, tune_plan
from impactx_ray.sweep.spaces import Cell, Space
from impactx_ray.sweep.tracking import Tracker, TrackingOutage
from impactx_ray.sweep.trainables import CPUS, STAGE_METHODS, STAGE_TRAINABLES, run_config, trial_params, trial_tags
from impactx_ray.sweep.trial_logger import MLflowTrialLogger

METRIC = SELECTION_METRIC  # selection is by validation accuracy, never test accuracy


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
    stage_run = tracker.start(key, f"{cell.name} {stage}", parent=parent)
    tracker.tags(stage_run, {"impactx.cell": cell.name, "impactx.stage": stage})
    search = (opts.search if stage in STAGE_METHODS else SearchSpec()).for_space(space)
    plan = tune_plan(space, search, get_method(STAGE_METHODS.get(stage, "baseline")).epochs(
        run_config(base)), METRIC, slots=trial_slots(opts))
    # trials queue for the nodes up now; an autoscaler is asked for nodes for those beyond them
    room = make_room("trials", "--gpus-per-trial" if opts.gpus_per_trial else "--cpus-per-trial",
                     trial_bundle(opts), plan.trials, opts.log, queue=True)
    storage = (opts.out / "tune").resolve()
    path = storage / f"{cell.name}-{stage}"
    resources = {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial}
    # the cell's data goes to the object store once; every trial on a node reads that copy
    trainable = tune.with_resources(tune.with_parameters(STAGE_TRAINABLES[stage], data=data),
                                    resources)
    # a restored experiment brings its own (pickled) logger; this one also names the runs its trials hold
    logger = MLflowTrialLogger(tracker, key, stage_run, tuple(space.grid),
                               params_of=partial(trial_params, stage, tuple(space.grid)),
                               tags_of=partial(trial_tags, cell.name, stage),
                               sampled=search.search != "grid")
    if tune.Tuner.can_restore(path):
        opts.log(f"{key}: resuming the Tune experiment in {path}")
        tuner = tune.Tuner.restore(str(path), trainable, resume_errored=False)
    else:
        opts.log(f"{key}: {search.label}, {plan.trials} trials")
        tuner = tune.Tuner(
            trainable,
            param_space={**base, CPUS: opts.cpus_per_trial, **plan.param_space},
            tune_config=tune.TuneConfig(**plan.tune_config),
            run_config=tune.RunConfig(
                name=path.name, storage_path=str(storage), verbose=0,
                callbacks=[logger, StageProgress(key, plan.trials, opts.log, room=room,
                                                 behind=tracker.behind)],
                failure_config=tune.FailureConfig(max_failures=opts.max_failures),
                # the last checkpoint holds the last epoch's state and the best weights so far
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    try:
        results = tuner.fit()
    except Exception:
        # the trial logger raised TrackingOutage inside Tune (which wraps it): stop in one line;
        # Tune's state and the journal are on disk, so the same command resumes
        if tracker.outage_exceeded():
            raise TrackingOutage(tracker.outage_line()) from None
        raise
    finally:
        room.release()  # the autoscaler may let idle nodes go
    if tracker.outage_exceeded():  # Tune may have ended the stage on the callback's error
        raise TrackingOutage(tracker.outage_line())
    # A trial Tune started after it last saved its state has its run already when the sweep is
    # killed; the restored experiment does not know that trial and runs its slot again as another
    # (a new Optuna draw, a new key). Such runs, which no trial here holds, end as KILLED, tagged
    # superseded. Done on a fresh stage too: a sweep killed before Tune first saved leaves them.
    tracker.supersede(key, *logger.held(results))
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


def trial_bundle(opts: SweepOptions) -> Bundle:
    return Bundle(opts.cpus_per_trial, opts.gpus_per_trial)


def trial_slots(opts: SweepOptions) -> int:
    """How many trials the cluster fits at once: on the nodes up now, or on those its autoscaler
    may launch when it says how many (by CPUs, and GPUs where trials take them)."""
    return at_once(trial_bundle(opts))


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
        refused = [user_error_in(e) for e in results.errors]
        if refused and all(refused):  # every trial refused to start (a GPU torch cannot use, say):
            raise UserError(refused[0])  # the user's to fix, and every other stage would too
        first = str(results.errors[0]).strip().splitlines()[-1][:200] if results.errors else "-"
        raise StageFailed(f"none of its {len(results)} trials finished (first error: {first})",
                          failed=len(results.errors))
    params = {k: winner.config[k] for k in keys}
    return params, dict(winner.metrics), Path(winner.checkpoint.path) / CHECKPOINT_FILE
