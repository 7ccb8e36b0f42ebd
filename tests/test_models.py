"""Models: backbone shapes, decoder geometry, IMPACTX assembly and freezing, weight loading (offline)."""

from __future__ import annotations

import signal
from contextlib import contextmanager

import pytest
import timm
import torch
import torch.nn.functional as F

from impactx_ray.errors import UserError
from impactx_ray.models import (
    LEP,
    Decoder,
    ImpactX,
    check_backbone_name,
    create_backbone,
    default_pretrained,
    list_backbones,
)

K = 5


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (e.g. a download attempt that waits on the network)."""

    def boom(*_):
        raise TimeoutError(f"took longer than {seconds}s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """HF offline mode with an empty cache, set on the already-imported huggingface_hub too."""
    import huggingface_hub.constants as hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def test_registry_names():
    assert list_backbones() == ["efficientnet_b2", "lenet5", "mobilenet", "mobilenet_v2"]
    check_backbone_name("resnet18")  # any timm name passes through
    check_backbone_name("tf_efficientnet_b2.ns_jft_in1k")
    assert default_pretrained("lenet5") is False
    assert default_pretrained("efficientnet_b2") is True
    with pytest.raises(UserError, match="nope.*lenet5") as e:
        create_backbone("nope", K)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="num_classes"):
        create_backbone("lenet5", 0)
    with pytest.raises(UserError, match="input_size=64"):
        create_backbone("lenet5", K, input_size=64)


# Every registered backbone at 32 and 96. The timm models run at their default input size
# (224 / 260) once, at 32; the 96 cases use input_size=64 to keep the file fast on 2 cores.
CASES = [(name, size, None if name == "lenet5" or size == 32 else 64)
         for name in list_backbones() for size in (32, 96)]
CASES += [("mobilenet", 32, 32), ("mobilenetv3_small_050", 96, 64)]  # no resize; a timm pass-through name


@pytest.mark.parametrize("name,size,input_size", CASES)
def test_backbone_shapes(name, size, input_size):
    torch.manual_seed(0)
    b = create_backbone(name, K, pretrained=False, input_size=input_size).eval()
    if input_size is None and name != "lenet5":
        assert b.input_size == tuple(b.model.pretrained_cfg["input_size"][1:])  # timm's default (224 / 260)
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        f = b.forward_features(x)
        logits = b(x)
        assert f.shape == (2, b.num_features)
        assert logits.shape == (2, K)
        torch.testing.assert_close(logits, b.forward_head(f))
        if name != "lenet5":  # identical to the timm model's own forward on the adapted input
            torch.testing.assert_close(logits, b.model(b.adapter(x)))


def test_adapter_normalises_only_pretrained_and_travels_in_state_dict(tmp_path):
    plain = create_backbone("mobilenet_v2", K, input_size=32)
    assert plain.adapter.mean.flatten().tolist() == [0.0, 0.0, 0.0]
    path = tmp_path / "w.pth"
    torch.save(timm.create_model("mobilenetv2_100", num_classes=K).state_dict(), path)
    pre = create_backbone("mobilenet_v2", K, weights=path, input_size=32)
    torch.testing.assert_close(pre.adapter.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    plain.load_state_dict(pre.state_dict())  # a checkpoint restores its normalisation
    torch.testing.assert_close(plain.adapter.std, pre.adapter.std)


@pytest.mark.parametrize("size,blocks", [(32, 3), (96, 4)])
def test_decoder_shapes(size, blocks):
    d = Decoder(3, (size, size))
    assert d.num_blocks == blocks and d.h0 == size // 2**blocks
    out = d(torch.randn(2, 512) * 10)
    assert out.shape == (2, 3, size, size)
    assert out.abs().max() <= 1


def test_decoder_rejects_unfit_sizes():
    assert Decoder(1, (32, 96))(torch.rand(1, 512)).shape == (1, 1, 32, 96)
    with pytest.raises(UserError, match="7×7"):
        Decoder(3, (7, 7))


def test_lep_copy_is_independent():
    b = create_backbone("lenet5", K)
    lep = LEP.from_backbone(b)
    z = lep(torch.rand(3, 3, 32, 32))
    assert z.shape == (3, 512) and (z > 0).all() and (z < 1).all()
    torch.testing.assert_close(lep.trunk.conv[0].weight, b.conv[0].weight)  # starts from M's weights
    assert lep.trunk.conv[0].weight.data_ptr() != b.conv[0].weight.data_ptr()
    with torch.no_grad():
        lep.trunk.conv[0].weight.add_(1.0)
    assert not torch.equal(lep.trunk.conv[0].weight, b.conv[0].weight)
    assert b(torch.rand(1, 3, 32, 32)).shape == (1, K)  # the original keeps its head
    assert not any(k.startswith("trunk.head.") for k in lep.state_dict())


@pytest.mark.parametrize("size", [32, 96])
def test_impactx_forward_shapes(size):
    model = ImpactX.from_backbone(create_backbone("lenet5", K), size).eval()
    x = torch.rand(2, 3, size, size)
    logits, r = model.outputs(x)
    assert logits.shape == (2, K) and r.shape == (2, 3, size, size)
    assert r.abs().max() <= 1
    torch.testing.assert_close(model(x), logits)  # forward: the logits only
    torch.testing.assert_close(model.explain(x), r)  # explain: IMPACTX's own map
    with pytest.raises(ValueError, match="built for"):
        model(torch.rand(2, 3, size // 2, size // 2))


@pytest.mark.parametrize("name", list_backbones())
def test_frozen_backbone_stays_put(name):
    input_size = None if name == "lenet5" else 32
    torch.manual_seed(0)
    model = ImpactX.from_backbone(create_backbone(name, K, input_size=input_size), 32, freeze=False)
    model.freeze_backbone()
    model.train()
    assert not model.M.training and model.lep.training
    assert not any(p.requires_grad for p in model.M.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y, r = torch.rand(4, 3, 32, 32), torch.randint(0, K, (4,)), torch.rand(4, 3, 32, 32) * 2 - 1
    logits, r_hat = model.outputs(x)
    loss = F.cross_entropy(logits, y) + 0.6 * F.mse_loss(r_hat, r)  # eq. (1)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = model.state_dict()
    for part in ("M.", "lep.", "decoder.", "C."):
        changed = any(not torch.equal(before[k], after[k]) for k in before if k.startswith(part))
        assert changed == (part != "M."), part  # M's weights and BatchNorm statistics are untouched


def test_timm_weights_file_loads_exactly(tmp_path):
    src = timm.create_model("mobilenetv1_100", num_classes=K)
    path = tmp_path / "mnv1.pth"
    torch.save(src.state_dict(), path)
    b = create_backbone("mobilenet", K, weights=path)
    for k, v in src.state_dict().items():
        assert torch.equal(b.model.state_dict()[k], v), k  # classifier included: it fits K


def test_bad_weights_are_user_errors(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(UserError, match="nowhere.pth"):
        create_backbone("mobilenet", K, weights=missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="garbage.pth.*--no-pretrained"):
        create_backbone("mobilenet", K, weights=garbage)
    lenet_file = tmp_path / "lenet.pth"
    torch.save(create_backbone("lenet5", K).state_dict(), lenet_file)
    with pytest.raises(UserError, match="mobilenet") as e:  # wrong architecture, not silently random
        create_backbone("mobilenet", K, weights=lenet_file)
    assert "\n" not in str(e.value)


def test_offline_without_weights_is_a_user_error(offline_hub):
    with deadline(30), pytest.raises(UserError, match=r"mobilenet_v2.*--weights PATH.*--no-pretrained") as e:
        create_backbone("mobilenet_v2", K, pretrained=True)
    assert "\n" not in str(e.value)


def test_lenet_weights(tmp_path):
    with pytest.raises(UserError, match="lenet5.*--weights"):
        create_backbone("lenet5", K, pretrained=True)
    src = create_backbone("lenet5", K)
    path = tmp_path / "lenet.pth"
    torch.save(src.state_dict(), path)
    same = create_backbone("lenet5", K, weights=path)
    for k, v in src.state_dict().items():
        assert torch.equal(same.state_dict()[k], v), k
    other_k = create_backbone("lenet5", K + 3, weights=path)  # new head, same features
    assert torch.equal(other_k.conv[0].weight, src.conv[0].weight)
    assert other_k.head.out_features == K + 3
