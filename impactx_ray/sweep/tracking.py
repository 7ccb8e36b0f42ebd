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
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag

from impactx_ray.errors import UserError
from impactx_ray.io import write_npy
from impactx_ray.pipeline.record import finite_metrics
from impactx_ray.sweep.journal import Journal

EXPERIMENT = "impactx"
KEY_TAG = "impactx.key"
EARLY_STOPPED_TAG = "impactx.early_stopped"  # "true" on trials the scheduler stopped
NODE_TAG = "impactx.node_id"  # the Ray node a trial ran on
TRIAL_ID_TAG = "impactx.trial_id"  # the Tune trial a trial's run records
SUPERSEDED_TAG = "impactx.superseded"  # "true" on trial runs no trial of the finished stage holds
SUPERSEDED_TAGS = {SUPERSEDED_TAG: "true", "mlflow.note.content": (
    "Started before the sweep was killed, after Tune last saved its state: the resumed stage did "
    "not know this trial and ran its slot again as another trial. Not part of the stage's results.")}
# MLflow 3 opens an experiment of this kind in its model-training view (not the GenAI one).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# What trials report besides Tune's own bookkeeping (timestamps, pids, iteration counters).
# Test accuracy is not among them: it is logged on the stage winners only, so the trials
# invite no selection by it.
METRIC_PREFIXES = ("train_", "val_", "best_")
RUN_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run id
# MLflow's HTTP client retries a call for about 4 minutes by default: a Tune callback must not
# block that long. A few seconds, then the journal keeps the record (set these to override).
SHORT_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def tracking_uri(out: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set (a server, for clusters), else ``sqlite:///<out>/mlflow.db``
    with an absolute path (Tune changes trials' working directories)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(out).resolve()}/mlflow.db"


def artifact_location(out: str | Path) -> str | None:
    """With the embedded store, artifacts go beside it in ``<out>/mlartifacts`` (MLflow's
    default, ``./mlruns``, would follow the driver's working directory); a server decides itself."""
    return None if os.environ.get("MLFLOW_TRACKING_URI") else (
        (Path(out) / "mlartifacts").resolve().as_uri())


class MlflowRuns:
    """Runs addressed by key on an MLflow server, each found again by its ``impactx.key`` tag or
    created on ``start``; no use of MLflow's global active-run state. Every call goes to the
    server at once: :class:`Tracker` puts the journal in front of it."""

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

    def supersede(self, parent: str, keep: Iterable[str], keep_ids: Iterable[str],
                  time_ms: int | None = None) -> list[str]:
        """End as KILLED, tagged ``SUPERSEDED_TAGS``, the runs under ``parent`` (its run's children
        with a key under its key) that :func:`orphans` picks; returns their keys."""
        parent_id, under = self.id_of(parent), self.key_prefix + parent + "/"
        # one page: a stage has hundreds of trials at most, a search returns up to 50,000 runs
        found = self.client.search_runs([self._experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                        max_results=50_000)
        runs = {r.data.tags[KEY_TAG][len(self.key_prefix):]: r for r in found
                if r.data.tags.get(KEY_TAG, "").startswith(under)}
        gone = orphans({key: run.data.tags for key, run in runs.items()}, keep, keep_ids)
        for key in gone:
            run_id = runs[key].info.run_id
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in SUPERSEDED_TAGS.items()])
            self.client.set_terminated(run_id, status="KILLED", end_time=time_ms)
        return gone

    def params(self, key: str, params: Mapping[str, Any]) -> None:
        run_id = self.id_of(key)
        logged = self.client.get_run(run_id).data.params
        new = [Param(k, str(v)) for k, v in sorted(params.items()) if k not in logged]
        for start in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[start:start + 100])

    def metrics(self, key: str, metrics: Mapping[str, Any], step: int = 0,
                time_ms: int | None = None) -> None:
        now = int(time.time() * 1000) if time_ms is None else time_ms
        batch = [Metric(k, v, now, step) for k, v in finite_metrics(metrics).items()]
        if batch:
            self.client.log_batch(self.id_of(key), metrics=batch)

    def tags(self, key: str, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.id_of(key), tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self, key: str, ok: bool = True, time_ms: int | None = None) -> None:
        status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
        self.client.set_terminated(self.id_of(key), status=status, end_time=time_ms)

    def artifact(self, key: str, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.id_of(key), str(path), artifact_path=folder)

    def register(self, key: str, checkpoint: str | Path, name: str, example: Any,
                 tags: Mapping[str, Any]) -> str:
        """``checkpoint`` as a pyfunc model in ``key``'s run, registered as ``name`` (serve/registry.py)."""
        from impactx_ray.serve.registry import register

        return register(checkpoint, self.id_of(key), name, example, dict(tags), self.uri)

    def model(self, key: str, model: Any, name: str = "model") -> None:
        """Log a torch model with ``mlflow.pytorch`` (pickled whole): only for ``model`` records
        of journals written before models were registered as pyfunc models (2026-12)."""
        run_id = self.id_of(key)
        mlflow.set_tracking_uri(self.uri)
        # The pickle format is chosen knowingly (pt2 cannot export every timm model); mute the
        # warning it logs on every call.
        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
        with mlflow.start_run(run_id=run_id):
            mlflow.pytorch.log_model(model.cpu(), name=name, serialization_format="pickle",
                                     pip_requirements=["torch", "impactx-ray"])
        self.client.update_run(run_id, status="RUNNING")


