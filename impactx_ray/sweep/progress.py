"""A live progress line per stage, so a 180-trial stage that runs for hours is not silent:

    lenet5-cifar10/stage1: 12/180 done, 2 running, 1 failed; best val acc 0.6421; 0:41:05 elapsed, ETA 9:34:12

A Tune callback in the driver. It counts from the trial list Tune hands it at every step, so a
restored stage (whose finished trials never start again) is counted right too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from ray import tune

from impactx_ray.capacity import Room
from impactx_ray.defaults import SELECTION_METRIC
from impactx_ray.sweep.search import stopped_early

METRIC = SELECTION_METRIC


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def progress_line(label: str, statuses: list[str], best: float | None, elapsed: float,
                  total: int, early: int = 0) -> str:
    """The line for trials in ``statuses`` (Tune's TERMINATED/RUNNING/ERROR/PENDING/...), of
    which ``early`` ended stopped by the scheduler."""
    done, failed = statuses.count("TERMINATED"), statuses.count("ERROR")
    running = statuses.count("RUNNING")
    finished = done + failed
    eta = (f", ETA {_clock(elapsed / finished * (total - finished))}"
           if 0 < finished < total else "")
    best_text = f"best val acc {best:.4f}" if best is not None else "no result yet"
    stopped = f" ({early} stopped early)" if early else ""
    return (f"{label}: {done}/{total} done{stopped}, {running} running, {failed} failed; "
            f"{best_text}; "
            f"{_clock(elapsed)} elapsed{eta}")


class StageProgress(tune.Callback):
    """Logs :func:`progress_line` when a trial starts, ends or fails, and at least every
    ``every`` seconds while trials run."""

    def __init__(self, label: str, total: int, log: Callable[[str], None] = print,
                 every: float = 60.0, room: Room | None = None,
                 behind: Callable[[], str | None] | None = None) -> None:
        self.label, self.total, self.log, self.every = label, total, log, every
        self.room = room  # the autoscaler's request for these trials, if one was made
        self.behind = behind  # "tracking behind: ..." while MLflow does not answer
        self.start: float | None = None
        self.last_line, self.last_time = "", 0.0

    def on_step_end(self, iteration: int, trials: list, final: bool = False, **info: Any) -> None:
        now = time.monotonic()
        self.start = self.start or now
        scores = [t.last_result.get(METRIC) for t in trials if t.last_result]
        scores = [s for s in scores if isinstance(s, (int, float)) and s == s]  # no NaN
        counts = [t.status for t in trials]
        early = sum(t.status == "TERMINATED" and stopped_early(t.last_result) for t in trials)
        line = progress_line(self.label, counts, max(scores) if scores else None,
                             now - self.start, max(self.total, len(trials)), early)
        if self.room is not None and self.room.asked_at is not None and "RUNNING" not in counts \
                and "PENDING" in counts:  # none placed yet: the autoscaler is adding nodes
            line += f"; {self.room.waiting_line('trials', 0)}"
        behind = self.behind() if self.behind is not None else None
        if behind:
            line += f"; {behind}"
        changed = line.split(";")[:2] != self.last_line.split(";")[:2]  # counts or best
        if changed or (not final and now - self.last_time >= self.every):
            self.log(line)
            self.last_line, self.last_time = line, now

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.on_step_end(0, trials, final=True)

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with its experiment state
        return {**self.__dict__, "start": None, "log": print, "room": None, "behind": None}
