"""The map engine's masked inputs on a CPU, built in one pass by a numba kernel.

Every evaluated mask of the batched engine (``batched.py``) is its context mask (an earlier row of
the image's mask arena) OR a tree node's box, stored as a new arena row, and the model's input is
shap's blur masking of the image under it: ``where(mask, x, blurred x)``. In PyTorch that is five
passes over memory per chunk (gather the context rows, gather the node masks, OR, store, where);
here it is one: per mask, copy the context row into its arena row while writing the masked image,
then overwrite the node's box (x where the box is, the mask set). The image is masked as bits,
``xb ^ ((x ^ xb) & -v)``: exact, branch-free and vectorised. Measured (512 masks of 3,072
features, 2 threads): 0.12 ms per chunk against 3.2 ms for the PyTorch passes (0.37 ms with a
branch per feature), and no lookup table of node masks at any image size (96x96x3 would need
1.5 GB). The boxes are exact: every node of shap's image tree is an axis-aligned box of the
H x W x C feature grid (checked when the tree is built).

A GPU keeps the PyTorch passes (``batched.py``): they run on the device beside the forward.
Plain NumPy + numba (shap's own dependency).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def fill_masked(arena, box, src, node, dst, img, x, xb, out, hwc):  # pragma: no cover - numba
    """For every mask r: ``arena[dst[r]] = arena[src[r]] | box_mask(node[r])`` and
    ``out[r] = where(arena[dst[r]], x[img[r]], xb[img[r]])``.

    arena: (rows, M) bool, flat over images; box: (2M-1, 6) int64 h0, h1, w0, w1, c0, c1
    (half-open); src, node, dst, img: (k,) int64; x, xb: (n, M) the images and their blurred
    versions, out: (k, M), all three as unsigned integers of the images' width (their bits);
    hwc: (3,) int64 H, W, C. Features are flat (H, W, C) indices, as shap's masks index them.
    ``dst`` rows must differ from every ``src`` row (an evaluated mask is stored in a new row;
    contexts are older rows), so the masks are independent and run in parallel.
    """
    k, m = out.shape
    w, c = hwc[1], hwc[2]
    for r in prange(k):
        s, d, j = src[r], dst[r], img[r]
        context, row, masked, image, blur = arena[s], arena[d], out[r], x[j], xb[j]
        for f in range(m):  # the context: copied, and the image masked under it
            v = context[f]
            row[f] = v
            # the bits of x[f] where v, else of xb[f]: a select without a branch, vectorised
            masked[f] = blur[f] ^ ((image[f] ^ blur[f]) & -out.dtype.type(v))
        b = box[node[r]]
        for hh in range(b[0], b[1]):  # the node's box: set in the mask, the image kept there
            for ww in range(b[2], b[3]):
                base = (hh * w + ww) * c
                for cc in range(b[4], b[5]):
                    row[base + cc] = True
                    masked[base + cc] = image[base + cc]


def fill_masked_rows(arena: np.ndarray, box: np.ndarray, src: np.ndarray, node: np.ndarray, dst: np.ndarray,
                     img: np.ndarray, x: np.ndarray, xb: np.ndarray, out: np.ndarray) -> None:
    """:func:`fill_masked` on NumPy views: ``arena`` (rows x M), ``x``/``xb`` (n x H x W x C),
    ``out`` (k x H x W x C, x's dtype); index arrays as int64. The images are handed to the kernel
    as unsigned integers of their width, so that masking moves bits and never rounds."""
    hwc = np.asarray(x.shape[1:], dtype=np.int64)
    n, k = len(x), len(out)
    bits = np.dtype(f"uint{8 * x.dtype.itemsize}")
    fill_masked(arena, box, src, node, dst, img, x.reshape(n, -1).view(bits), xb.reshape(n, -1).view(bits),
                out.reshape(k, -1).view(bits), hwc)
