"""MoRF curves and AOPC (Samek et al. 2016): how fast the true-class score falls as the regions an
attribution map calls most relevant are replaced by noise.

Procedure, for each image x with label y and map r:

1. Relevance per pixel = r summed over channels. Maps may be N×H×W×C (the map store's layout),
   N×C×H×W (IMPACTX's decoder, ABN's N×1×H×W) or N×H×W; a 4-d map is read as channels-first when
   its last two axes are the image's H×W, else as channels-last.
2. The image is cut into ``region``×``region`` squares (edge regions are smaller when H or W is not
   a multiple); each region's score is its summed relevance. Regions are ranked by score,
   descending; ties go to the region earlier in row-major order (stable sort), so the ranking is a
   pure function of the map.
3. Step k replaces the top-k regions with the same pixels of a noise image u ~ U[lo, hi], where
   [lo, hi] = [images.min(), images.max()] over the whole call (the input's value range, the same
   for every batch, so results do not depend on ``batch_size``). Noise is drawn per sample, in
   sample order, from ``torch.Generator().manual_seed(seed)`` and never depends on the maps: two
   methods compared with the same seed perturb each image with the same noise, only in a
   different order.
4. The curve is softmax(model(x_k))[y] for k = 0 (unperturbed) … S.

AOPC = (1/S) Σ_{k=1..S} (1/N) Σ_i (f(x_i) − f(x_i,k)); larger means the map found the pixels the
model relies on. Samek et al. divide by S + 1 (their sum includes the zero k = 0 term); ours is
that value times (S + 1)/S, the same ranking of methods.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from impactx_ray.errors import is_int
from impactx_ray.eval.road import Replacement, check_replacement, draw_fill

ArrayLike = np.ndarray | Tensor


def default_region(image_size: Sequence[int]) -> int:
    """4 pixels at 32×32, scaled with the image side (12 at 96×96): the same 8×8 grid of regions."""
    return max(1, round(4 * min(int(image_size[0]), int(image_size[1])) / 32))


def _images(images: ArrayLike) -> Tensor:
    """N×C×H×W as a tensor, left in its dtype (uint8 stays small; batches convert on the fly)."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images).detach()
    if x.dim() != 4:
        raise ValueError(f"images must be N×C×H×W, got shape {tuple(x.shape)}")
    return x


def _float(x: Tensor) -> Tensor:
    """uint8 0-255 -> float [0, 1] (as ImageData.float_images); float images pass through as float32."""
    return x.to(torch.float32).div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32)


def relevance(maps: ArrayLike, image_shape: Sequence[int]) -> Tensor:
    """Maps in any accepted layout -> per-pixel relevance N×H×W (summed over channels)."""
    n, _, h, w = image_shape
    r = torch.as_tensor(np.asarray(maps) if not isinstance(maps, Tensor) else maps).detach().float()
    if r.dim() == 4 and tuple(r.shape[-2:]) == (h, w):
        r = r.sum(dim=1)  # N×C×H×W -> N×H×W
    elif r.dim() == 4 and tuple(r.shape[1:3]) == (h, w):
        r = r.sum(dim=3)  # N×H×W×C -> N×H×W
    if r.shape != (n, h, w):
        raise ValueError(f"maps of shape {tuple(np.shape(maps))} do not fit {n} images of {h}×{w}; "
                         "use N×H×W×C, N×C×H×W or N×H×W")
    if not torch.isfinite(r).all():
        raise ValueError("maps contain NaN or infinite values")
    return r.cpu()


def region_ranks(rel: Tensor, region: int) -> Tensor:
    """Relevance N×H×W -> N×H×W int64: each pixel's region rank (0 = most relevant region)."""
    n, h, w = rel.shape
    gh, gw = -(-h // region), -(-w // region)  # ceil: partial regions at the bottom/right edge
    padded = torch.zeros(n, gh * region, gw * region).to(rel)
    padded[:, :h, :w] = rel  # zero padding adds nothing to a region's sum
    scores = padded.view(n, gh, region, gw, region).sum(dim=(2, 4)).flatten(1)  # N×R, row-major
    order = torch.argsort(scores, dim=1, descending=True, stable=True)  # N×R: region ids by rank
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(gh * gw).expand(n, -1).contiguous())  # N×R: rank of each region
    grid = ranks.view(n, gh, gw).repeat_interleave(region, 1).repeat_interleave(region, 2)  # N×gh·r×gw·r
    return grid[:, :h, :w]


def _draw_noise(g: torch.Generator, n: int, shape: Sequence[int], lo: float, hi: float) -> Tensor:
    """The next ``n`` noise images of ``g``'s stream, one draw per sample: n×C×H×W in [lo, hi]."""
    u = torch.stack([torch.rand(tuple(shape), generator=g) for _ in range(n)]) if n else torch.empty(0, *shape)
    return lo + (hi - lo) * u


def noise_images(images: Tensor, seed: int) -> Tensor:
    """One uniform noise image per sample in [images.min(), images.max()], drawn in sample order."""
    g = torch.Generator().manual_seed(int(seed))
    lo, hi = _float(images.min().view(1)).item(), _float(images.max().view(1)).item()
    return _draw_noise(g, len(images), images.shape[1:], lo, hi)


def perturbed_images(images: ArrayLike, maps: ArrayLike, k: int, *, region: int | None = None,
                     seed: int = 0, order: str = "morf", replacement: str = "noise") -> Tensor:
    """The images after step k (top-k regions replaced), exactly as ``morf_curve`` builds them."""
    x = _images(images)
    region = region or default_region(x.shape[-2:])
    ranks = region_ranks(relevance(maps, x.shape), region)
    if order == "lerf":
        ranks = ranks.flatten(1).amax(dim=1).view(-1, 1, 1) - ranks
    lo, hi = _float(x.min().view(1)).item(), _float(x.max().view(1)).item()
    xf = _float(x)
    draw = draw_fill(replacement, torch.Generator().manual_seed(int(seed)), xf, lo, hi)
    return Replacement(replacement, xf, draw, region, lo, hi)(xf, ranks < k)


