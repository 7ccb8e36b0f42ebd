"""Trials as MLflow runs: a Tune callback in the driver turns Tune's trial events into records
of the sweep's ``Tracker`` (tracking.py), which keeps them through an outage of the server."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ray import tune

from impactx_ray.sweep.search import stopped_early
from impactx_ray.sweep.tracking import EARLY_STOPPED_TAG, METRIC_PREFIXES, NODE_TAG, TRIAL_ID_TAG, Tracker


class MLflowTrialLogger(tune.Callback):
    """Tune callback (driver side): one MLflow run per trial, params, per-epoch metrics, status."""

    def __init__(self, tracker: Tracker, stage_key: str, parent: str,  # the stage run's key
                 param_keys: tuple[str, ...],
                 params_of: Callable[[dict[str, Any]], dict[str, Any]],
                 tags_of: Callable[[dict[str, Any]], dict[str, str]],
                 sampled: bool = False) -> None:
        self.tracker, self.stage_key, self.parent = tracker, stage_key, parent
        self.param_keys = param_keys  # the grid's keys: they name the trial
        self.params_of = params_of    # a trial's config -> the params it varies or uses
        self.tags_of = tags_of        # a trial's config -> its tags (cell, stage, method)
        # A sampled search (Optuna) can draw one point twice: its trials are told apart by id.
        self.sampled = sampled
        self.runs: dict[str, str] = {}
        self.placed: dict[str, str] = {}  # trial id -> the node its run is tagged with

    def trial_key(self, config: dict[str, Any], trial_id: str = "") -> str:
        point = ",".join(f"{k}={config[k]}" for k in self.param_keys)
        return f"{self.stage_key}/{point}" + (f"#{trial_id}" if self.sampled else "")

    def held(self, results: Iterable[Any]) -> tuple[set[str], set[str]]:
        """The run keys and trial ids of the trials in ``results`` (a ResultGrid). A trial that
        failed before it reported has no config in a restored experiment: its id names its run."""
        results = list(results)
        ids = {(r.metrics or {}).get("trial_id") for r in results} - {None}
        keys = {self.trial_key(r.config, (r.metrics or {}).get("trial_id", "")) for r in results if r.config}
        return keys, ids

    def _run(self, trial: Any) -> str:
        """The trial's run key, its run started (with params and tags) on first use."""
        if trial.trial_id not in self.runs:
            name = ", ".join(f"{k}={trial.config[k]}" for k in self.param_keys)
            key = self.tracker.start(self.trial_key(trial.config, trial.trial_id), name,
                                     parent=self.parent)
            self.tracker.params(key, self.params_of(trial.config))
            self.tracker.tags(key, {**self.tags_of(trial.config), TRIAL_ID_TAG: trial.trial_id})
            self.runs[trial.trial_id] = key
        return self.runs[trial.trial_id]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._run(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        ours = {k: v for k, v in result.items() if k.startswith(METRIC_PREFIXES)}
        key = self._run(trial)
        self.tracker.metrics(key, ours, step=step)
        node = result.get("node_id")
        if node and self.placed.get(trial.trial_id) != node:  # where it runs (a retry: the new node)
            self.tracker.tags(key, {NODE_TAG: node, "impactx.host": result.get("hostname", "-")})
            self.placed[trial.trial_id] = node

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        key = self._run(trial)
        history = Path(trial.checkpoint.path) / "history.json" if trial.checkpoint else None
        if history is not None and history.is_file():
            self.tracker.artifact(key, history)  # every epoch's metrics, as the trial saw them
        # A trial the scheduler (ASHA) stopped ends without its final report: finished, not
        # failed, its per-epoch curves kept, and tagged so it can be filtered in the UI.
        last = trial.last_result or {}
        self.tracker.tags(key, {EARLY_STOPPED_TAG: str(stopped_early(last)).lower(),
                                "impactx.epochs_run": last.get("epoch", "-")})
        self.tracker.finish(key, ok=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        key = self._run(trial)
        self.tracker.tags(key, {"impactx.error": str(trial.error_file or "see Tune logs")})
        self.tracker.finish(key, ok=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "runs": {}, "placed": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"placed": {}, **state})  # loggers pickled by earlier versions
