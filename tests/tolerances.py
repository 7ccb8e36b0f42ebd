"""Float32 tolerances derived from the values' scale and the operation count (docs/testing.md).

Two computations of the same float32 model output differ when kernels sum in another order:
another batch composition (shap evaluates one image at a time, the engine hundreds), another
thread count, another process. That difference is what these bounds allow, and nothing more.
"""

from __future__ import annotations

import numpy as np
import torch

U32 = 2.0 ** -24  # float32 unit roundoff

# A logit recomputed in another batch composition or with another thread count differs by at most
# LOGIT_ULPS units of u·max|logit|. Measured (5 inits, batches of 1, 7, 50 and 64, 1 and 2 threads):
# LeNet-5 3.2 (5 layers), test_efficientnet 23.3 (deep, batch-normed). Allowed: about 5x and
# 2.7x the worst; any other model gets the larger.
LENET5_LOGIT_ULPS = 16
LOGIT_ULPS = 64
# max over a pixel of Σ 1/|node| over its ancestors in shap's image partition trees (owen_map_atol)
ANCESTOR_SHARES = 2.5


def logit_scale(model: torch.nn.Module, *inputs: torch.Tensor) -> float:
    """F = max |logit| of ``model`` over ``inputs`` (N×C×H×W batches): the scale of its rounding."""
    with torch.no_grad():
        return max(float(model(x).abs().max()) for x in inputs)


def owen_map_atol(logit_scale: float, map_scale: float = 0.0, ulps: float = LOGIT_ULPS) -> float:
    """Largest per-pixel difference between two Owen maps of one float32 model whose logits were
    computed in other batch compositions or thread counts.

    A tree node's value is a weighted sum of differences of its pops' logits, f(S∪A) − f(S), with
    weights summing to at most 1 over the node's contexts: off by at most 2δ, δ = ulps·u·F.
    A pixel gets each ancestor's value in proportion 1/|node|; shap's image tree halves a box at
    each level (the 3 channels split 1 + 2), so Σ 1/|node| over a pixel's ancestors stays below
    ANCESTOR_SHARES (computed from the trees: 2.17 at 32×32×3, 2.19 at 8×6×3, 2.21 at 96×96×3).
    Hence |Δ| ≤ 2·ANCESTOR_SHARES·δ, plus the pixel's own float32 rounding, u·max|map|."""
    return 2 * ANCESTOR_SHARES * ulps * U32 * logit_scale + U32 * map_scale


def assert_maps_close(got: np.ndarray, ref: np.ndarray, logit_scale: float, *,
                      ulps: float = LOGIT_ULPS, resolves: float = 10.0) -> None:
    """``got`` equals ``ref`` within :func:`owen_map_atol`, and that bound is at most
    1/``resolves`` of the maps' scale (else the comparison could not tell a wrong map from a
    right one: the test's model must respond to masking well above its rounding). Exact replay
    is checked in float64, where rounding vanishes; this checks the float32 path to 10%."""
    scale = float(np.abs(ref).max())
    atol = owen_map_atol(logit_scale, scale, ulps)
    assert scale > resolves * atol, f"maps of scale {scale:.3g} cannot resolve a bound of {atol:.3g}"
    err = float(np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64)).max())
    assert err <= atol, f"max |Δ| {err:.3g} > bound {atol:.3g} (F = {logit_scale:.3g})"


def sum_atol(maps: np.ndarray, logit_scale: float, ulps: float = LOGIT_ULPS) -> float:
    """Bound for a map's float32 sum == f(x) − f(masked x) recomputed: the engine's own sum
    telescopes to its logits exactly (float64), the two recomputed logits are off by 2δ, each
    pixel was rounded once to float32 (u·|m|), and numpy sums n float32 terms pairwise
    (⌈log2 n⌉·u·Σ|m|)."""
    n = maps[0].size
    total = float(np.abs(maps).reshape(len(maps), -1).sum(axis=1).max())  # max over maps of Σ|m|
    return 2 * ulps * U32 * logit_scale + (1 + int(np.ceil(np.log2(n)))) * U32 * total


def assert_batch_close(got: np.ndarray, ref: np.ndarray, ulps: float = LOGIT_ULPS) -> None:
    """A model output (probabilities, a decoder's map) recomputed in another batch composition:
    within ``ulps`` units of u·max|ref| of it, as a logit is (LOGIT_ULPS above)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    atol = ulps * U32 * float(np.abs(ref).max())
    err = float(np.abs(got - ref).max())
    assert err <= atol, f"max |Δ| {err:.3g} > {atol:.3g} ({ulps} ulps of max |ref|)"
