"""The CPU's one-pass masking (``explain/masking.py``) equals the PyTorch passes a GPU runs.

Both build each evaluated mask as its context row OR a tree node's box, store it as a new arena
row, and blur-mask the image under it. The PyTorch passes are checked against shap's own masks and
masker in test_batched.py (``test_masks_and_blur_are_shaps``) and run on a GPU; here the numba kernel
must give the same bits, for a hand-made case and for a whole engine run.
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


def test_a_mask_is_its_context_or_its_box_and_the_image_is_blurred_outside() -> None:
    hwc = (4, 4, 3)
    tree = partition_tree(hwc)
    node = int(np.flatnonzero((tree.box[:, 1] - tree.box[:, 0] == 2) & (tree.box[:, 4] == 0)
                              & (tree.box[:, 5] == 3))[0])  # a 2-row box over all channels
    h0, h1, w0, w1, _, _ = tree.box[node]
    arena = np.zeros((3, tree.m), dtype=bool)
    arena[0, :3] = True  # the context: pixel (0, 0), all channels
    x = np.arange(2 * tree.m, dtype=np.float32).reshape(2, *hwc)
    xb = -x
    out = np.empty((1, *hwc), dtype=np.float32)
    fill_masked_rows(arena, tree.box, np.array([0]), np.array([node]), np.array([2]), np.array([1]), x, xb, out)
    want = np.zeros(hwc, dtype=bool)
    want[0, 0, :] = True
    want[h0:h1, w0:w1, :] = True
    assert np.array_equal(arena[2].reshape(hwc), want)  # stored in its new row
    assert np.array_equal(arena[0, :3], [True] * 3) and not arena[0, 3:].any()  # the context untouched
    assert np.array_equal(out[0], np.where(want, x[1], xb[1]))  # image 1, blurred outside the mask


@pytest.mark.parametrize("hwc", [(32, 32, 3), (96, 96, 3), (12, 10, 1)])
def test_host_pass_equals_the_device_passes_bit_for_bit(hwc) -> None:
    """One step's chunk of masks, made both ways from the same arena: same rows, same inputs."""
    tree, rng = partition_tree(hwc), np.random.default_rng(0)
    n, rows, k = 3, 40, 50
    img = np.sort(rng.integers(0, n, k))
    row = np.concatenate([20 + np.arange((img == i).sum()) for i in range(n)])  # consecutive per image
    ctx, node = rng.integers(0, 20, k), rng.integers(0, 2 * tree.m - 1, k)
    x = rng.random((n, *hwc), dtype=np.float32)
    xb = blurred(x, "blur(2,2)")
    arena0 = rng.random((n, rows, tree.m)) < 0.3
    got_arena, got = torch.from_numpy(arena0.copy()), torch.empty((k, *hwc))
    fill_masked_rows(got_arena.view(-1, tree.m).numpy(), tree.box, img * rows + ctx, node, img * rows + row,
                     img, x, xb, got.numpy())
    engine = _engine(hwc, forward_batch=k)
    want_arena, want = torch.from_numpy(arena0.copy()), torch.empty((k, *hwc))
    idx = [torch.from_numpy(a) for a in (img * rows + ctx, node, img * rows + row, img)]  # on the device
    engine._fill_on_device(want_arena, torch.from_numpy(x), torch.from_numpy(xb), *idx, want)
    assert torch.equal(got_arena, want_arena)
    assert torch.equal(got, want)


def test_engine_maps_are_the_same_with_either_masking(monkeypatch) -> None:
    hwc = (16, 16, 3)
    x = np.random.default_rng(1).random((3, *hwc), dtype=np.float32)
    y = np.array([0, 1, 2])
    host = _engine(hwc, forward_batch=37)
    device = _engine(hwc, forward_batch=37)
    device.host_masking = False  # the PyTorch passes a GPU runs, here on the CPU
    assert host.host_masking and host.node_masks is None  # a CPU builds no node-mask table
    assert np.array_equal(host.explain(x, y), device.explain(x, y))
    assert device.node_masks is not None
