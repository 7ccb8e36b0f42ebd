"""A map worker keeps to the cores it was given (docs/map-engine.md, "Threads").

Every library the engine calls starts as many threads as the machine has cores unless told
otherwise: torch's intra-op and inter-op pools, inductor's compile workers, numba's pool (shap's
kernels and ours) and OpenCV's (the blur). A Ray worker given one CPU that lets them all run would
use every core of its node, and N such workers on an N-core node would fight for them: 2 workers
measured 1.37-1.77× one on 2 cores instead of ~2×. :func:`keep_to` sets each to the allotment.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def keep_to(cores: int) -> dict[str, Any]:
    """Limit torch, inductor, numba and OpenCV to ``cores`` threads in this process (the
    environment too, for the processes it starts); returns what each now uses."""
    cores = max(1, int(cores))
    # (not NUMBA_NUM_THREADS: numba re-reads its environment and refuses a change once its pool
    # is up; numba.set_num_threads below is the per-process limit)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS"):
        os.environ[name] = str(cores)
    torch.set_num_threads(cores)
    try:
        torch.set_num_interop_threads(cores)
    except RuntimeError:  # settable once, before any inter-op work: then it was set already
        pass
    import torch._inductor.config as inductor

    inductor.compile_threads = cores
    import cv2
    import numba

    cv2.setNumThreads(cores)
    numba.set_num_threads(min(cores, numba.config.NUMBA_NUM_THREADS))
    return threads_in_use()


def threads_in_use() -> dict[str, Any]:
    """The thread count each library would use now (for workers to report, and tests)."""
    import cv2
    import numba
    import torch._inductor.config as inductor

    return {"torch": torch.get_num_threads(), "torch_interop": torch.get_num_interop_threads(),
            "inductor_compile": inductor.compile_threads, "numba": numba.get_num_threads(),
            "cv2": cv2.getNumThreads()}
