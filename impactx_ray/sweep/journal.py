"""The tracking journal: what a sweep logs to MLflow, kept on disk in order until the server has
it, so that an unreachable tracking server (a redeploy, a database failover) costs no training
and loses no record (docs/sweeps.md, "MLflow outages").

Every record names its run by key (no run id exists while the server is away) and carries its
own timestamp. ``<dir>/journal.jsonl`` holds the records, one JSON object per line, appended and
flushed as they come; ``<dir>/applied`` how many of them MLflow has. A record applied twice (the
driver killed between applying it and counting it) changes nothing: runs are found again by key,
params and tags are set to the same values, and a metric point with its original timestamp is
one MLflow already has. Artifacts and models are copied into ``<dir>/files/`` when recorded, so
that their sources may go (Tune rotates checkpoints) before the server comes back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from impactx_ray.io import write_bytes

JOURNAL, APPLIED, FILES = "journal.jsonl", "applied", "files"


class Journal:
    """Append-only records in ``root`` and the count of those applied. One object per directory
    and process (:meth:`at`): the sweep's tracker and the copies Tune unpickles with its
    callbacks append to the same records."""

    _open: dict[Path, Journal] = {}

    @classmethod
    def at(cls, root: str | Path) -> Journal:
        root = Path(root).resolve()
        if root not in cls._open:
            cls._open[root] = cls(root)
        return cls._open[root]

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / JOURNAL
        # the outage, shared by every tracker of this process (not kept on disk)
        self.behind_since: float | None = None  # monotonic time MLflow stopped answering
        self.last_try = 0.0
        self._applied = self._read_applied()
        self._records = self._read_records()

    def _read_applied(self) -> int:
        try:
            return int((self.root / APPLIED).read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def _read_records(self) -> list[dict[str, Any]]:
        """The records on disk; a last line cut short by a killed driver (never acknowledged) is
        cut off, so that the next record starts on a line of its own."""
        if not self.path.exists():
            return []
        records, good = [], 0
        with self.path.open("rb") as f:
            for line in f:
                try:
                    if not line.endswith(b"\n"):
                        raise ValueError("cut short")
                    records.append(json.loads(line))
                except ValueError:
                    break
                good += len(line)
        if good < self.path.stat().st_size:
            os.truncate(self.path, good)
        return records

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._records.append(record)

    def keep_file(self, source: str | Path) -> str:
        """A copy of ``source`` in the journal (the record names the copy)."""
        files = self.root / FILES
        files.mkdir(exist_ok=True)
        target = files / f"{len(self._records):08d}-{Path(source).name}"
        shutil.copy2(source, target)
        return str(target)

    def pending(self) -> list[dict[str, Any]]:
        return self._records[self._applied:]

    def mark_applied(self, n: int = 1) -> None:
        self._applied += n
        write_bytes(self.root / APPLIED, f"{self._applied}\n".encode())
        if self._applied == len(self._records):  # all in MLflow: the copies can go
            shutil.rmtree(self.root / FILES, ignore_errors=True)
