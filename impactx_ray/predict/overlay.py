"""A map drawn over its image as a PNG, in the paper's colour scales (``eval/figures.py``):

- attributions (IMPACTX's, WAE's, SHAP): ``bwr`` centred on 0 and scaled to the map's max |value|
  (red = for the class, blue = against, white = 0), also when one map happens to be all positive;
- attention (ABN's): ``jet`` over the map's own min..max, as the ABN paper draws it.

Each pixel mixes the image (in grey, so the colours read) with the map's colour in proportion to
the pixel's strength on that scale: where the map is 0 the image shows, at the map's strongest
pixel the scale's end colour does. The relevance of a pixel is its map summed over channels, as
MoRF ranks it. Upscaled (nearest) so that small images are visible: 32×32 becomes 256×256.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image

from impactx_ray.io import write_bytes

MIN_SIDE = 256  # the overlay's shorter side is at least this many pixels (an integer upscale)


def relevance(m: np.ndarray) -> np.ndarray:
    """One map C×H×W -> H×W (summed over channels)."""
    return np.asarray(m, dtype=np.float32).sum(axis=0)


def overlay(image: np.ndarray, m: np.ndarray, signed: bool = True, min_side: int = MIN_SIDE) -> np.ndarray:
    """uint8 image 3×H×W and its map C×H×W -> uint8 RGB (kH)×(kW)×3 with k = ceil(min_side / min(H, W)).
    ``signed``: an attribution (bwr over ±peak, whatever this map's signs); else an attention (jet)."""
    rel = relevance(m)
    gray = image.astype(np.float32).mean(axis=0, keepdims=True).transpose(1, 2, 0) / 255.0  # H×W×1
    peak = float(np.abs(rel).max())
    if not signed or peak == 0.0:  # attention (or a map of zeros): jet over min..max
        lo, hi = float(rel.min()), float(rel.max())
        strength = (rel - lo) / (hi - lo) if hi > lo else np.zeros_like(rel)
        colour = colormaps["jet"](strength)[..., :3]
    else:  # signed: bwr over ±peak
        strength = np.abs(rel) / peak
        colour = colormaps["bwr"]((rel / peak + 1.0) / 2.0)[..., :3]
    alpha = strength[..., None]  # H×W×1
    rgb = (1.0 - alpha) * gray + alpha * colour  # H×W×3
    k = max(1, math.ceil(min_side / min(rel.shape)))
    rgb = np.repeat(np.repeat(rgb, k, axis=0), k, axis=1)  # nearest upscale
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def save_overlay(path: str | Path, image: np.ndarray, m: np.ndarray, signed: bool = True) -> Path:
    """The overlay of ``m`` on ``image`` as a PNG at ``path`` (written whole or not at all)."""
    buf = io.BytesIO()
    Image.fromarray(overlay(image, m, signed)).save(buf, format="PNG")
    write_bytes(path, buf.getvalue())
    return Path(path)
