"""SHAP true-class maps: equal to shap's own output, efficient, deterministic, validated."""

from __future__ import annotations

import numpy as np
import pytest
import shap
import torch
from torch import nn

from impactx_ray.errors import UserError
from impactx_ray.explain import default_masker, explain_true_class, fully_masked

from tolerances import assert_maps_close, logit_scale, sum_atol
from toys import TinyNet

H = W = 16
C, K, EVALS, MASKER = 3, 4, 300, "blur(8,8)"


@pytest.fixture(scope="module")
def net() -> TinyNet:
    return TinyNet(C, K).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, C, H, W, generator=g) * 2 - 1  # normalised-looking floats, not 0..255


@pytest.fixture(scope="module")
def labels() -> torch.Tensor:
    return torch.tensor([0, 2, 3])


@pytest.fixture(scope="module")
def maps(net: TinyNet, images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    return explain_true_class(net, images, labels, max_evals=EVALS, masker=MASKER, batch_size=50, progress=False)


def _f(net: nn.Module):
    def f(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)).numpy()

    return f


def test_shape_dtype(maps: np.ndarray) -> None:
    assert maps.shape == (3, H, W, C) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and np.abs(maps).max() > 1e-3


def test_equals_direct_shap_call(net: TinyNet, images: torch.Tensor, labels: torch.Tensor, maps: np.ndarray) -> None:
    hwc = images.permute(0, 2, 3, 1).numpy()
    for i, y in enumerate(labels.tolist()):
        explainer = shap.PartitionExplainer(_f(net), shap.maskers.Image(MASKER, (H, W, C)))
        np.random.seed(0)  # shap breaks priority ties with np.random.randn; ours seeds 0 per image
        ref = explainer(hwc[i : i + 1], max_evals=EVALS, batch_size=50, outputs=[y], silent=True).values[0, ..., 0]
        x = images[i : i + 1]
        assert_maps_close(maps[i], ref, logit_scale(net, x, fully_masked(x, MASKER)))


def test_true_class_matters(net: TinyNet, images: torch.Tensor, labels: torch.Tensor, maps: np.ndarray) -> None:
    other = explain_true_class(net, images[:1], [1], max_evals=EVALS, masker=MASKER, batch_size=50, progress=False)
    assert labels[0] != 1 and np.abs(other[0] - maps[0]).max() > 1e-3


def test_efficiency(net: TinyNet, images: torch.Tensor, labels: torch.Tensor, maps: np.ndarray) -> None:
    """Owen values telescope: every split adds (f10-f00)/2+(f11-f01)/2+(f01-f00)/2+(f11-f10)/2 = f11-f00,
    so sum(map) == f(x) - f(fully masked x) whatever max_evals is, up to float32 rounding of the
    logits recomputed here in another batch and of the map's sum (``tolerances.sum_atol``)."""
    masked = fully_masked(images, MASKER)
    with torch.no_grad():
        fx = net(images)[torch.arange(3), labels]
        f0 = net(masked)[torch.arange(3), labels]
    atol = sum_atol(maps, logit_scale(net, images, masked))
    np.testing.assert_allclose(maps.sum(axis=(1, 2, 3)), (fx - f0).numpy(), rtol=0, atol=atol)
    assert (fx - f0).abs().min() > 1e-2  # the property is not trivially 0 == 0


def test_fully_masked_is_the_blur(images: torch.Tensor) -> None:
    import cv2

    blurred = fully_masked(images, MASKER)
    ref = cv2.blur(images[1].permute(1, 2, 0).numpy(), (8, 8))
    np.testing.assert_allclose(blurred[1].permute(1, 2, 0).numpy(), ref, atol=1e-6)


def test_deterministic_and_global_state_untouched(net, images, labels, maps) -> None:
    np.random.seed(123)
    original = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        before = np.random.get_state()[1].copy()
        again = explain_true_class(net, images, labels, max_evals=EVALS, masker=MASKER, batch_size=50,
                                   progress=False, torch_threads=1)
        assert np.array_equal(again, maps)
        assert net.threads_seen == 1  # the model ran with the asked-for thread count ...
        assert np.array_equal(np.random.get_state()[1], before) and torch.get_num_threads() == 3  # ... restored
        explain_true_class(net, images[:1], labels[:1], max_evals=20, masker=MASKER, progress=False)
        assert net.threads_seen == 3  # None keeps the caller's setting
    finally:
        torch.set_num_threads(original)


def test_eval_mode_used_and_training_flag_restored(net, images, labels, maps) -> None:
    net.train()
    try:
        got = explain_true_class(net, images, labels, max_evals=EVALS, masker=MASKER, batch_size=50, progress=False)
        assert net.training
    finally:
        net.eval()
    assert np.array_equal(got, maps)  # dropout was off


def test_progress_bar_on_stderr(net, images, labels, capsys) -> None:
    explain_true_class(net, images[:1], labels[:1], max_evals=20, masker=MASKER, progress=True)
    assert "map" in capsys.readouterr().err
    explain_true_class(net, images[:1], labels[:1], max_evals=20, masker=MASKER, progress=False)
    assert capsys.readouterr().err == ""


def test_default_masker() -> None:
    assert default_masker(32, 32) == "blur(8,8)" and default_masker(96, 96) == "blur(24,24)"
    assert default_masker(2, 2) == "blur(1,1)"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"images": torch.rand(C, H, W)}, "4-D"),
        ({"images": torch.zeros(1, C, H, W, dtype=torch.uint8)}, "float"),
        ({"labels": [0, 1]}, "3 ints"),
        ({"labels": [0, 1, K]}, f"label {K}"),
        ({"labels": [0, -1, 1]}, "label -1"),
        ({"labels": [0.5, 1.0, 2.0]}, "integers"),
        ({"max_evals": 3}, "max_evals=3"),
        ({"max_evals": 2.5}, "max_evals=2.5"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"torch_threads": 0}, "torch_threads=0"),
        ({"masker": "gaussian(3)"}, "gaussian(3)"),
        ({"masker": "blur(0,4)"}, "blur(0,4)"),
        ({"masker": "inpaint_telea"}, "uint8"),
    ],
)
def test_bad_input_raises_user_error(net, images, labels, kwargs, needle) -> None:
    args = {"images": images, "labels": labels, "max_evals": EVALS, "masker": MASKER, **kwargs}
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        explain_true_class(net, args.pop("images"), args.pop("labels"), progress=False, **args)
