"""Losses against hand computations; both stages on a small slice of the digits data."""

import numpy as np
import pytest
import torch

from impactx_ray.config import RunConfig
from impactx_ray.data import map_targets, scale_maps
from impactx_ray.train import FitHooks, Split, accuracy, impactx_loss, stage1_plan, stage2_plan, train

CPU = torch.device("cpu")


def train_stage1(cfg, data, tr, va, **hooks):
    """Stage 1 through the one loop, as the method table runs it."""
    return train(lambda: stage1_plan(cfg, data.num_classes, CPU), Split(data, tr, va), seed=cfg.seed,
                 batch_size=cfg.batch_size, device=CPU, hooks=FitHooks(progress=False, **hooks))


def train_stage2(cfg, backbone, data, maps, tr, va, **hooks):
    return train(lambda: stage2_plan(cfg, backbone, Split(data, tr, va), maps, CPU), Split(data, tr, va),
                 seed=cfg.seed, batch_size=cfg.batch_size, device=CPU,
                 hooks=FitHooks(progress=False, **hooks))


def test_impactx_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    pred = torch.zeros(2, 1, 1, 2)
    target = torch.tensor([[[[1.0, -1.0]]], [[[0.5, 0.0]]]])
    total, ce, mse = impactx_loss(logits, labels, pred, target, lam=0.5)
    ce_hand = (-np.log(np.exp(2) / (np.exp(2) + 1)) - np.log(1 / (1 + np.e))) / 2
    mse_hand = (1 + 1 + 0.25 + 0) / 4
    assert ce.item() == pytest.approx(ce_hand, rel=1e-6)
    assert mse.item() == pytest.approx(mse_hand, rel=1e-6)
    assert total.item() == pytest.approx(ce_hand + 0.5 * mse_hand, rel=1e-6)


def test_impactx_loss_rejects_mismatched_maps():
    with pytest.raises(ValueError, match="shape"):
        impactx_loss(torch.zeros(1, 2), torch.tensor([0]), torch.zeros(1, 3, 4, 4),
                     torch.zeros(1, 3, 8, 8), 1.0)


def test_scale_maps_per_image_max_abs():
    maps = torch.tensor([[[[2.0, -4.0]]], [[[0.0, 0.0]]], [[[0.5, 0.25]]]])
    scaled = scale_maps(maps)
    assert torch.allclose(scaled[0], torch.tensor([[[0.5, -1.0]]]))
    assert torch.equal(scaled[1], torch.zeros(1, 1, 2))  # all-zero maps stay zero, no NaN
    assert torch.allclose(scaled[2], torch.tensor([[[1.0, 0.5]]]))


def test_map_targets_layout():
    maps = np.arange(2 * 4 * 5 * 3, dtype=np.float32).reshape(2, 4, 5, 3) - 30  # N×H×W×C
    t = map_targets(maps)
    assert t.shape == (2, 3, 4, 5)
    assert t.abs().amax().item() == pytest.approx(1.0)
    assert t[1, 2, 3, 4].item() == pytest.approx(maps[1, 3, 4, 2] / np.abs(maps[1]).max())


def _slice(digits, n_train=300):
    train, _ = digits
    return train.subset(torch.arange(n_train))


def test_stage1_learns_and_is_reproducible(digits):
    data = _slice(digits)
    cfg = RunConfig(epochs=4, batch_size=32, lr=0.003, seed=3)
    tr, va = torch.arange(250), torch.arange(250, 300)
    a = train_stage1(cfg, data, tr, va)
    b = train_stage1(cfg, data, tr, va)
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    assert a.history[-1]["train_loss"] < a.history[0]["train_loss"]
    assert a.best_val_accuracy == max(r["val_accuracy"] for r in a.history)
    # the returned model is the best epoch's, not the last one's
    assert accuracy(a.model, data, device=CPU, indices=va) == pytest.approx(
        a.best_val_accuracy)
    # over 10 seeds × 1 and 2 threads: best val accuracy >= 0.72 (chance 0.1), the loss falls >= 1.58
    assert a.best_val_accuracy > 0.5


def test_stage2_keeps_m_frozen_and_logs_loss_parts(digits):
    data = _slice(digits, 200)
    cfg = RunConfig(epochs=2, batch_size=32, lr=0.003, lam=0.8)
    tr, va = torch.arange(160), torch.arange(160, 200)
    stage1 = train_stage1(cfg, data, tr, va)
    m_before = {k: v.clone() for k, v in stage1.model.state_dict().items()}
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(200, 32, 32, 3)).astype(np.float32)
    seen = []
    result = train_stage2(cfg, stage1.model, data, maps, tr, va,
                          on_epoch=lambda e, row: seen.append(row))
    assert [r["epoch"] for r in seen] == [1, 2]
    for row in seen:
        assert row["train_loss"] == pytest.approx(row["train_ce"] + 0.8 * row["train_mse"], rel=1e-5)
    for k, v in result.model.M.state_dict().items():
        assert torch.equal(v, m_before[k]), f"frozen M changed: {k}"
    x = data.float_images(torch.arange(4))
    logits, pred = result.model.outputs(x)
    assert logits.shape == (4, 10) and pred.shape == (4, 3, 32, 32)
    # one output contract: forward gives the logits, explain the map, as outputs does
    torch.testing.assert_close(result.model(x), logits)
    torch.testing.assert_close(result.model.explain(x), pred)


def test_stage2_rejects_maps_of_another_size(digits):
    data = _slice(digits, 40)
    cfg = RunConfig(epochs=1)
    stage1 = train_stage1(cfg, data, torch.arange(30), torch.arange(30, 40))
    with pytest.raises(ValueError, match="39 maps for 40"):
        train_stage2(cfg, stage1.model, data, np.zeros((39, 32, 32, 3), np.float32),
                     torch.arange(30), torch.arange(30, 40))


def test_an_interrupted_fit_resumes_exactly(digits):
    """Resuming from the state after epoch 2 gives what the uninterrupted 4 epochs gave."""
    import copy

    data = _slice(digits, 200)
    cfg = RunConfig(epochs=4, batch_size=32, lr=0.003, seed=1)
    tr, va = torch.arange(160), torch.arange(160, 200)
    states = []
    full = train_stage1(cfg, data, tr, va,
                        on_state=lambda s: states.append(copy.deepcopy(s)))
    assert [s["epoch"] for s in states] == [1, 2, 3, 4]
    seen = []
    resumed = train_stage1(cfg, data, tr, va, resume=states[1],
                           on_epoch=lambda e, row: seen.append(e))
    assert seen == [3, 4]  # epochs 1 and 2 were not trained again
    assert resumed.history == full.history and resumed.best_epoch == full.best_epoch
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
