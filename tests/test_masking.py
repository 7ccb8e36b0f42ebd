"""The CPU's one-pass masking from lineages (``explain/masking.py``) equals the PyTorch passes a GPU
runs on its mask arena.

Both make each evaluated mask its context's mask OR a tree node's box and blur-mask the image under
it; the GPU stores the mask as an arena row, the CPU as (context row, node). The PyTorch passes are
checked against shap's own masks and masker in test_batched.py (``test_masks_and_blur_are_shaps``);
here the numba kernel must give the same bits, for a hand-made case and for a whole engine run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from impactx_ray.explain.batched import BatchedPartition, blurred, partition_tree
from impactx_ray.explain.masking import fill_masked_rows


def _engine(hwc, forward_batch: int = 64, **kw) -> BatchedPartition:
    weight = torch.randn(int(np.prod(hwc)), 3, generator=torch.Generator().manual_seed(0))
    return BatchedPartition(lambda x: x.flatten(1) @ weight, hwc, masker="blur(2,2)", max_evals=300, batch_size=20,
                            forward_batch=forward_batch, **kw)


def lineage_mask(lineage: np.ndarray, box: np.ndarray, row: int, hwc: tuple[int, int, int]) -> np.ndarray:
    """The H x W x C bool mask of lineage row ``row``: the union of the boxes on its chain (a row
    is (context row, added node); node -1 is an image's empty row 0)."""
    mask = np.zeros(hwc, dtype=bool)
    while lineage[row, 1] >= 0:
        h0, h1, w0, w1, c0, c1 = box[lineage[row, 1]]
        mask[h0:h1, w0:w1, c0:c1] = True
        row = lineage[row, 0]
    return mask


def _empty_lineage(n: int, rows: int) -> np.ndarray:
    lineage = np.full((n * rows, 2), -7, dtype=np.int64)  # garbage: rows are written before use
    lineage[::rows] = -1  # every image's row 0: the empty mask
    return lineage


def test_a_mask_is_its_context_or_its_box_and_the_image_is_blurred_outside() -> None:
    hwc = (4, 4, 3)
    tree = partition_tree(hwc)
    two_rows = np.flatnonzero((tree.box[:, 1] - tree.box[:, 0] == 2) & (tree.box[:, 4] == 0) & (tree.box[:, 5] == 3))
    node = int(two_rows[0])  # a 2-row box over all channels
    h0, h1, w0, w1, _, _ = tree.box[node]
    corner = int(np.flatnonzero((tree.box == [3, 4, 3, 4, 1, 2]).all(axis=1))[0])  # feature (3, 3, 1): a leaf
    assert not (h0 <= 3 < h1 and w0 <= 3 < w1)  # disjoint, as a node and its context are
    rows = 4
    lineage = _empty_lineage(2, rows)
    x = np.arange(2 * tree.m, dtype=np.float32).reshape(2, *hwc)
    xb = -x
    out = np.empty((2, *hwc), dtype=np.float32)
    # image 1: row 1 = the empty mask | the corner feature; row 2 = row 1 | the 2-row box
    fill_masked_rows(lineage, tree.box, np.array([rows]), np.array([corner]), np.array([rows + 1]),
                     np.array([1]), x, xb, out[:1])
    fill_masked_rows(lineage, tree.box, np.array([rows + 1]), np.array([node]), np.array([rows + 2]),
                     np.array([1]), x, xb, out[1:])
    want = np.zeros(hwc, dtype=bool)
    want[3, 3, 1] = True
    assert np.array_equal(out[0], np.where(want, x[1], xb[1]))  # image 1, blurred outside the mask
    want[h0:h1, w0:w1, :] = True
    assert np.array_equal(out[1], np.where(want, x[1], xb[1]))
    assert lineage[rows + 2].tolist() == [rows + 1, node]  # stored in its new row: context, node
    assert np.array_equal(lineage_mask(lineage, tree.box, rows + 2, hwc), want)
    assert lineage[0].tolist() == [-1, -1] and (lineage[[1, 2, 3, rows + 3]] == -7).all()  # nothing else written


@pytest.mark.parametrize("hwc", [(32, 32, 3), (96, 96, 3), (12, 10, 1)])
def test_host_pass_equals_the_device_passes_bit_for_bit(hwc) -> None:
    """Masks built step after step both ways, from random contexts among the earlier rows: the
    same masked images at every step, and each lineage row's mask is the GPU's arena row."""
    tree, rng = partition_tree(hwc), np.random.default_rng(0)
    n, rows, k = 3, 40, 30
    x = rng.random((n, *hwc), dtype=np.float32)
    xb = blurred(x, "blur(2,2)")
    lineage = _empty_lineage(n, rows)
    arena = torch.zeros((n, rows, tree.m), dtype=torch.bool)
    engine = _engine(hwc, forward_batch=k)
    done = np.ones(n, dtype=np.int64)  # rows written so far per image (row 0: the empty mask)
    for _ in range(3):  # three steps of k masks; a step's contexts are earlier steps' rows
        img = np.sort(rng.integers(0, n, k))
        row = np.concatenate([done[i] + np.arange((img == i).sum()) for i in range(n)])
        ctx = rng.integers(0, done[img])
        node = rng.integers(0, 2 * tree.m - 1, k)
        src, dst = img * rows + ctx, img * rows + row
        got, want = torch.empty((k, *hwc)), torch.empty((k, *hwc))
        fill_masked_rows(lineage, tree.box, src, node, dst, img, x, xb, got.numpy())
        idx = [torch.from_numpy(a) for a in (src, node, dst, img)]  # on the device
        engine._fill_on_device(arena, torch.from_numpy(x), torch.from_numpy(xb), *idx, want)
        assert torch.equal(got, want)
        done += np.bincount(img, minlength=n)
    flat = arena.view(-1, *hwc).numpy()
    for i in range(n):
        for r in range(done[i]):
            assert np.array_equal(lineage_mask(lineage, tree.box, i * rows + r, hwc), flat[i * rows + r])


def test_engine_maps_are_the_same_with_either_masking(monkeypatch) -> None:
    hwc = (16, 16, 3)
    x = np.random.default_rng(1).random((3, *hwc), dtype=np.float32)
    y = np.array([0, 1, 2])
    host = _engine(hwc, forward_batch=37)
    device = _engine(hwc, forward_batch=37)
    device.host_masking = False  # the PyTorch passes a GPU runs, here on the CPU
    assert host.host_masking and host.node_masks is None  # a CPU builds no node-mask table
    assert np.array_equal(host.explain(x, y), device.explain(x, y))
    assert device.node_masks is not None and host._arena_cache is None  # a CPU keeps no arena
