"""What replaces the removed regions in a perturbation curve: ``noise``, ``blur`` or ``road``.

* ``noise``: uniform noise in the images' value range (the paper's MoRF, Samek et al. 2016).
* ``blur``: the image's own box blur (width 2·region + 1, replicate padding): what the model sees
  is smoothed out, not replaced by unnatural values.
* ``road``: ROAD's noisy linear imputation (Rong et al., ICML 2022, "A Consistent and Efficient
  Evaluation Strategy for Attribution Methods"). Noise leaks the mask's shape into the image (the
  model can learn where pixels were removed, which says more about the ranking than about the
  pixels); ROAD fills each removed pixel with the weighted mean of its 8 neighbours — 1/6 for the 4
  direct, 1/12 for the 4 diagonal ones, renormalised over the neighbours inside the image — with
  neighbours that are themselves removed being unknowns of the same linear system, then adds
  N(0, 0.01²) noise to the filled pixels. Their code builds a sparse matrix and calls scipy's
  ``spsolve`` per image; here the same system is solved for a whole batch by conjugate gradients
  with the neighbour sum as two 3-tap passes (plain torch, any device), each step starting from
the previous step's solution. The system is symmetric
  positive definite whenever one pixel is kept; an image with every pixel removed has no kept
  neighbour to take values from (the system is singular) and is filled with the middle of the
  value range plus the same noise.

Every replacement draws its randomness from a generator seeded by the caller, per sample and in
sample order, and never from the maps: two rankings compared with one seed see the same noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

REPLACEMENTS = ("noise", "blur", "road")
ROAD_NOISE = 0.01  # std of the noise ROAD adds to imputed pixels (their default)
# ROAD's neighbour weights: direct neighbours 1/6, diagonal 1/12 (they sum to 1 in the interior)
ROAD_KERNEL = torch.tensor([[1 / 12, 1 / 6, 1 / 12],
                            [1 / 6, 0.0, 1 / 6],
                            [1 / 12, 1 / 6, 1 / 12]], dtype=torch.float64)


def check_replacement(name: str) -> str:
    if name not in REPLACEMENTS:
        raise ValueError(f"replacement must be one of {', '.join(REPLACEMENTS)}, got {name!r}")
    return name


def _neighbour_sum(v: Tensor) -> Tensor:
    """Σ_j w_j · v_j over each pixel's 8 neighbours, zero outside the image: B×1×H×W -> B×1×H×W.

    ROAD's kernel is (outer([1,2,1], [1,2,1]) − 4·δ) / 12, so two 3-tap passes do it: several
    times faster on CPU than a 3×3 ``conv2d`` with one channel.
    """
    p = F.pad(v, (1, 1, 1, 1))  # B×1×(H+2)×(W+2), zeros outside
    a = p[..., :-2, :] + 2 * p[..., 1:-1, :] + p[..., 2:, :]  # B×1×H×(W+2)
    return (a[..., :-2] + 2 * a[..., 1:-1] + a[..., 2:] - 4 * v) / 12


def road_impute(x: Tensor, removed: Tensor, *, tol: float = 1e-6, max_iter: int = 2000,
                fill: float = 0.5, init: Tensor | None = None) -> Tensor:
    """ROAD's linear imputation without the noise: x N×C×H×W, removed N×H×W bool -> N×C×H×W.

    Each removed pixel v_i solves s_i·v_i − Σ_{j removed} w_ij·v_j = Σ_{j kept} w_ij·x_j, with
    s_i the summed weight of i's neighbours inside the image (ROAD's equations). Conjugate
    gradients on the removed pixels of every (image, channel) at once, in float64, until every
    residual is below ``tol`` per pixel (at most ``max_iter`` steps). The start is ``init``'s
    values (e.g. the previous step's solution) where given and finite, else the weighted mean of
    the kept neighbours; the solution does not depend on it beyond ``tol``. Kept pixels are
    returned unchanged; fully removed images get ``fill``.
    """
    n, c, h, w = x.shape
    m = removed.to(torch.float64).unsqueeze(1).expand(n, c, h, w).reshape(n * c, 1, h, w)
    full = m.flatten(1).amin(dim=1) > 0  # images (channels) with nothing kept: singular system
    m = torch.where(full.view(-1, 1, 1, 1), torch.zeros_like(m), m)
    x64 = x.to(torch.float64).reshape(n * c, 1, h, w)  # each channel is its own system
    s = _neighbour_sum(torch.ones(1, 1, h, w, dtype=torch.float64, device=x.device))  # 1×1×H×W

    def apply(v: Tensor) -> Tensor:  # the system matrix on the removed pixels (0 elsewhere)
        return m * (s * v - _neighbour_sum(m * v))

    b = m * _neighbour_sum((1 - m) * x64)  # what the kept neighbours contribute
    kept_weight = _neighbour_sum(1 - m)
    v = m * torch.where(kept_weight > 0, b / kept_weight.clamp_min(1e-12), torch.full_like(b, fill))
    if init is not None:
        start = init.to(torch.float64).reshape(n * c, 1, h, w)
        v = torch.where(torch.isfinite(start), m * start, v)
    r = b - apply(v)
    p = r.clone()
    rr = (r * r).flatten(1).sum(1)  # B
    for _ in range(max_iter):
        if r.abs().max().item() <= tol:
            break
        ap = apply(p)
        alpha = rr / (p * ap).flatten(1).sum(1).clamp_min(1e-300)  # B: converged rows stay put
        v = v + alpha.view(-1, 1, 1, 1) * p
        r = r - alpha.view(-1, 1, 1, 1) * ap
        rr_new = (r * r).flatten(1).sum(1)
        p = r + (rr_new / rr.clamp_min(1e-300)).view(-1, 1, 1, 1) * p
        rr = rr_new
    out = torch.where(m > 0, v, x64)
    out = torch.where(full.view(-1, 1, 1, 1), torch.full_like(out, fill), out)
    return out.reshape(n, c, h, w).to(x.dtype)


def blur_images(x: Tensor, region: int) -> Tensor:
    """Box blur of width 2·region + 1 (replicate padding): N×C×H×W -> N×C×H×W."""
    k = 2 * region + 1
    padded = F.pad(x, (region, region, region, region), mode="replicate")
    return F.avg_pool2d(padded, k, stride=1)


def draw_fill(kind: str, g: torch.Generator, x: Tensor, lo: float, hi: float) -> Tensor:
    """The per-sample random draw of a replacement, from ``g``'s stream in sample order: uniform
    images in [lo, hi] for ``noise``, N(0, ROAD_NOISE²) images for ``road``, nothing for ``blur``."""
    shape = tuple(x.shape[1:])
    if kind == "noise":
        u = [torch.rand(shape, generator=g) for _ in range(len(x))]
        return lo + (hi - lo) * (torch.stack(u) if u else torch.empty(0, *shape))
    if kind == "road":
        e = [torch.randn(shape, generator=g) for _ in range(len(x))]
        return ROAD_NOISE * (torch.stack(e) if e else torch.empty(0, *shape))
    return torch.empty(0)


class Replacement:
    """Builds the perturbed batch at each step: ``replace(x, removed)`` with ``removed`` N×H×W bool.

    Made once per batch (``Replacement(kind, x, draw, region, lo, hi)``), so the blur and the
    noise are computed once and every step only re-imputes (ROAD) or re-selects pixels.
    """

    def __init__(self, kind: str, x: Tensor, draw: Tensor, region: int, lo: float, hi: float):
        self.kind, self.lo, self.hi = check_replacement(kind), lo, hi
        self.draw = draw.to(x.device)
        self.blurred = blur_images(x, region) if kind == "blur" else None
        self.previous: tuple[Tensor, Tensor] | None = None  # ROAD: the last solution, where the next one starts

    def __call__(self, x: Tensor, removed: Tensor) -> Tensor:
        mask = removed.unsqueeze(1)  # N×1×H×W, broadcast over channels
        if self.kind == "noise":
            return torch.where(mask, self.draw, x)
        if self.kind == "blur":
            return torch.where(mask, self.blurred, x)
        if not removed.any():
            return x
        # start where the last step ended: only the newly removed region is far from solved
        init = None if self.previous is None else torch.where(self.previous[1], self.previous[0],
                                                              torch.full_like(x, float("nan")))
        filled = road_impute(x, removed, fill=(self.lo + self.hi) / 2, init=init)
        self.previous = (filled, mask.expand_as(x))
        return torch.where(mask, filled + self.draw, x)
