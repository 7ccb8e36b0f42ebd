"""The map engine's forward (``explain/forward.py``): compiled, reduced precision, channels-last.

* Compiled maps equal shap's up to the float32 rounding of the model's logits
  (``tolerances.owen_map_atol``) at 32x32 and 96x96 (on a CPU the graph's batch dimension is
  dynamic: the short last chunk of every step runs compiled at its own size, unpadded, which these
  cases exercise; CUDA pads it to the one static shape).
* ``compile="auto"`` compiles only calls large enough to repay it, and such a call on a CPU probes
  its fastest forward batch; where torch.compile cannot run,
  or fails, one line says so and the eager forward gives the maps.
* ``precision`` is part of a map store's identity (fp32 stores keep the key they had before
  precisions existed); ``compile`` is not.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from impactx_ray.cli import main
from impactx_ray.config import RunConfig
from impactx_ray.data import load_dataset
from impactx_ray.errors import UserError
from impactx_ray.explain import ExplainSettings, MapStore, compute_store, explain_true_class, fully_masked
from impactx_ray.explain import forward as fwd
from impactx_ray.explain.shap_maps import TrueClassExplainer

from tolerances import LENET5_LOGIT_ULPS, LOGIT_ULPS, U32, assert_maps_close, logit_scale
from toys import digits_at, engine_model

needs_compiler = pytest.mark.skipif(fwd.compile_blocker(torch.device("cpu")) is not None,
                                    reason="torch.compile cannot run here")


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    train, _ = load_dataset("digits")
    return train.float_images(torch.arange(3)), train.labels[:3]


def _images(digits, size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = digits_at(digits, size, n)
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy()), y.numpy()  # N×C×H×W -> N×H×W×C


def _close(model, hwc: np.ndarray, got: np.ndarray, ref: np.ndarray) -> None:
    """LeNet-5 maps equal up to the float32 rounding of its logits (eager or compiled)."""
    x = torch.from_numpy(hwc).permute(0, 3, 1, 2)
    masked = fully_masked(x, f"blur({x.shape[-1] // 4},{x.shape[-2] // 4})")
    assert_maps_close(got, ref, logit_scale(model, x, masked), ulps=LENET5_LOGIT_ULPS)


def _explainer(model, hwc, **kw) -> TrueClassExplainer:
    h, w, c = hwc.shape[1:]
    kw = {"masker": f"blur({w // 4},{h // 4})", "batch_size": 50, **kw}
    return TrueClassExplainer(model, (c, h, w), **kw)


@needs_compiler
@pytest.mark.parametrize(("size", "max_evals", "forward_batch"), [(32, 400, 64), (96, 1000, 64)])
def test_compiled_maps_equal_shaps(digits, size, max_evals, forward_batch) -> None:
    model = engine_model()
    hwc, y = _images(digits, size, 2)
    kw = {"max_evals": max_evals, "forward_batch": forward_batch}
    compiled = _explainer(model, hwc, engine="batched", compile="on", **kw)
    got = compiled.explain_many(hwc, y)
    mf = compiled.model_forward
    assert mf.compiled and mf._graph is not None
    # every masked image went through the graph, the steps' short tails (2 images x 50 masks a
    # step = 64 + 36) too, unpadded; a chunk of one image would run eager
    assert mf.graph_images == compiled.batched.forward_images - mf.eager_images and mf.padded_images == 0
    assert mf.eager_images < 2 * max_evals // 50
    ref = _explainer(model, hwc, engine="shap", **kw).explain_many(hwc, y)
    _close(model, hwc, got, ref)


def test_auto_compiles_only_calls_that_repay_it(monkeypatch) -> None:
    monkeypatch.setattr(fwd, "compile_blocker", lambda device: None)
    f = fwd.ModelForward(engine_model(), torch.device("cpu"), compile="auto")
    assert not f.select(fwd.AUTO_COMPILE_MIN_IMAGES - 1)
    assert f.select(fwd.AUTO_COMPILE_MIN_IMAGES)  # e.g. a 128-map shard at 2000 evaluations
    assert not fwd.ModelForward(engine_model(), torch.device("cpu"), compile="off").select(10**9)
    assert fwd.ModelForward(engine_model(), torch.device("cpu"), compile="on").select(1)
    # on CUDA, auto keeps fp32 (the shap-exact setting) eager and compiles reduced precision
    assert not fwd.ModelForward(engine_model(), torch.device("cuda"), compile="auto").select(10**9)
    assert fwd.ModelForward(engine_model(), torch.device("cuda"), compile="auto", precision="bf16").select(10**9)
    # what a store shard or a single map asks for, through the explainer
    ex = _explainer(engine_model(), np.zeros((1, 32, 32, 3), np.float32), engine="batched", max_evals=2000)
    assert ex.model_forward.compile_mode == "auto" and 128 * 2000 >= fwd.AUTO_COMPILE_MIN_IMAGES > 2000


def test_no_compiler_says_so_once_and_runs_eager(digits, monkeypatch, capfd) -> None:
    monkeypatch.setattr(fwd, "compile_blocker", lambda device: "no C++ compiler found (tried g++; set CXX)")
    monkeypatch.setattr(fwd, "_said", set())
    model = engine_model()
    hwc, y = _images(digits, 32, 1)
    kw = {"engine": "batched", "max_evals": 100}
    eager = _explainer(model, hwc, compile="off", **kw).explain_many(hwc, y)
    for _ in range(2):
        ex = _explainer(model, hwc, compile="on", **kw)
        assert np.array_equal(ex.explain_many(hwc, y), eager)
        assert not ex.model_forward.compiled
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["impactx: torch.compile unavailable (no C++ compiler found (tried g++; set CXX)); "
                   "the map engine runs the eager forward"]


def test_failed_compile_says_why_and_runs_eager(digits, monkeypatch, capfd) -> None:
    def broken(module, **kw):
        def run(x):
            raise RuntimeError("inductor exploded\nmore detail")
        return run

    monkeypatch.setattr(fwd, "compile_blocker", lambda device: None)
    monkeypatch.setattr(fwd, "_said", set())
    monkeypatch.setattr(torch, "compile", broken)
    model = engine_model()
    hwc, y = _images(digits, 32, 1)
    kw = {"engine": "batched", "max_evals": 100, "forward_batch": 64}  # 50 masks a step: one padded chunk
    ex = _explainer(model, hwc, compile="on", **kw)
    got = ex.explain_many(hwc, y)  # eager from the first chunk on: on padded chunks, so to rounding
    _close(model, hwc, got, _explainer(model, hwc, compile="off", **kw).explain_many(hwc, y))
    assert ex.model_forward.compile_mode == "off"
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["impactx: torch.compile failed (RuntimeError: inductor exploded); the map engine runs the "
                   "eager forward"]


class SmallConv(torch.nn.Module):
    """Conv -> ReLU -> pool -> linear, with weights large enough that blurring moves the logits by
    ~1 (far above bf16's rounding), and cheap under CPU autocast."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8 * 4 * 4, 10)
        with torch.no_grad():
            self.conv.weight.mul_(20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4).flatten(1))


