"""File I/O every layer shares: content hashes and crash-safe writes, one writer for all of them.

Every file impactx-ray writes (config.json, result.json, checkpoints, map shards, manifests) goes
through :func:`write_bytes`: a unique temporary name in the same directory, fsync, then
``os.replace`` (or ``os.link`` when the target must not exist yet). A crash leaves the old file
or the new one, never half of one, and two processes writing the same path never share a
temporary file.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import uuid
from pathlib import Path
from typing import Any

from impactx_ray.errors import UserError, disk_full


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_bytes(path: str | os.PathLike[str], data: bytes, *, exclusive: bool = False) -> bool:
    """Write ``data`` to ``path`` atomically (unique temp file, fsync, rename).

    With ``exclusive`` the file is only created if absent (``os.link`` fails on an existing
    target) and False is returned instead of replacing it; True otherwise.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)  # a partial file would hold the space it could not get
        if e.errno == errno.ENOSPC:
            raise disk_full(path, len(data)) from None
        raise
    try:
        if not exclusive:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: best effort, not race-free
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike[str], obj: Any, *, sort_keys: bool = True) -> None:
    """``obj`` as indented JSON (keys sorted unless ``sort_keys=False``), written atomically."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n").encode())


def write_npy(path: str | os.PathLike[str], array: Any) -> None:
    """A NumPy array as ``.npy`` (no pickle), written atomically."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    write_bytes(path, buf.getvalue())


def read_json(path: str | os.PathLike[str], *, hint: str = "") -> Any:
    """Parsed JSON; a missing or unreadable file is a one-line ``UserError`` (``hint`` appended)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist{'; ' + hint if hint else ''}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
