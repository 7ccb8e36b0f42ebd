"""Checkpoints: a state dict plus a JSON-able ``meta`` dict, saved atomically, loaded safely.

Files are written through ``impactx_ray.io.write_bytes`` (unique temporary name, fsync, rename), so a
crash never leaves half a checkpoint,
and they are read with ``weights_only=True`` (no arbitrary pickle execution). The sha256 of the
file is the checkpoint's identity: map stores record it so maps are never paired with a model
they were not computed from.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from impactx_ray.errors import UserError
from impactx_ray.io import file_sha256, write_bytes


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor],
                    meta: dict[str, Any]) -> str:
    """Write ``{state_dict, meta}`` to ``path`` atomically and return the file's sha256.

    An existing checkpoint at ``path`` is kept beside it as ``<stem>.<sha12>.pt`` rather than
    overwritten, so redoing a stage never loses the previous model.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        old = path.with_name(f"{path.stem}.{file_sha256(path)[:12]}{path.suffix}")
        os.replace(path, old)
    cpu_state = {k: v.detach().cpu() for k, v in state_dict.items()}
    buf = io.BytesIO()
    torch.save({"state_dict": cpu_state, "meta": meta}, buf)
    write_bytes(path, buf.getvalue())
    return file_sha256(path)


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (state_dict, meta); a missing or unreadable file is a one-line ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; run the stage that writes it first")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/foreign files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read checkpoint {path}: {reason[:200]}") from None
    if not isinstance(blob, dict) or "state_dict" not in blob or "meta" not in blob:
        raise UserError(f"{path} is not an impactx-ray checkpoint (no state_dict/meta)")
    return blob["state_dict"], blob["meta"]


def check_meta(path: str | Path, meta: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise a ``UserError`` naming the first key where ``meta`` differs from ``expected``."""
    for key, want in expected.items():
        have = meta.get(key)
        if have != want:
            raise UserError(f"checkpoint {path} has {key}={have!r}, but this run needs "
                            f"{key}={want!r}; point at the matching checkpoint or redo the stage")


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path,
              what: str) -> torch.nn.Module:
    """``model`` with ``state`` loaded, in eval mode; a mismatch is a one-line ``UserError``."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not fit {what}: "
                        f"{str(e).splitlines()[0][:160]}") from None
    return model.eval()
