"""Which torch device a step runs on, decided one way everywhere: what the user asked for
(``--device``), and, inside a Ray worker, the GPUs Ray gave it. A step that holds a Ray GPU never
falls back to the CPU without a word (docs/sweeps.md, "GPUs: the device each step runs on")."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from impactx_ray.errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks the GPU when there is one; an explicit ``cuda`` without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for, but torch sees no CUDA device "
                        f"({cuda_problem()})")
    return torch.device(name)


def cuda_problem() -> str:
    """Why this torch cannot use CUDA here, in one line (for error messages)."""
    build = torch.version.cuda
    if not build:
        return f"torch {torch.__version__} is a CPU-only build"
    try:
        torch.cuda.init()
    except Exception as e:  # any reason torch gives is the one to show
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"torch {torch.__version__} built for CUDA {build} (needs an NVIDIA driver for CUDA {build}): {reason}"
    return f"torch {torch.__version__} built for CUDA {build} sees {torch.cuda.device_count()} devices"


def worker_device(requested: str, gpu_ids: Sequence[object], where: str) -> torch.device:
    """The device of a step in a Ray worker that Ray gave ``gpu_ids``: an explicit ``requested``
    device as asked (``cpu`` runs on the CPU even on a GPU node); ``auto`` the GPU exactly when
    Ray gave one. Holding a Ray GPU that torch cannot use is a UserError naming ``where`` (the
    step and its node), the torch build and the driver it needs: never a silent CPU run."""
    if requested != "auto":
        return resolve_device(requested)
    if not gpu_ids:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        ids = ", ".join(str(i) for i in gpu_ids)
        raise UserError(f"{where} holds Ray GPU {ids}, but torch cannot use it: {cuda_problem()}; "
                        "install the torch build for this node's driver, or pass --device cpu")
    return torch.device("cuda")
