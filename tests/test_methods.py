"""The method table: one parametrized test over every registered method (its model's output
contract, its checkpoint round trip), and the errors a wrong checkpoint gives."""

import numpy as np
import pytest
import torch

from impactx_ray.config import STAGE1_SETTINGS, RunConfig
from impactx_ray.errors import UserError
from impactx_ray.io import file_sha256
from impactx_ray.methods import (
    BASELINE,
    METHODS,
    ModelSpec,
    TrainInputs,
    checkpoint_meta,
    get_method,
    load_model,
    train_method,
)
from impactx_ray.train import FitHooks, Split
from impactx_ray.train.checkpoint import save_checkpoint

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def small(digits):
    train, _ = digits
    return train.subset(torch.arange(64))


def test_the_table():
    assert list(METHODS) == ["baseline", "impactx", "abn", "wae", "impactx_single"]
    assert [m.directory for m in METHODS.values()] == ["stage1", "stage2", "abn", "wae",
                                                       "single_stage"]
    assert [m.needs_maps for m in METHODS.values()] == [False, True, False, True, False]
    assert METHODS["abn"].settings == BASELINE.settings == STAGE1_SETTINGS
    assert "lam" in METHODS["impactx"].settings and "lam" not in METHODS["wae"].settings
    assert "max_evals" in METHODS["wae"].settings and "max_evals" not in METHODS["abn"].settings
    with pytest.raises(UserError, match="unknown method 'gradcam'.*baseline"):
        get_method("gradcam")


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_saves_and_loads(name, small, tmp_path):
    """train_method → checkpoint_meta → load_model gives the same function; forward gives N×K
    logits, and the map-producing methods give N×C×H×W maps from explain."""
    method, cfg = METHODS[name], RunConfig(epochs=1, batch_size=16, lr=0.003, max_evals=40)
    tr, va = torch.arange(48), torch.arange(48, 64)
    inputs = TrainInputs(cfg, Split(small, tr, va), CPU, FitHooks(progress=False))
    if method.builds_on_stage1:
        base, base_meta = train_method(BASELINE, inputs)
        inputs.stage1 = tmp_path / "stage1.pt"
        save_checkpoint(inputs.stage1, base.model.state_dict(), base_meta)
        inputs.maps = np.random.default_rng(0).normal(size=(64, 32, 32, 3)).astype(np.float32)
    result, meta = train_method(method, inputs)
    assert meta["kind"] == name and meta["config"] == cfg.subset(method.settings)
    assert meta["val_accuracy"] == result.best_val_accuracy and meta["best_epoch"] == 1
    if method.builds_on_stage1:
        assert meta["stage1_hash"] == file_sha256(inputs.stage1)
    else:
        assert "stage1_hash" not in meta
    path = tmp_path / "model.pt"
    save_checkpoint(path, result.model.state_dict(), meta)
    loaded, loaded_meta = load_model(path, ModelSpec.of(cfg, small), method)
    assert loaded_meta == meta and not loaded.training
    x = small.float_images(torch.arange(5))
    with torch.no_grad():
        logits = loaded(x)
        assert logits.shape == (5, small.num_classes)
        torch.testing.assert_close(logits, result.model.eval()(x))
        if hasattr(loaded, "explain"):
            r = loaded.explain(x)
            assert r.dim() == 4 and r.shape[0] == 5 and r.shape[-2:] == (32, 32)


def test_load_model_refuses_another_kind_model_or_class_count(small, tmp_path):
    cfg = RunConfig()
    path = tmp_path / "a.pt"
    spec = ModelSpec.of(cfg, small)
    save_checkpoint(path, spec.backbone().state_dict(), checkpoint_meta(BASELINE, cfg, small))
    with pytest.raises(UserError, match="holds 'baseline'.*needs a 'abn'"):
        load_model(path, spec, METHODS["abn"])
    with pytest.raises(UserError, match="num_classes=10.*num_classes=7"):
        load_model(path, ModelSpec("lenet5", 7))
    with pytest.raises(UserError, match="model='lenet5'.*model='mobilenet'"):
        load_model(path, ModelSpec("mobilenet", 10))


def test_checkpoints_of_the_old_runner_still_load(small, tmp_path):
    """Before the method table, stage-1/stage-2 checkpoints said kind stage1/stage2."""
    cfg, spec = RunConfig(), ModelSpec.of(RunConfig(), small)
    path = tmp_path / "old.pt"
    save_checkpoint(path, spec.backbone().state_dict(),
                    {"kind": "stage1", "model": "lenet5", "num_classes": 10,
                     "config": cfg.subset(STAGE1_SETTINGS), "val_accuracy": 0.5})
    model, meta = load_model(path, spec, BASELINE)
    assert meta["kind"] == "baseline" and model(small.float_images(torch.arange(2))).shape == (2, 10)
