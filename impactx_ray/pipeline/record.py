"""Where a run or a sweep records what it did: one small interface, runs addressed by key.

A key names a run for good (``sweep``, ``lenet5-digits``, ``lenet5-digits/stage1``, a trial's
grid point under its stage): a resumed sweep finds its runs again by key, and an entry can be
written before any tracking server has given the run an id, so a record made while the server
is away can be kept, in order, and sent later. ``sweep/tracking.py``'s ``Tracker`` records to
MLflow; :class:`FileRecorder` keeps the same entries as JSON lines, for ``impactx run``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol


class Recorder(Protocol):
    def start(self, key: str, name: str, parent: str | None = None) -> str:
        """Open (or find again) the run ``key`` under ``parent``'s; returns ``key``."""

    def params(self, key: str, params: Mapping[str, Any]) -> None: ...

    def metrics(self, key: str, metrics: Mapping[str, Any], step: int = 0) -> None: ...

    def tags(self, key: str, tags: Mapping[str, Any]) -> None: ...

    def artifact(self, key: str, path: str | Path, folder: str | None = None) -> None: ...

    def finish(self, key: str, ok: bool = True) -> None: ...


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The entries of ``metrics`` a tracker can store: finite numbers (bools are not)."""
    return {k: float(v) for k, v in sorted(metrics.items())
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def record_evaluation(recorder: Recorder, key: str, result: Mapping[str, Any],
                      morf: Mapping[str, Any] | None = None, morf_dir: Path | None = None) -> None:
    """What a run's (or a sweep cell's) record holds of its evaluation: every accuracy in
    ``result``; with ``morf`` (``morf.json``'s summary, written to ``morf_dir``) each measure
    (``morf.<replacement>.<method>.<measure>``), AOPC per map, the figures and ``morf.json``."""
    recorder.metrics(key, {k: v for k, v in result.items() if k.endswith("accuracy")})
    if morf is None:
        return
    recorder.metrics(key, morf["flat_metrics"])
    recorder.metrics(key, {f"aopc_{m.replace(' ', '_').replace('(', '').replace(')', '')}": v
                           for m, v in morf["aopc"].items()})
    for figure in morf["figures"]:
        recorder.artifact(key, figure, "figures")
    if morf_dir is not None:
        recorder.artifact(key, Path(morf_dir) / "morf.json", "morf")  # measures with their CIs


class FileRecorder:
    """Each entry appended to ``path`` as one JSON line, ``{"time": ms, "what": ..., "key": ...,
    ...}``, in the order it was recorded (a line is written whole, so a crash loses at most the
    entry being written)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _write(self, what: str, key: str, **entry: Any) -> None:
        line = json.dumps({"time": int(time.time() * 1000), "what": what, "key": key, **entry},
                          default=str)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")

    def start(self, key: str, name: str, parent: str | None = None) -> str:
        self._write("start", key, name=name, parent=parent)
        return key

    def params(self, key: str, params: Mapping[str, Any]) -> None:
        self._write("params", key, params={k: str(v) for k, v in sorted(params.items())})

    def metrics(self, key: str, metrics: Mapping[str, Any], step: int = 0) -> None:
        self._write("metrics", key, metrics=finite_metrics(metrics), step=step)

    def tags(self, key: str, tags: Mapping[str, Any]) -> None:
        self._write("tags", key, tags={k: str(v) for k, v in tags.items()})

    def artifact(self, key: str, path: str | Path, folder: str | None = None) -> None:
        self._write("artifact", key, path=str(Path(path).resolve()), folder=folder)

    def finish(self, key: str, ok: bool = True) -> None:
        self._write("finish", key, ok=ok)

    def entries(self) -> list[dict[str, Any]]:
        """Every entry so far, in order."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
