"""Seeded train/validation split by validation fraction (the paper's Table 1 sweeps it).

The split is a pure function of ``(n, val_fraction, seed)`` so every Tune trial, every process and
every rerun that asks for the same split gets exactly the same indices without passing arrays around.
"""

from __future__ import annotations

import numbers

import numpy as np

from impactx_ray.errors import UserError, is_int


def validation_size(n: int, val_fraction: float) -> int:
    """How many of ``n`` samples go to validation: ``max(1, round(n * val_fraction))``.

    At least one, so a tiny fraction on a small data set still yields a validation score
    (selection is by validation accuracy; an empty set would make it undefined).
    """
    return max(1, round(n * val_fraction))


def train_val_split(n: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into (train, val) index arrays by a seeded permutation.

    Both arrays are sorted int64 (sorted so that subsets keep the data set's own order, which keeps
    indexing cache-friendly and makes the split easy to inspect); together they cover ``range(n)``
    exactly once. Raises UserError when ``val_fraction`` is not strictly between 0 and 1 or when the
    split would leave no training sample.
    """
    if not is_int(n, 0):
        raise UserError(f"number of samples {n!r} is not a non-negative integer; pass the data set's length")
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, numbers.Real)
        or not 0.0 < float(val_fraction) < 1.0  # also rejects NaN
    ):
        raise UserError(
            f"validation fraction {val_fraction!r} is not strictly between 0 and 1; use e.g. 0.05, 0.1 or 0.2"
        )
    n = int(n)
    n_val = validation_size(n, float(val_fraction))
    if n - n_val < 1:
        raise UserError(
            f"validation fraction {val_fraction!r} of {n} samples leaves no training sample; "
            "use a smaller fraction or a larger data set"
        )
    # default_rng (PCG64) is stable across NumPy versions for a given seed, unlike the legacy global RNG.
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = np.sort(perm[:n_val]).astype(np.int64, copy=False)
    train_idx = np.sort(perm[n_val:]).astype(np.int64, copy=False)
    return train_idx, val_idx
