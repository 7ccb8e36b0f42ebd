"""The map store: SHAP maps on disk, in shards, resumable, checksummed, pickle-free.

Layout of a store directory::

    manifest.json        immutable after creation: format, meta, num_maps, map_shape, shard plan
    shard-00000.npy      float32 maps [start, stop) as (stop-start) x H x W x C (np.save, no pickle)
    shard-00000.json     sidecar written *after* its .npy: store_id, index, file, start, stop, shape,
                         bytes, sha256 (the store_id ties it to this manifest, so shards left by an
                         earlier store in the same directory are never taken for this one's)
    ...

Why this design:

* **Concurrent writers.** Ray workers will write different shards of one store at once. Nobody
  ever rewrites a shared file: the manifest is written once (exclusively, via ``os.link`` of a
  temporary file, so two racing creators cannot both win), and each shard owns its ``.npy`` and
  its sidecar. The shard's sha256 therefore lives in the sidecar, not in the manifest.
* **Crash safety.** Every file is written to a unique temporary name in the same directory, fsynced
  and moved into place with ``os.replace``. The sidecar is the commit record: a shard counts as
  written only if its sidecar exists and its ``.npy`` has the recorded size and sha256. A killed
  run leaves at most a stray ``.tmp-*`` file (ignored) and a shard without sidecar (recomputed).
  Rewriting a shard first removes its sidecar, so a half-replaced shard never looks complete.
* **Provenance.** ``meta`` (checkpoint hash, data fingerprint, masker, max_evals, batch_size,
  seed, engine, shap version) is fixed at creation; reopening with different meta is refused with
  the differing key, so maps of two settings can never be mixed and existing maps are never
  overwritten by a mismatched run.
* **No pickle.** Maps are plain ``.npy`` read with ``allow_pickle=False``; metadata is JSON.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from impactx_ray.errors import DiskFull, UserError, disk_full, is_int
from impactx_ray.io import file_sha256, write_bytes

FORMAT = "impactx-ray-mapstore"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: Small enough for even load over many workers and little lost work when one dies; large enough
#: that a CIFAR training set is a few hundred files.
DEFAULT_SHARD_SIZE = 128
REQUIRED_META = ("checkpoint_hash", "data_fingerprint", "masker", "max_evals", "batch_size")


def _normalize_meta(meta: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise UserError(f"map store meta lacks {', '.join(missing)}; build it with "
                        "ExplainSettings.store_meta")
    import shap  # only for stores made before shap_version was recorded

    # Stores made before seed and engine were recorded used seed 0 and shap itself.
    full = {"seed": 0, "engine": "shap", "shap_version": shap.__version__, **meta}
    try:
        return json.loads(json.dumps(full, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise UserError(f"map store meta must be JSON values (str, int, float, list, dict): {e}") from None


def _manifest_problem(m: dict[str, Any]) -> str | None:
    """What is wrong with a manifest's structure, or None. Every shard ``file`` must be a plain
    name in the store: a tampered ``../../x.npy`` would otherwise read (and rewrite) files
    outside it."""
    if not isinstance(m.get("meta"), dict):
        return "no meta object"
    if not isinstance(m.get("store_id"), str):
        return "no store_id"
    if not is_int(m.get("num_maps"), 1) or not is_int(m.get("shard_size"), 1):
        return "num_maps and shard_size must be integers >= 1"
    shape = m.get("map_shape")
    if not isinstance(shape, list) or len(shape) != 3 or not all(is_int(s, 1) for s in shape):
        return f"map_shape {shape!r} is not [H, W, C]"
    shards = m.get("shards")
    if not isinstance(shards, list) or not shards:
        return "no shard list"
    stop = 0
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict) or shard.get("index") != i:
            return f"shard {i} is not described"
        name = shard.get("file")
        if (not isinstance(name, str) or not name.endswith(".npy") or name != os.path.basename(name)
                or name.startswith(".") or "\\" in name):
            return f"shard {i} file {name!r} is not a file name inside the store"
        if shard.get("start") != stop or not is_int(shard.get("stop"), stop + 1):
            return f"shard {i} does not continue the previous one"
        stop = shard["stop"]
    if stop != m["num_maps"]:
        return f"the shards cover {stop} of {m['num_maps']} maps"
    return None


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the store at ``path``, checked whole; UserError naming what is wrong."""
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise UserError(
            f"no map store at {path} ({MANIFEST} missing); create it with MapStore.create_or_open"
        ) from None
    except (OSError, ValueError) as e:
        raise UserError(
            f"map store manifest {mpath} is unreadable ({e}); delete the directory and recompute"
        ) from None
    if not isinstance(manifest, dict):
        raise UserError(f"{mpath} is not a {FORMAT} manifest (a JSON {type(manifest).__name__}); "
                        "delete the directory and recompute")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{mpath} is not a version-{FORMAT_VERSION} {FORMAT} manifest "
            f"(format={manifest.get('format')!r}, version={manifest.get('format_version')!r})"
        )
    problem = _manifest_problem(manifest)
    if problem:
        raise UserError(f"map store manifest {mpath} is damaged: {problem}; delete the "
                        "directory and recompute its maps")
    return manifest