ORDERS = ("morf", "lerf")


@torch.no_grad()
def morf_curve(model: Callable[[Tensor], Tensor], images: ArrayLike, labels: ArrayLike, maps: ArrayLike, *,
               region: int | None = None, steps: int | None = None, seed: int = 0,
               batch_size: int = 256, order: str = "morf", replacement: str = "noise") -> np.ndarray:
    """True-class softmax score after 0…S MoRF steps: N×(S+1) float32 (see the module docstring).

    ``model`` returns N×K logits; an ``nn.Module`` is run in eval mode (its mode is restored) on
    the device of its parameters. ``region=None`` takes
    ``default_region`` (4 at 32×32); ``steps=None`` replaces every region. ``images`` are what
    the model takes (float in [0, 1]) or uint8 0-255, converted per batch like ImageData does.
    ``order="lerf"`` replaces the least relevant regions first (the exact reverse of the MoRF
    order); ``replacement`` is ``noise`` (the paper's), ``blur`` or ``road`` (``eval/road.py``).
    """
    x_all = _images(images)
    n, _, h, w = x_all.shape
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    if len(y_all) != n or len(maps) != n:
        raise ValueError(f"{n} images, {len(y_all)} labels and {len(maps)} maps: give one of each per sample")
    if order not in ORDERS:
        raise ValueError(f"order must be morf or lerf, got {order!r}")
    check_replacement(replacement)
    region = region or default_region((h, w))
    if not is_int(region, 1):
        raise ValueError(f"region must be a positive number of pixels, got {region!r}")
    total = (-(-h // region)) * (-(-w // region))
    steps = total if steps is None else int(steps)
    if not 0 <= steps <= total:
        raise ValueError(f"steps must be in [0, {total}] ({total} regions of {region}×{region}), got {steps}")
    lo, hi = _float(x_all.min().view(1)).item(), _float(x_all.max().view(1)).item()
    g = torch.Generator().manual_seed(int(seed))
    module = model if isinstance(model, nn.Module) else None
    was_training = module.training if module is not None else False
    param = next(module.parameters(), None) if module is not None else None
    device = param.device if param is not None else torch.device("cpu")
    if module is not None:
        module.eval()
    curves = np.empty((n, steps + 1), dtype=np.float32)
    try:
        for start in range(0, n, batch_size):  # maps are read a batch at a time (memmaps stay on disk)
            x = _float(x_all[start:start + batch_size])
            ranks = region_ranks(relevance(maps[start:start + batch_size], x.shape), region)
            if order == "lerf":
                ranks = total - 1 - ranks  # least relevant region first
            draw = draw_fill(replacement, g, x, lo, hi)  # noise: continues noise_images' stream
            x, ranks = x.to(device), ranks.to(device)
            replace = Replacement(replacement, x, draw, region, lo, hi)
            y = y_all[start:start + batch_size].to(device)
            for k in range(steps + 1):
                p = torch.softmax(model(replace(x, ranks < k)).float(), dim=1)
                curves[start:start + len(x), k] = p.gather(1, y[:, None]).squeeze(1).cpu().numpy()
    finally:
        if module is not None:
            module.train(was_training)
    return curves


def aopc(curves: ArrayLike) -> float:
    """Mean over steps k = 1…S of the mean over samples of f(x) − f(x_k) (curves: N×(S+1))."""
    c = np.asarray(curves, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] < 2:
        raise ValueError(f"curves must be N×(S+1) with S >= 1, got shape {c.shape}")
    return float((c[:, :1] - c[:, 1:]).mean())


def random_maps(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """Uniform random maps (float32) of ``shape``: the random-ranking baseline for MoRF."""
    return np.random.default_rng(seed).random(tuple(shape), dtype=np.float32)


# -- per image and with confidence intervals (LeRF, SRG; Blücher et al., TMLR 2024) ---------------
def aopc_per_image(curves: ArrayLike) -> np.ndarray:
    """Each image's AOPC, mean over k ≥ 1 of f(x) − f(x_k): N×(S+1) -> N (their mean is ``aopc``)."""
    c = np.asarray(curves, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] < 2:
        raise ValueError(f"curves must be N×(S+1) with S >= 1, got shape {c.shape}")
    return (c[:, :1] - c[:, 1:]).mean(axis=1)


def auc_per_image(curves: ArrayLike) -> np.ndarray:
    """Each curve's area on x = k/S ∈ [0, 1] by the trapezoidal rule: N×(S+1) -> N."""
    c = np.asarray(curves, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] < 2:
        raise ValueError(f"curves must be N×(S+1) with S >= 1, got shape {c.shape}")
    return (c[:, 1:] + c[:, :-1]).sum(axis=1) / (2 * (c.shape[1] - 1))


def srg_per_image(morf: ArrayLike, lerf: ArrayLike) -> np.ndarray:
    """Symmetric relevance gain per image, AUC(LeRF) − AUC(MoRF): large when the map's most
    relevant regions destroy the score and its least relevant ones keep it."""
    return auc_per_image(lerf) - auc_per_image(morf)


def mean_ci(values: ArrayLike, level: float = 0.95) -> dict[str, float]:
    """Mean over images with its Student-t confidence interval (``ci_low``, ``ci_high``; equal to
    the mean for one image), and ``n``."""
    from scipy.stats import t

    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(v) == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = float(v.mean())
    half = 0.0
    if len(v) > 1:
        half = float(t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": int(len(v))}
