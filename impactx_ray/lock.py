"""An exclusive lock on a directory that impactx-ray writes: a run directory or a sweep's ``--out``.

Two writers on one directory corrupt it (one moves aside the checkpoint the other is using, both
fill one map store), so every command that writes takes ``<dir>/.impactx-lock`` first. A second
writer fails at once with a one-line ``UserError`` naming the holder (pid, host, start time,
command); it never waits, since the first may run for hours.

Why ``flock`` on a file that records its holder:

* The kernel drops the lock when the holder dies, however it dies (SIGKILL, OOM, a reboot), so a
  stale lock cannot block anyone. The file itself stays behind with the dead holder's record; the
  next writer takes it over and says so.
* The holder's record (JSON) is only for messages: who holds the lock is decided by ``flock``.
* A clean release deletes the file, so a command that fails its checks leaves the directory
  byte-identical. Deleting a lock file races with a writer that opened it just before: after
  locking, a writer checks that the path still names the file it locked, and retries if not.
* Linux NFS clients map ``flock`` onto NFS byte-range locks, so shared storage works; a
  filesystem without locks is reported, never silently ignored.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from impactx_ray.errors import UserError

LOCK_NAME = ".impactx-lock"
_HELD: dict[Path, DirLock] = {}  # locks this process holds until it exits (see ``hold``)


def _holder_text(record: dict[str, Any]) -> str:
    parts = [f"pid {record.get('pid', '?')} on {record.get('host', '?')}"]
    if record.get("started"):
        parts.append(f"since {record['started']}")
    if record.get("command"):
        parts.append(f"`{record['command']}`")
    return ", ".join(parts)


def _read_record(fd: int) -> dict[str, Any] | None:
    """The holder record in the open lock file, or None when it is empty or unreadable."""
    try:
        raw = os.pread(fd, 65536, 0)
        record = json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


class DirLock:
    """``with DirLock(path, what="run directory"):`` holds ``path/.impactx-lock`` exclusively.

    ``create`` makes the directory first (and removes it again on release when it is still
    empty, so a refused command leaves no trace). ``log`` receives the stale-lock takeover note.
    """

    def __init__(self, directory: str | os.PathLike[str], *, what: str = "directory",
                 create: bool = False, log=None) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.what, self.create = what, create
        self.log = log or (lambda msg: print(f"impactx: {msg}", file=sys.stderr, flush=True))
        self.fd: int | None = None
        self.created_dir = False

    def _check_directory(self) -> None:
        if self.directory.exists() and not self.directory.is_dir():
            raise UserError(f"--out {self.directory} is a file, not a directory; choose a "
                            "directory for the run's files")
        if not self.directory.exists():
            if not self.create:
                raise UserError(f"{self.what} {self.directory} does not exist")
            try:
                self.directory.mkdir(parents=True)
            except FileExistsError:  # created meanwhile by someone else: fine, lock it
                pass
            except OSError as e:
                raise UserError(f"cannot create --out {self.directory}: {e.strerror}") from None
            else:
                self.created_dir = True

    def acquire(self) -> DirLock:
        self._check_directory()
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                self._undo_mkdir()
                raise UserError(f"cannot write in --out {self.directory}: {e.strerror}; "
                                "choose a writable directory") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                record = _read_record(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    holder = _holder_text(record) if record else "another process"
                    raise UserError(f"{self.what} {self.directory} is in use by {holder}; "
                                    "wait for it to finish or choose another --out") from None
                self._undo_mkdir()
                raise UserError(f"cannot lock {self.path}: {e.strerror}; the filesystem does "
                                "not support file locks") from None
            try:  # the file we locked may have been released and deleted meanwhile: retry
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _read_record(fd)
        if stale is not None:
            self.log(f"taking over the lock on {self.directory} left by {_holder_text(stale)}, "
                     "which is no longer running")
        prog = Path(sys.argv[0]).name
        prog = "impactx" if prog == "__main__.py" else prog  # `python -m impactx_ray`
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": " ".join([prog, *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        # Unlink while still holding the lock, so nobody locks a file that is about to vanish
        # without noticing (see the inode check in ``acquire``).
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
        self._undo_mkdir()

    def _undo_mkdir(self) -> None:
        if self.created_dir:
            try:
                self.directory.rmdir()  # only if still empty: a refused run leaves no directory
            except OSError:
                pass
            self.created_dir = False

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def hold(directory: str | os.PathLike[str], *, what: str = "directory", log=None) -> DirLock:
    """Lock ``directory`` until this process exits (a sweep's driver holds its ``--out`` for its
    whole life); calling it again for the same directory returns the lock already held."""
    key = Path(directory).resolve()
    if key not in _HELD:
        _HELD[key] = DirLock(directory, what=what, log=log).acquire()
    return _HELD[key]


@atexit.register
def _release_held() -> None:
    for lock in _HELD.values():
        lock.release()
    _HELD.clear()
