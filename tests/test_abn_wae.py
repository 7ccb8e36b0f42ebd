"""ABN and WAE: shapes and gradients for every registered backbone, hand-checked WAE maths, training."""

import numpy as np
import pytest
import timm
import torch
from torch import nn

from impactx_ray.config import RunConfig
from impactx_ray.data import class_mean_maps
from impactx_ray.models import ATTACH_POINTS, WAE, abn_loss, create_abn, create_backbone, list_backbones
from impactx_ray.models.abn import timm_attach_point
from impactx_ray.models.timm_backbones import TIMM_NAMES
from impactx_ray.train import FitHooks, Split, StageResult, abn_plan, train, wae_plan

K = 4
CPU = torch.device("cpu")
# Every registered backbone at 32 and 96; timm models at input_size=64 (a 4×4 attention map) to
# stay fast on 2 cores, plus MobileNet once at its default 224 (EfficientNet-B2 at 260: ~10 s on CPU).
SMALL = [(name, size, None if name == "lenet5" else 64) for name in list_backbones() for size in (32, 96)]
CASES = SMALL + [("mobilenet", 32, None)]


def _head(backbone):
    return backbone.head if backbone.name == "lenet5" else backbone.model.get_classifier()


@pytest.mark.parametrize("name,size,input_size", CASES)
def test_abn_forward_backward(name, size, input_size):
    torch.manual_seed(0)
    abn = create_abn(name, K, input_size=input_size).train()
    x, y = torch.rand(2, 3, size, size), torch.tensor([0, 3])
    logits, att_logits, att = abn.outputs(x)
    stride = 16 if name != "lenet5" else None
    h = 5 if stride is None else -(-abn.backbone.input_size[0] // stride)
    assert logits.shape == att_logits.shape == (2, K)
    assert att.shape == (2, 1, h, h) and ((att > 0) & (att < 1)).all()
    loss, ce_att, ce_per = abn_loss(logits, att_logits, y)
    assert torch.isfinite(loss) and loss.item() == pytest.approx((ce_att + ce_per).item())
    # the perception loss alone reaches the attention map's conv: (1 + M)·f couples the branches
    branch = abn.attended.branch
    (g,) = torch.autograd.grad(ce_per, branch.map_conv[0].weight, retain_graph=True)
    assert g.abs().sum() > 0
    loss.backward()
    assert branch.logit_conv.weight.grad.abs().sum() > 0
    assert _head(abn.backbone).weight.grad.abs().sum() > 0
    abn.eval()
    with torch.no_grad():
        expl, (out, _, att) = abn.explain(x), abn.outputs(x)
        assert torch.equal(abn(x), out)  # forward: the perception logits
    assert expl.shape == (2, 1, size, size)
    torch.testing.assert_close(expl, nn.functional.interpolate(att, size=(size, size),
                                                               mode="bilinear"))


def test_attach_points_follow_timm_feature_info():
    for short, timm_name in TIMM_NAMES.items():
        module, channels = timm_attach_point(timm.create_model(timm_name, num_classes=K))
        assert ATTACH_POINTS[short] == (f"model.{module}", channels)
    # any other timm CNN gets the same rule
    abn = create_abn("resnet18", K, input_size=32).eval()
    assert abn.attach == "model.layer3"
    assert abn.outputs(torch.rand(1, 3, 32, 32))[2].shape == (1, 1, 2, 2)


def test_abn_state_dict_round_trip():
    a, b = create_abn("lenet5", K), create_abn("lenet5", K)
    b.load_state_dict(a.state_dict())
    x = torch.rand(3, 3, 32, 32)
    a.eval(), b.eval()
    assert all(torch.equal(u, v) for u, v in zip(a.outputs(x), b.outputs(x)))


@pytest.mark.parametrize("name,size,input_size", SMALL)
def test_wae_forward_backward(name, size, input_size):
    torch.manual_seed(0)
    backbone = create_backbone(name, K, input_size=input_size)
    wae = WAE.from_backbone(backbone, torch.randn(K, 3, size, size).clamp(-1, 1)).train()
    assert not backbone.training  # frozen M stays in eval mode
    x = torch.rand(2, 3, size, size)
    logits, e = wae(x), wae.explain(x)
    assert logits.shape == (2, K) and e.shape == (2, 3, size, size)
    nn.functional.cross_entropy(logits, torch.tensor([1, 2])).backward()
    assert all(p.grad is None for p in wae.M.parameters())
    assert all(p.grad is not None for p in wae.encoder.parameters())
    assert all(p.grad is not None for p in wae.C.parameters())


class FixedLogits(nn.Module):
    """A stand-in M with known softmax: p = (0.75, 0.25) for every input."""

    num_classes = 2

    def forward(self, x):
        return torch.tensor([[np.log(3.0), 0.0]], dtype=torch.float32).expand(len(x), -1)


def test_wae_weighted_average_by_hand():
    means = torch.stack([torch.ones(1, 2, 2), -2 * torch.ones(1, 2, 2)])  # 2×1×2×2
    means[1, 0, 0, 1] = 0.4
    wae = WAE(FixedLogits(), means)
    e = wae.explain(torch.rand(3, 3, 2, 2))
    hand = 0.75 * means[0] + 0.25 * means[1]  # 1×2×2: [[0.25, 0.85], [0.25, 0.25]]
    assert e.shape == (3, 1, 2, 2)
    assert torch.allclose(e, hand.expand(3, -1, -1, -1))
    assert e[0, 0, 0, 1].item() == pytest.approx(0.75 + 0.1)


def test_class_mean_maps_by_hand():
    maps = np.zeros((3, 2, 2, 1), np.float32)  # N×H×W×C
    maps[0, :, :, 0] = [[2.0, -4.0], [0.0, 1.0]]  # scaled by 4
    maps[1, :, :, 0] = [[1.0, 1.0], [1.0, 1.0]]  # scaled by 1
    maps[2, :, :, 0] = [[0.0, 0.0], [0.0, -3.0]]  # scaled by 3
    means = class_mean_maps(maps, [0, 0, 1], 3)
    assert means.shape == (3, 1, 2, 2)
    assert torch.allclose(means[0, 0], torch.tensor([[(0.5 + 1) / 2, (-1 + 1) / 2], [0.5, (0.25 + 1) / 2]]))
    assert torch.allclose(means[1, 0], torch.tensor([[0.0, 0.0], [0.0, -1.0]]))
    assert torch.equal(means[2], torch.zeros(1, 2, 2))  # no image of class 2
    only_first = class_mean_maps(maps, [0, 0, 1], 3, index=[0, 2], chunk=1)
    assert torch.allclose(only_first[0, 0], torch.tensor([[0.5, -1.0], [0.0, 0.25]]))


def _digits(digits, n=64):
    train, _ = digits
    return train.subset(torch.arange(n))


def _train(cfg, make_plan, data, **hooks):
    split = Split(data, torch.arange(48), torch.arange(48, 64))
    return train(lambda: make_plan(split), split, seed=cfg.seed, batch_size=cfg.batch_size, device=CPU,
                 hooks=FitHooks(progress=False, **hooks))


def test_train_abn_one_epoch(digits):
    data = _digits(digits)
    seen = []
    cfg = RunConfig(epochs=1, batch_size=16, lr=0.003)
    res = _train(cfg, lambda split: abn_plan(cfg, data.num_classes, CPU), data,
                 on_epoch=lambda e, row: seen.append(row))
    assert isinstance(res, StageResult) and res.best_epoch == 1
    row = seen[0]
    assert row["train_loss"] == pytest.approx(row["train_ce_attention"] + row["train_ce_perception"], rel=1e-5)
    assert 0.0 <= res.best_val_accuracy <= 1.0 and not res.model.training


def test_train_wae_keeps_m_frozen(digits):
    data = _digits(digits)
    backbone = create_backbone("lenet5", data.num_classes)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    maps = np.random.default_rng(0).normal(size=(64, 32, 32, 3)).astype(np.float32)
    cfg = RunConfig(epochs=1, batch_size=16, lr=0.003)
    res = _train(cfg, lambda split: wae_plan(cfg, backbone, split, maps, CPU), data)
    assert isinstance(res, StageResult) and len(res.history) == 1
    for k, v in res.model.M.state_dict().items():
        assert torch.equal(v, before[k]), f"frozen M changed: {k}"
    expected = class_mean_maps(maps, data.labels, data.num_classes, index=np.arange(48))
    assert torch.equal(res.model.class_means, expected)  # means from the training rows only
    with pytest.raises(ValueError, match="63 maps for 64"):
        _train(cfg, lambda split: wae_plan(cfg, backbone, split, maps[:63], CPU), data)
