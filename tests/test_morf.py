"""MoRF / AOPC on a hand-built model whose relevant pixels are known (the top-left 8×8 patch)."""

import numpy as np
import pytest
import torch
from torch import nn

from impactx_ray.eval import aopc, morf_curve, perturbed_images, random_maps, region_ranks

N, H, W = 12, 32, 32


class PatchModel(nn.Module):
    """Class 0 iff the top-left 8×8 patch is bright: logits = (8·(mean − 0.5), 0)."""

    def forward(self, x):
        s = x[:, :, :8, :8].mean(dim=(1, 2, 3))  # N
        return torch.stack([8 * (s - 0.5), torch.zeros_like(s)], dim=1)  # N×2


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(N, 3, H, W, generator=g)
    x[:, :, :8, :8] = 1.0
    x[0, 0, 31, 31] = 0.0  # value range exactly [0, 1]
    labels = torch.zeros(N, dtype=torch.long)
    true_maps = np.zeros((N, H, W, 3), np.float32)  # store layout N×H×W×C
    true_maps[:, :8, :8, :] = 1.0
    return x, labels, true_maps


def test_true_map_falls_faster_than_random():
    x, y, true_maps = _data()
    true = morf_curve(PatchModel(), x, y, true_maps, region=4, steps=16)
    rand = morf_curve(PatchModel(), x, y, random_maps(true_maps.shape, seed=0), region=4, steps=16)
    assert true.shape == rand.shape == (N, 17)
    assert aopc(true) > aopc(rand) + 0.2
    # the 4 regions of the patch go first: the score is down by then, and stays flat afterwards
    assert (true[:, 4] < true[:, 0] - 0.3).all()
    np.testing.assert_allclose(true[:, 4:], true[:, 4:5].repeat(13, axis=1), atol=1e-6)


def test_step_zero_is_unperturbed_score_and_shapes():
    x, y, maps = _data()
    curves = morf_curve(PatchModel(), x, y, maps, region=4)
    assert curves.shape == (N, 64 + 1)  # steps=None: all (32/4)² regions
    expected = torch.softmax(PatchModel()(x), dim=1)[:, 0].numpy()
    np.testing.assert_allclose(curves[:, 0], expected, rtol=1e-6)
    assert morf_curve(PatchModel(), x, y, maps, region=4, steps=0).shape == (N, 1)
    assert morf_curve(PatchModel(), x, y, maps, region=5, steps=None).shape == (N, 49 + 1)  # ceil(32/5)=7
    with pytest.raises(ValueError, match="steps"):
        morf_curve(PatchModel(), x, y, maps, region=4, steps=65)


def test_seed_controls_noise_and_nothing_else_does():
    x, y, _ = _data()
    maps = random_maps((N, H, W), seed=3)  # N×H×W layout
    a = morf_curve(PatchModel(), x, y, maps, region=4, steps=10, seed=7)
    b = morf_curve(PatchModel(), x, y, maps, region=4, steps=10, seed=7, batch_size=5)
    c = morf_curve(PatchModel(), x, y, maps, region=4, steps=10, seed=8)
    np.testing.assert_array_equal(a, b)  # same seed: same curves, whatever the batch size
    assert not np.array_equal(a, c)
    # the same maps in every accepted layout give the same curves
    nchw = np.repeat(maps[:, None] / 3, 3, axis=1)
    np.testing.assert_allclose(morf_curve(PatchModel(), x, y, nchw, region=4, steps=10, seed=7), a, rtol=1e-6)


def test_uint8_images_equal_their_float_version():
    x, y, maps = _data()
    x8 = (x * 255).round().to(torch.uint8)
    a = morf_curve(PatchModel(), x8, y, maps, region=4, steps=6, seed=2)
    b = morf_curve(PatchModel(), x8.float() / 255, y, maps, region=4, steps=6, seed=2)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_first_step_replaces_exactly_the_top_region():
    x, _, _ = _data()
    maps = np.zeros((N, 3, H, W), np.float32)  # N×C×H×W layout
    maps[:, 1, 8:12, 20:24] = 5.0  # region (row 2, col 5) is the most relevant
    maps[:, 0, 0:4, 0:4] = 1.0  # the runner-up
    out = perturbed_images(x, maps, 1, region=4, seed=11)
    g = torch.Generator().manual_seed(11)
    noise0 = torch.rand(3, H, W, generator=g)  # sample 0's noise: the first draw, in [0, 1]
    assert torch.equal(out[0, :, 8:12, 20:24], noise0[:, 8:12, 20:24])
    inside = torch.zeros(H, W, dtype=torch.bool)
    inside[8:12, 20:24] = True
    assert torch.equal(out[:, :, ~inside], x[:, :, ~inside])  # everything else untouched
    two = perturbed_images(x, maps, 2, region=4, seed=11)
    assert torch.equal(two[0, :, 0:4, 0:4], noise0[:, 0:4, 0:4])


def test_ties_rank_in_row_major_order():
    ranks = region_ranks(torch.zeros(1, 8, 8), region=4)
    assert ranks[0, ::4, ::4].tolist() == [[0, 1], [2, 3]]
    rel = torch.zeros(1, 8, 8)
    rel[0, 4:, 4:] = 1.0
    assert region_ranks(rel, region=4)[0, ::4, ::4].tolist() == [[1, 2], [3, 0]]


def test_aopc_formula():
    curves = np.array([[1.0, 0.5, 0.0], [0.8, 0.8, 0.2]])
    # mean over k=1,2 of mean over samples of f(x) - f(x_k): ((0.5+0)/2 + (1+0.6)/2) / 2
    assert aopc(curves) == pytest.approx(((0.5 + 0.0) / 2 + (1.0 + 0.6) / 2) / 2)
    with pytest.raises(ValueError):
        aopc(np.ones((3, 1)))


def test_random_maps_are_seeded():
    assert np.array_equal(random_maps((2, 4, 4), 1), random_maps((2, 4, 4), 1))
    assert not np.array_equal(random_maps((2, 4, 4), 1), random_maps((2, 4, 4), 2))
