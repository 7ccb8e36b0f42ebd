"""Which sweep a directory holds: its name, its id and the settings it was started with.

``<out>/sweep.json`` records them when a sweep starts. A rerun on the same ``--out`` resumes only
with the same settings; anything else is refused on one line (a resumed sweep that quietly mixed
3-epoch and 5-epoch trials would report numbers that mean nothing). ``--restart`` starts afresh
and keeps the old results aside, never deleting them.

The name namespaces the sweep's MLflow runs: its own experiment, ``impactx/<name>``, so sweeps
sharing one tracking server never touch each other's runs. The id (new at every fresh start) is
in every run key, so a restarted sweep builds a new run tree beside the old one.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from impactx_ray.errors import UserError
from impactx_ray.io import read_json, write_json
from impactx_ray.lock import LOCK_NAME

RECORD = "sweep.json"
PREVIOUS = "previous"
# Kept across a --restart: the embedded MLflow store holds every generation's runs.
KEPT = ("mlflow.db", "mlartifacts", PREVIOUS, LOCK_NAME)  # the lock stays with its holder
# Directories of sweeps started before sweep.json existed log into this experiment.
LEGACY_EXPERIMENT = "impactx"


def default_name(out: Path) -> str:
    """``<out's folder name>-<6 hex of its absolute path>``: readable, and two ``--out`` folders
    with the same name on one tracking server still differ."""
    path = str(out.resolve())
    return f"{out.resolve().name}-{hashlib.sha256(path.encode()).hexdigest()[:6]}"


@dataclass(frozen=True)
class SweepIdentity:
    name: str
    id: str                               # "" for a sweep started before identities existed
    experiment: str

    def key(self, key: str) -> str:
        """The MLflow run key of ``key`` (e.g. ``lenet5-digits/stage1``) in this sweep."""
        return f"{self.id}/{key}" if self.id else key


# Where the data is read from, not what the sweep computes: a resubmitted Ray job's default
# ./data resolves in a new temporary working directory, and data moved to another mount resumes.
WHERE_NOT_WHAT = ("data_root", "download")


def _differences(saved: dict[str, Any], asked: dict[str, Any]) -> list[str]:
    keys = sorted((set(saved) | set(asked)) - set(WHERE_NOT_WHAT))
    return [f"{k}={saved.get(k)!r} (asked: {asked.get(k)!r})" for k in keys
            if saved.get(k) != asked.get(k)]


def _move_aside(out: Path) -> Path:
    """Move everything of the previous sweep but the MLflow store into ``previous/<time>/``."""
    aside = out / PREVIOUS / time.strftime("%Y%m%d-%H%M%S")
    aside.mkdir(parents=True)
    for entry in sorted(out.iterdir()):
        if entry.name not in KEPT:
            os.replace(entry, aside / entry.name)
    return aside


def claim(out: Path, settings: dict[str, Any], *, name: str | None = None,
          restart: bool = False, log=print) -> SweepIdentity:
    """The identity of the sweep in ``out``: the recorded one when ``settings`` (JSON values)
    match it, a new one when ``out`` holds no sweep (or ``restart``); UserError otherwise."""
    record_path = out / RECORD
    record = read_json(record_path) if record_path.exists() else None
    if record is not None and not isinstance(record, dict):
        raise UserError(f"{record_path} is not a sweep record; move it away or pass --restart")
    name = name or (record or {}).get("name") or default_name(out)
    if record is not None and not restart:
        if record.get("name") != name:
            raise UserError(f"{out} holds sweep {record.get('name')!r}, not {name!r}; drop "
                            "--name to resume it, or pass --restart to start afresh")
        diff = _differences(record.get("settings", {}), settings)
        if diff:
            raise UserError(f"{out} holds a sweep started with {'; '.join(diff)}; rerun with its "
                            "settings to resume it, choose another --out, or pass --restart "
                            "(the old results are kept in <out>/previous/)")
        return SweepIdentity(name, record["id"], record["experiment"])
    if record is None and (out / "tune").exists() and not restart:
        # a sweep directory from before sweep.json: resume it where its runs are
        identity = SweepIdentity(name, "", LEGACY_EXPERIMENT)
    else:
        if restart and out.exists() and any(e.name not in KEPT for e in out.iterdir()):
            log(f"--restart: the previous sweep's files are now in {_move_aside(out)}")
        identity = SweepIdentity(name, uuid.uuid4().hex[:8], f"impactx/{name}")
    write_json(record_path, {"name": identity.name, "id": identity.id,
                             "experiment": identity.experiment, "settings": settings,
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return identity