def new_manifest(meta: dict[str, Any], num_maps: int, map_shape: Sequence[int],
                 shard_size: int) -> dict[str, Any]:
    """The manifest of a new store of ``num_maps`` maps of ``map_shape`` in shards of
    ``shard_size``; UserError on a bad value."""
    if not is_int(num_maps, 1):
        raise UserError(f"num_maps={num_maps!r} is invalid; a map store needs at least one map")
    if not is_int(shard_size, 1):
        raise UserError(f"shard_size={shard_size!r} is invalid; use an int >= 1 (default {DEFAULT_SHARD_SIZE})")
    shape = [int(s) for s in map_shape]
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"map_shape={tuple(map_shape)} is invalid; use (H, W, C) with positive sizes")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "store_id": uuid.uuid4().hex,
        "meta": _normalize_meta(meta),
        "num_maps": num_maps,
        "map_shape": shape,
        "dtype": "float32",
        "shard_size": shard_size,
        "shards": [
            {"index": i, "file": f"shard-{i:05d}.npy", "start": s, "stop": min(s + shard_size, num_maps)}
            for i, s in enumerate(range(0, num_maps, shard_size))
        ],
    }


def check_same(path: Path, have: dict[str, Any], wanted: dict[str, Any]) -> None:
    """UserError when the store at ``path`` (manifest ``have``) is not the one ``wanted``
    describes: other settings (meta) or another size."""
    for key in sorted(set(have["meta"]) | set(wanted["meta"])):
        a, b = have["meta"].get(key), wanted["meta"].get(key)
        if a != b:
            raise UserError(
                f"map store {path} was made with {key}={a!r}, not {key}={b!r}; "
                "use another directory (existing maps are never overwritten)"
            )
    for key in ("num_maps", "map_shape", "shard_size"):
        if have[key] != wanted[key]:
            raise UserError(
                f"map store {path} has {key}={have[key]!r}, not {wanted[key]!r}; use another directory"
            )