def orphans(runs: Mapping[str, Mapping[str, str]], keep: Iterable[str],
            keep_ids: Iterable[str]) -> list[str]:
    """The keys of ``runs`` (key -> tags) that no kept trial holds, by key or by trial id (the
    key of a trial that failed before it reported is unknown: Tune restores no config for it);
    runs already superseded are left as they are, so a record applied twice changes nothing."""
    keep, keep_ids = set(keep), set(keep_ids)
    return sorted(key for key, tags in runs.items() if key not in keep
                  and tags.get(TRIAL_ID_TAG) not in keep_ids
                  and tags.get(SUPERSEDED_TAG) != "true")


class TrackingOutage(UserError):
    """The tracking server stayed unreachable past the outage limit: the sweep stops, resumable."""


class Tracker:
    """``pipeline.record.Recorder`` on MLflow, through the journal (sweep/journal.py): every
    record is kept on disk first, then applied in order; while the server is unreachable the
    records wait (retried every ``RETRY_S``), the sweep goes on, and nothing blocks a Tune callback
    for more than MLflow's short client timeouts. Past ``outage_limit_s`` the next record raises
    :class:`TrackingOutage`. A record the answering server refuses is said and skipped. Without
    ``journal`` every call goes to MLflow at once."""

    RETRY_S = float(os.environ.get("IMPACTX_TRACKING_RETRY_S", 15))

    def __init__(self, uri: str, experiment: str = EXPERIMENT,
                 artifact_location: str | None = None, key_prefix: str = "",
                 tags: dict[str, str] | None = None, journal: str | Path | None = None,
                 outage_limit_s: float = 600.0, log: Callable[[str], None] = print) -> None:
        if uri.startswith(("http://", "https://")):
            for name, value in SHORT_HTTP.items():  # a few seconds per call, not 4 minutes
                os.environ.setdefault(name, value)
        self.runs = MlflowRuns(uri, experiment, artifact_location, key_prefix, tags)
        self.uri, self.journal_dir = uri, Path(journal).resolve() if journal else None
        self.outage_limit_s, self.log = outage_limit_s, log

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with its experiment state
        return {**self.__dict__, "log": print}

    @property
    def journal(self) -> Journal | None:
        return Journal.at(self.journal_dir) if self.journal_dir else None

    # -- the Recorder calls: each one record --------------------------------------------------
    def start(self, key: str, name: str, parent: str | None = None) -> str:
        self._record({"op": "start", "key": key, "name": name, "parent": parent})
        return key

    def params(self, key: str, params: Mapping[str, Any]) -> None:
        self._record({"op": "params", "key": key, "params": {k: str(v) for k, v in params.items()}})

    def metrics(self, key: str, metrics: Mapping[str, Any], step: int = 0) -> None:
        self._record({"op": "metrics", "key": key, "metrics": finite_metrics(metrics),
                      "step": step, "time": int(time.time() * 1000)})

    def tags(self, key: str, tags: Mapping[str, Any]) -> None:
        self._record({"op": "tags", "key": key, "tags": {k: str(v) for k, v in tags.items()}})

    def finish(self, key: str, ok: bool = True) -> None:
        self._record({"op": "finish", "key": key, "ok": ok, "time": int(time.time() * 1000)})

    def supersede(self, parent: str, keep: Iterable[str], keep_ids: Iterable[str]) -> None:
        """End the trial runs under ``parent`` that no trial of its Tune experiment holds (by key or
        trial id) as KILLED, tagged ``impactx.superseded``: a record like the others (the runs are
        looked up when it is applied, once MLflow answers), said in one line if it ends any."""
        self._record({"op": "supersede", "key": parent, "keep": sorted(set(keep)),
                      "keep_ids": sorted(set(keep_ids)), "time": int(time.time() * 1000)})

    def artifact(self, key: str, path: str | Path, folder: str | None = None) -> None:
        kept = self.journal.keep_file(path) if self.journal else str(path)
        self._record({"op": "artifact", "key": key, "path": kept, "folder": folder,
                      "name": Path(path).name})

    def register(self, key: str, checkpoint: str | Path, name: str, example: Any,
                 tags: Mapping[str, Any]) -> None:
        """Log ``checkpoint`` as a pyfunc model in ``key``'s run and register it as ``name``, a
        new version tagged ``tags``; ``example`` is the input example (uint8 N×H×W×3)."""
        tags = {k: str(v) for k, v in tags.items()}
        if self.journal is None:
            self.runs.register(key, checkpoint, name, example, tags)
            return
        kept = self.journal.keep_file(checkpoint)  # Tune may delete the trial's copy
        example_path = f"{kept}.example.npy"
        write_npy(example_path, example)
        self._record({"op": "register", "key": key, "path": kept, "name": name,
                      "example": example_path, "tags": tags})

    def id_of(self, key: str) -> str:
        self.flush(force=True)
        return self.runs.id_of(key)

    # -- the journal ---------------------------------------------------------------------------
    def _record(self, record: dict[str, Any]) -> None:
        if self.journal is None:
            self._apply(record)
            return
        self.journal.append(record)
        self.flush()

    def _apply(self, r: dict[str, Any]) -> None:
        op, key = r["op"], r["key"]
        if op == "start":
            self.runs.start(key, r["name"], parent=r["parent"])
        elif op == "params":
            self.runs.params(key, r["params"])
        elif op == "metrics":
            self.runs.metrics(key, r["metrics"], step=r["step"], time_ms=r["time"])
        elif op == "tags":
            self.runs.tags(key, r["tags"])
        elif op == "finish":
            self.runs.finish(key, ok=r["ok"], time_ms=r["time"])
        elif op == "supersede":
            if gone := self.runs.supersede(key, r["keep"], r["keep_ids"], time_ms=r["time"]):
                self.log(f"{key}: {len(gone)} trial run(s) started before the sweep was killed, their slots "
                         f"run again since: ended as KILLED, tagged {SUPERSEDED_TAG} ({', '.join(gone)})")
        elif op == "artifact":
            self.runs.artifact(key, _named(r["path"], r["name"]), r["folder"])
        elif op == "register":
            import numpy as np

            self.runs.register(key, r["path"], r["name"], np.load(r["example"]), r["tags"])
        elif op == "model":  # journals from before 2026-12
            import torch

            self.runs.model(key, torch.load(r["path"], weights_only=False), r["name"])
        else:
            raise ValueError(f"unknown tracking record {op!r}")

    def flush(self, force: bool = False) -> None:
        """Apply the waiting records in order; while MLflow is unreachable, try again only every
        ``RETRY_S`` (``force``: now). Raises TrackingOutage past the outage limit."""
        journal = self.journal
        if journal is None or not journal.pending():
            return
        now = time.monotonic()
        if journal.behind_since is not None and not force and now - journal.last_try < self.RETRY_S:
            return
        journal.last_try = now
        while journal.pending():
            record = journal.pending()[0]
            try:
                self._apply(record)
            except Exception as e:
                if not server_answers(self.uri):
                    self._behind(e)
                    return
                # The server answers but refuses this record (a value over MLflow's limits, say):
                # said and skipped, or it would stop every later record, on every resume too.
                self.log(f"tracking: MLflow refused a record ({record['op']} of run "
                         f"{record['key']}): {_one_line(e)}; skipped")
            journal.mark_applied()
        if journal.behind_since is not None:
            self.log(f"tracking: MLflow at {self.uri} answers again after "
                     f"{(now - journal.behind_since) / 60:.0f} min; every kept record is logged")
            journal.behind_since = None

    def _behind(self, err: Exception) -> None:
        now, journal = time.monotonic(), self.journal
        if journal.behind_since is None:
            journal.behind_since = now
            self.log(f"tracking: MLflow at {self.uri} does not answer ({_one_line(err)}); training "
                     f"goes on, the records wait in {self.journal.path} and are logged once it "
                     f"answers (limit {self.outage_limit_s / 60:g} min)")
        if self.outage_exceeded():
            raise TrackingOutage(self.outage_line())

    def outage_exceeded(self) -> bool:
        since = self.journal.behind_since if self.journal else None
        return since is not None and time.monotonic() - since > self.outage_limit_s

    def outage_line(self) -> str:
        waited = (time.monotonic() - (self.journal.behind_since or time.monotonic())) / 60
        return (f"MLflow at {self.uri} has not answered for {waited:.0f} min (the limit, "
                f"--tracking-outage-limit); stopped: {len(self.journal.pending())} records wait in "
                f"{self.journal.path}, logged when the same command is run again")

    def behind(self) -> str | None:
        """For the progress line: ``tracking behind: 12 records waiting for MLflow (4 min)``."""
        if self.journal is None or self.journal.behind_since is None:
            return None
        return (f"tracking behind: {len(self.journal.pending())} records waiting for MLflow "
                f"({(time.monotonic() - self.journal.behind_since) / 60:.0f} min)")

    def drain(self) -> None:
        """Wait until every record is logged (the sweep's end): retried every ``RETRY_S`` up to
        the outage limit, then TrackingOutage."""
        while self.journal is not None and self.journal.pending():
            self.flush(force=True)
            if self.journal.pending():
                self.log(self.behind())
                time.sleep(self.RETRY_S)


def server_answers(uri: str) -> bool:
    """Whether the tracking server answers its health check (a non-HTTP store always does)."""
    if not uri.startswith(("http://", "https://")):
        return True
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


def _named(path: str, name: str) -> str:
    """``path`` (a journal copy ``00000012-history.json``) under its original ``name``, which is
    the name MLflow shows."""
    if Path(path).name == name:
        return path
    target = Path(path).parent / f"{Path(path).stem}.d" / name
    target.parent.mkdir(exist_ok=True)
    shutil.copy2(path, target)
    return str(target)


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]