def test_reduced_precision_changes_maps_a_little(digits) -> None:
    """bf16 and fp16 maps are close to fp32's but not equal; the logits handed on are float32."""
    model = SmallConv().eval()
    hwc, y = _images(digits, 32, 2)
    kw = {"engine": "batched", "max_evals": 200}
    fp32 = _explainer(model, hwc, **kw).explain_many(hwc, y)
    for precision in ("bf16", "fp16"):
        ex = _explainer(model, hwc, precision=precision, **kw)
        maps = ex.explain_many(hwc, y)
        assert ex.forward(torch.from_numpy(hwc)).dtype == torch.float32
        assert not np.array_equal(maps, fp32) and np.isfinite(maps).all()
        for a, b in zip(maps, fp32):
            assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9


def test_channels_last_copy_gives_the_same_logits_and_leaves_the_model() -> None:
    model = engine_model("mobilenetv2_050", 32)
    x = torch.rand(4, 32, 32, 3)
    plain = fwd.ModelForward(model, torch.device("cpu"), channels_last=False)
    cl = fwd.ModelForward(model, torch.device("cpu"), channels_last=True)
    with torch.no_grad():
        ref = plain(x)
        # the same logits up to the rounding of another memory layout's kernels (tolerances.py)
        torch.testing.assert_close(cl(x), ref, rtol=0, atol=LOGIT_ULPS * U32 * float(ref.abs().max()))
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()  # the caller's model keeps its layout
    assert cl.net is not model


@pytest.mark.parametrize(("kwargs", "needle"), [({"precision": "fp8"}, "precision='fp8'"),
                                                ({"compile": "yes"}, "compile='yes'")])
def test_bad_settings_are_one_line_errors(kwargs, needle) -> None:
    with pytest.raises(UserError, match=needle):
        ExplainSettings(**kwargs)
    with pytest.raises(UserError, match=needle):
        _explainer(engine_model(), np.zeros((1, 32, 32, 3), np.float32), **kwargs)
    with pytest.raises(UserError, match="--" + needle.split("=")[0]):
        RunConfig(**kwargs)


