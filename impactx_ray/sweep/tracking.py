"""MLflow bookkeeping for sweeps — the only module that imports MLflow.

All writes happen in the driver process (SQLite allows one writer): Tune trials report to Tune,
and ``MLflowTrialLogger``, a Tune callback running in the driver, turns their results into runs.
Runs are found again by an ``impactx.key`` tag, so a resumed sweep reuses its runs instead of
duplicating them. Nesting: sweep → cell → stage → trial, through ``mlflow.parentRunId`` tags.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from ray import tune

from impactx_ray.pipeline.record import finite_metrics
from impactx_ray.sweep.search import stopped_early

EXPERIMENT = "impactx"
KEY_TAG = "impactx.key"
EARLY_STOPPED_TAG = "impactx.early_stopped"  # "true" on trials the scheduler stopped
NODE_TAG = "impactx.node_id"  # the Ray node a trial ran on
# MLflow 3 opens an experiment of this kind in its model-training view (not the GenAI one).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# What trials report besides Tune's own bookkeeping (timestamps, pids, iteration counters).
# Test accuracy is not among them: it is logged on the stage winners only, so the trials
# invite no selection by it.
METRIC_PREFIXES = ("train_", "val_", "best_")
RUN_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run id


def tracking_uri(out: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set (a server, for clusters), else ``sqlite:///<out>/mlflow.db``
    with an absolute path (Tune changes trials' working directories)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(out).resolve()}/mlflow.db"


def artifact_location(out: str | Path) -> str | None:
    """With the embedded store, artifacts go beside it in ``<out>/mlartifacts`` (MLflow's
    default, ``./mlruns``, would follow the driver's working directory); a server decides itself."""
    return None if os.environ.get("MLFLOW_TRACKING_URI") else (
        (Path(out) / "mlartifacts").resolve().as_uri())


class Tracker:
    """``pipeline.record.Recorder`` on MLflow: runs addressed by key, each found again by its
    ``impactx.key`` tag or created on ``start``; no use of MLflow's global active-run state."""

    def __init__(self, uri: str, experiment: str = EXPERIMENT,
                 artifact_location: str | None = None, key_prefix: str = "",
                 tags: dict[str, str] | None = None) -> None:
        self.uri, self.experiment, self.artifact_location = uri, experiment, artifact_location
        self.key_prefix = key_prefix      # the sweep's id: keys of another sweep never match
        self.run_tags = dict(tags or {})  # set on every run this tracker creates
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._ids: dict[str, str] = {}  # key -> MLflow run id, of the runs started or found

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with its experiment state
        return {**self.__dict__, "_client": None, "_experiment_id": None, "_ids": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"_ids": {}, **state})  # pickles of earlier versions had no _ids

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.uri)
            exp = self._client.get_experiment_by_name(self.experiment)
            self._experiment_id = (exp.experiment_id if exp is not None else
                                   self._client.create_experiment(
                                       self.experiment, artifact_location=self.artifact_location,
                                       tags=EXPERIMENT_KIND))
            if exp is not None and not set(EXPERIMENT_KIND) <= set(exp.tags):
                for key, value in EXPERIMENT_KIND.items():
                    self._client.set_experiment_tag(self._experiment_id, key, value)
        return self._client

    def _find(self, key: str) -> Any:
        found = self.client.search_runs([self._experiment_id],
                                        f"tags.`{KEY_TAG}` = '{self.key_prefix + key}'",
                                        max_results=1)
        return found[0] if found else None

    def id_of(self, key: str) -> str:
        """The MLflow run id of the run ``key`` (started, or found again by its tag). A sweep
        directory of an earlier version may hand over a run id itself: it is taken as one."""
        if key not in self._ids:
            found = self._find(key)
            if found is None:
                if RUN_ID.fullmatch(key):
                    return key
                raise KeyError(f"no MLflow run with key {key!r}: start it first")
            self._ids[key] = found.info.run_id
        return self._ids[key]

    def start(self, key: str, name: str, parent: str | None = None) -> str:
        """Find the run tagged ``key`` again (a resumed sweep; set RUNNING unless finished) or
        create it under ``parent``'s run; returns ``key``."""
        found = self._find(key)
        if found is not None:
            run_id = found.info.run_id
            if found.info.status != "FINISHED":
                self.client.update_run(run_id, status="RUNNING")
        else:
            tags = {**self.run_tags, KEY_TAG: self.key_prefix + key}
            if parent is not None:
                tags["mlflow.parentRunId"] = self.id_of(parent)
            run_id = self.client.create_run(self._experiment_id, tags=tags,
                                            run_name=name).info.run_id
        self._ids[key] = run_id
        return key

    def params(self, key: str, params: Mapping[str, Any]) -> None:
        run_id = self.id_of(key)
        logged = self.client.get_run(run_id).data.params
        new = [Param(k, str(v)) for k, v in sorted(params.items()) if k not in logged]
        for start in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[start:start + 100])

    def metrics(self, key: str, metrics: Mapping[str, Any], step: int = 0) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in finite_metrics(metrics).items()]
        if batch:
            self.client.log_batch(self.id_of(key), metrics=batch)

    def tags(self, key: str, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.id_of(key), tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self, key: str, ok: bool = True) -> None:
        status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
        self.client.set_terminated(self.id_of(key), status=status)

    def artifact(self, key: str, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.id_of(key), str(path), artifact_path=folder)

    def model(self, key: str, model: Any, name: str = "model") -> None:
        """Log a torch model with ``mlflow.pytorch``: pickled whole (``mlflow.pytorch.load_model``
        needs impactx-ray importable), requirements given rather than inferred."""
        run_id = self.id_of(key)
        mlflow.set_tracking_uri(self.uri)
        # The pickle format is chosen knowingly (pt2 cannot export every timm model); mute the
        # warning it logs on every call.
        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
        with mlflow.start_run(run_id=run_id):
            mlflow.pytorch.log_model(model.cpu(), name=name, serialization_format="pickle",
                                     pip_requirements=["torch", "impactx-ray"])
        self.client.update_run(run_id, status="RUNNING")


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

    def _run(self, trial: Any) -> str:
        """The trial's run key, its run started (with params and tags) on first use."""
        if trial.trial_id not in self.runs:
            name = ", ".join(f"{k}={trial.config[k]}" for k in self.param_keys)
            key = self.tracker.start(self.trial_key(trial.config, trial.trial_id), name,
                                     parent=self.parent)
            self.tracker.params(key, self.params_of(trial.config))
            self.tracker.tags(key, {**self.tags_of(trial.config), "impactx.trial_id": trial.trial_id})
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
