"""Single-stage training: M, LEP, D and C learn together, maps are refreshed on schedule from the
current A, only the images that are due, and a resumed fit continues exactly."""

import copy
import json

import numpy as np
import pytest
import torch

from impactx_ray.config import RunConfig
from impactx_ray.data import ImageData
from impactx_ray.train import FitHooks, Split, train
from impactx_ray.train.single_stage import due, single_stage_plan


def train_single_stage(cfg, data, tr, va, explain, **hooks):
    """Single-stage training through the one loop, as the method table runs it."""
    cpu, hooks = torch.device("cpu"), FitHooks(**hooks)
    split = Split(data, tr, va)
    return train(lambda: single_stage_plan(cfg, split, explain, cpu, hooks), split, seed=cfg.seed,
                 batch_size=cfg.batch_size, device=cpu, hooks=hooks)

N = 40


def _data():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.arange(N) % 2
    images[labels == 1, :, :8, :8] = 255  # class 1: a bright corner
    return ImageData(images, labels, ["dark", "bright"])


class CountingExplainer:
    """A stand-in for SHAP (fast): the map is A's true-class logit times the image, so it changes
    whenever A does; records how many images each call explains and A's weights at the time."""

    def __init__(self):
        self.calls, self.weights = [], []

    def __call__(self, model, x, y):
        self.calls.append(len(x))
        self.weights.append(model.conv[0].weight.detach().clone())
        assert not model.training
        with torch.no_grad():
            logit = model(x).gather(1, y.view(-1, 1).to(x.device)).view(-1, 1, 1, 1)
        return (logit * x).permute(0, 2, 3, 1).cpu().numpy()  # N×H×W×C


def test_due_covers_every_image_once_per_period():
    for every in (1, 2, 3):
        seen = torch.cat([due(10, e, every) for e in range(1, every + 1)])
        assert sorted(seen.tolist()) == list(range(10))
    assert due(10, 4, 3).tolist() == [0, 3, 6, 9]


def test_everything_trains_and_maps_refresh_on_schedule():
    data = _data()
    cfg = RunConfig(epochs=3, refresh_every=2, batch_size=8, lr=1e-3, lam=0.5)
    ex = CountingExplainer()
    tr, va = torch.arange(0, 32), torch.arange(32, N)
    res = train_single_stage(cfg, data, tr, va, ex, progress=False)
    # all N before epoch 1; after epoch 1 the even positions, after epoch 2 the odd; none after 3
    assert ex.calls == [N, N // 2, N // 2]
    assert not torch.equal(ex.weights[0], ex.weights[1])  # refreshed from the current A
    hist = res.history
    assert [r["maps_refreshed"] for r in hist] == [N // 2, N // 2, 0]
    for key in ("train_ce", "train_ce_A", "train_mse", "val_accuracy", "val_mse", "refresh_s"):
        assert all(np.isfinite(r[key]) for r in hist)
    assert all(p.requires_grad for p in res.model.parameters())  # M is trained too


def test_resume_continues_exactly_with_the_maps_of_the_moment():
    data = _data()
    cfg = RunConfig(epochs=3, refresh_every=2, batch_size=8, lr=1e-3, lam=0.5)
    tr, va = torch.arange(0, 32), torch.arange(32, N)
    states = []
    full = train_single_stage(cfg, data, tr, va, CountingExplainer(),
                              progress=False,
                              on_state=lambda s: states.append(copy.deepcopy(s)))
    assert states[0]["epoch"] == 1 and states[0]["targets"].shape == (N, 3, 32, 32)
    ex = CountingExplainer()
    again = train_single_stage(cfg, data, tr, va, ex,
                               progress=False, resume=states[0])
    assert ex.calls == [N // 2]  # only epoch 2's refresh: the state carried the maps
    strip = [{k: v for k, v in r.items() if k != "refresh_s"} for r in again.history]
    assert strip == [{k: v for k, v in r.items() if k != "refresh_s"} for r in full.history]


def test_bad_refresh_every_is_one_line(tmp_path, capsys):
    from impactx_ray.cli import main

    assert main(["run", "--training", "single-stage", "--refresh-every", "0",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--refresh-every" in err and "0" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_run_single_stage_on_digits_reports_both_accuracies(tmp_path, capsys):
    from impactx_ray.cli import main

    out = tmp_path / "run"
    assert main(["run", "--training", "single-stage", "--epochs", "2", "--max-evals", "16",
                 "--refresh-every", "2", "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert 0 <= result["baseline_test_accuracy"] <= 1
    assert 0 <= result["impactx_single_test_accuracy"] <= 1 and "impactx_test_accuracy" not in result
    history = json.loads((out / "single_stage" / "history.json").read_text())
    assert [r["maps_refreshed"] for r in history] == [719, 0]  # 1437 digits, every 2nd after epoch 1
    printed = capsys.readouterr().out
    assert "IMPACTX single-stage test accuracy" in printed and "baseline (A) test accuracy" in printed
    # no two-stage IMPACTX here: MoRF compares the single-stage one, and says so
    assert main(["evaluate", "--morf", "--morf-images", "8", "--out", str(out), "--quiet"]) == 0
    morf = json.loads((out / "morf" / "morf.json").read_text())
    assert morf["impactx_method"] == "impactx_single"
    assert {"IMPACTX", "SHAP of IMPACTX", "random"} <= set(morf["aopc"])
    assert json.loads((out / "result.json").read_text())["morf"]["impactx_method"] == "impactx_single"