@pytest.mark.parametrize(("flag", "value"), [("--precision", "fp8"), ("--compile", "maybe")])
def test_bad_flags_exit_2_on_one_line(tmp_path, capsys, flag, value) -> None:
    out = tmp_path / "run"
    code = main(["run", "--out", str(out), "--epochs", "1", "--max-evals", "40", "--quiet", flag, value])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and value in err and "Traceback" not in err, err
    assert not out.exists()


def test_precision_is_part_of_a_stores_identity_and_compile_is_not(tmp_path, digits) -> None:
    x, y = digits
    hwc = (32, 32, 3)
    fp32, bf16 = ExplainSettings(max_evals=20), ExplainSettings(max_evals=20, precision="bf16")
    meta = fp32.store_meta("ckpt", "data", (32, 32))
    # fp32 meta is what it was before precisions existed: old stores keep their key
    assert set(meta) == {"checkpoint_hash", "data_fingerprint", "masker", "max_evals", "batch_size", "seed",
                         "engine", "shap_version"}
    assert ExplainSettings(max_evals=20, compile="off").store_meta("ckpt", "data", (32, 32)) == meta
    assert bf16.store_meta("ckpt", "data", (32, 32))["precision"] == "bf16"
    assert fp32.store_key(meta) != bf16.store_key(bf16.store_meta("ckpt", "data", (32, 32)))
    store = MapStore.create_or_open(tmp_path / "s", meta=meta, num_maps=3, map_shape=hwc)
    assert fp32.matches(store, "ckpt") and not bf16.matches(store, "ckpt")
    with pytest.raises(UserError, match="precision='fp32', not precision='bf16'"):
        compute_store(store, engine_model(), x, y, bf16, progress=False)
    compute_store(store, engine_model(), x, y, ExplainSettings(max_evals=20, compile="off"), progress=False)
    assert store.missing_shards() == []


def test_explain_true_class_takes_precision_and_compile(digits) -> None:
    x, y = digits
    kw = {"max_evals": 40, "progress": False, "masker": "blur(8,8)"}
    a = explain_true_class(engine_model(), x[:1], y[:1], compile="off", **kw)
    b = explain_true_class(engine_model(), x[:1], y[:1], compile="auto", precision="fp32", **kw)
    assert np.array_equal(a, b)  # auto does not compile a 40-evaluation map


class SlowAbove16(torch.nn.Module):
    """Sleeps 2 ms per image in calls of 8, 1 ms in calls of 16 and 3 ms in larger calls: a model
    whose activations leave the caches above 16 images."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_image = {8: 2e-3, 16: 1e-3}.get(len(x), 3e-3)
        time.sleep(per_image * len(x))
        return x.flatten(1)[:, :10]


def test_probe_picks_the_fastest_chunk_and_stops_once_calls_get_slower() -> None:
    f = fwd.ModelForward(SlowAbove16(), torch.device("cpu"), compile="off")
    rates = f.probe_chunk((4, 4, 3), seconds=0.02)
    assert list(rates) == [8, 16, 32]  # 32 ran at a third of 16's rate: 64 and up not tried
    assert f.chunk == 16 and rates[16] > 1.5 * rates[8] > 2 * rates[32]


def test_a_large_cpu_call_probes_its_forward_batch_once(digits, monkeypatch) -> None:
    from impactx_ray.explain import shap_maps

    probed = []
    real = fwd.ModelForward.probe_chunk
    monkeypatch.setattr(fwd.ModelForward, "probe_chunk", lambda self, hwc: probed.append(hwc) or real(
        self, hwc, sizes=(16, 32), seconds=0.01))
    monkeypatch.setattr(shap_maps, "AUTO_COMPILE_MIN_IMAGES", 200)  # a "store shard" of 2 maps at 100 evals
    model = engine_model()
    hwc, y = _images(digits, 32, 2)
    ex = _explainer(model, hwc, engine="batched", max_evals=100, compile="off")
    small = ex.explain_many(hwc[:1], y[:1])  # 100 images: the default chunk, no probe
    assert probed == [] and ex.batched.forward_batch == 512
    maps = ex.explain_many(hwc, y)
    assert probed == [(32, 32, 3)] and ex.batched.forward_batch == ex.model_forward.chunk in (16, 32)
    assert set(ex.forward_rates) <= {16, 32} and 16 in ex.forward_rates
    ex.explain_many(hwc, y)
    assert len(probed) == 1  # once per explainer
    _close(model, hwc[:1], maps[:1], small)
    _close(model, hwc, maps, _explainer(model, hwc, engine="shap", max_evals=100).explain_many(hwc, y))
    given = _explainer(model, hwc, engine="batched", max_evals=100, compile="off", forward_batch=64)
    given.explain_many(hwc, y)
    assert len(probed) == 1 and given.batched.forward_batch == 64  # a given forward_batch is kept