class MapStore:
    """A directory of map shards; see the module docstring for the layout and why."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Open an existing store (never creates one)."""
        self.path = Path(path)
        manifest = read_manifest(self.path)
        self.manifest: dict[str, Any] = manifest
        self.meta: dict[str, Any] = manifest["meta"]
        self.num_maps: int = manifest["num_maps"]
        self.map_shape: tuple[int, int, int] = tuple(manifest["map_shape"])  # type: ignore[assignment]
        self.shard_size: int = manifest["shard_size"]
        self.num_shards: int = len(manifest["shards"])

    @classmethod
    def create_or_open(
        cls,
        path: str | os.PathLike[str],
        *,
        meta: dict[str, Any],
        num_maps: int,
        map_shape: Sequence[int],
        shard_size: int = DEFAULT_SHARD_SIZE,
    ) -> MapStore:
        """Open the store at ``path`` if it matches, create it if absent; UserError on any mismatch."""
        path = Path(path)
        manifest = new_manifest(meta, num_maps, map_shape, shard_size)
        path.mkdir(parents=True, exist_ok=True)
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        if not write_bytes(path / MANIFEST, data, exclusive=True):  # one is there already
            store = cls(path)
            check_same(path, store.manifest, manifest)
            return store
        return cls(path)

    def shard_range(self, i: int) -> tuple[int, int]:
        """Sample indices [start, stop) of shard ``i``."""
        if not 0 <= i < self.num_shards:
            raise IndexError(f"shard {i} out of range 0..{self.num_shards - 1}")
        s = self.manifest["shards"][i]
        return s["start"], s["stop"]

    def _npy(self, i: int) -> Path:
        return self.path / self.manifest["shards"][i]["file"]

    def _sidecar(self, i: int) -> Path:
        return self._npy(i).with_suffix(".json")

    def shard_info(self, i: int) -> dict[str, Any] | None:
        """The sidecar of shard ``i`` if present, readable and consistent with the plan, else None."""
        try:
            info = json.loads(self._sidecar(i).read_text())
        except (OSError, ValueError):
            return None
        start, stop = self.shard_range(i)
        plan = {"store_id": self.manifest["store_id"], "index": i, "file": self._npy(i).name}
        plan |= {"start": start, "stop": stop}
        if not isinstance(info, dict) or any(info.get(k) != v for k, v in plan.items()):
            return None
        return info

    def _shard_ok(self, i: int, verify: bool) -> bool:
        info = self.shard_info(i)
        if info is None:
            return False
        try:
            if self._npy(i).stat().st_size != info.get("bytes"):
                return False
        except OSError:
            return False
        return not verify or file_sha256(self._npy(i)) == info.get("sha256")

    def missing_shards(self, verify: bool = True) -> list[int]:
        """Shards to (re)compute: no sidecar, file missing or of the wrong size, or (verify) wrong sha256."""
        return [i for i in range(self.num_shards) if not self._shard_ok(i, verify)]

    def is_complete(self, verify: bool = True) -> bool:
        return not self.missing_shards(verify)

    def write_shard(self, i: int, maps: np.ndarray, made_by: dict[str, Any] | None = None) -> None:
        """Write shard ``i`` atomically: .npy first, then its sidecar (the commit record), which
        also says where the maps were computed (``made_by``: node, host, pid) when given."""
        start, stop = self.shard_range(i)
        want = (stop - start, *self.map_shape)
        if not isinstance(maps, np.ndarray) or maps.dtype != np.float32 or maps.shape != want:
            got = (getattr(maps, "dtype", type(maps).__name__), getattr(maps, "shape", None))
            raise ValueError(f"shard {i} needs float32 maps of shape {want}, got {got[0]} {got[1]}")
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(maps), allow_pickle=False)
        data = buf.getvalue()
        self._sidecar(i).unlink(missing_ok=True)
        try:
            write_bytes(self._npy(i), data)
        except DiskFull:  # say what the store still needs, not only this shard
            todo = len(self.missing_shards(verify=False))
            raise disk_full(self._npy(i), todo * len(data),
                            f"the {todo} map shards still to write") from None
        info = {
            "store_id": self.manifest["store_id"],
            "index": i,
            "file": self._npy(i).name,
            "start": start,
            "stop": stop,
            "shape": list(want),
            "dtype": "float32",
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            **({"made_by": made_by} if made_by else {}),
        }
        write_bytes(self._sidecar(i), json.dumps(info, indent=1, sort_keys=True).encode())

    def load_shard(self, i: int) -> np.ndarray:
        """Maps of shard ``i``, checksum-verified; UserError if it is missing or corrupt."""
        info = self.shard_info(i)
        try:
            data = self._npy(i).read_bytes() if info is not None else None
        except OSError:
            data = None
        if data is None or info is None or hashlib.sha256(data).hexdigest() != info.get("sha256"):
            raise UserError(
                f"map store {self.path}: shard {i} is missing or corrupt; run the map computation again to fill it"
            )
        maps = np.load(io.BytesIO(data), allow_pickle=False)
        start, stop = self.shard_range(i)
        if maps.dtype != np.float32 or maps.shape != (stop - start, *self.map_shape):
            raise UserError(f"map store {self.path}: shard {i} has {maps.dtype} {maps.shape}; recompute it")
        return maps

    def load(self) -> np.ndarray:
        """All maps, N x H x W x C float32 in sample order; UserError if any shard is missing or corrupt."""
        missing = self.missing_shards(verify=False)
        if missing:
            head = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
            raise UserError(
                f"map store {self.path} is incomplete: {len(missing)} of {self.num_shards} shards missing "
                f"({head}); run the map computation again to fill them"
            )
        out = np.empty((self.num_maps, *self.map_shape), dtype=np.float32)
        for i in range(self.num_shards):
            start, stop = self.shard_range(i)
            out[start:stop] = self.load_shard(i)
        return out
