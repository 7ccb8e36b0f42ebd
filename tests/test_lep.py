"""The LEP as the paper builds it (§4.3): A's architecture with its last FC layers replaced by
FC-512 + sigmoid -- for LeNet-5 the conv trunk → FC-512; checkpoints from before still load."""

import torch

from impactx_ray.config import RunConfig
from impactx_ray.data import load_dataset
from impactx_ray.io import file_sha256
from impactx_ray.methods import METHODS, ModelSpec, checkpoint_meta, load_model
from impactx_ray.models import LEP, ImpactX, create_backbone
from impactx_ray.rundir import RunDir
from impactx_ray.train.checkpoint import save_checkpoint


def test_lenet5_lep_is_the_conv_trunk_then_fc512():
    b = create_backbone("lenet5", 10)
    lep = LEP.from_backbone(b)
    x = torch.rand(2, 3, 32, 32)
    assert lep.fc.in_features == 400 and lep.fc.out_features == 512
    assert not any(k.startswith(("trunk.fc.", "trunk.head.")) for k in lep.state_dict())
    with torch.no_grad():
        expected = torch.sigmoid(lep.fc(b.conv(x).flatten(1)))  # conv trunk of M's weights → FC-512
    torch.testing.assert_close(lep(x), expected)
    assert b(x).shape == (2, 10) and b.num_features == 84  # M keeps its FC layers


def test_old_lenet5_lep_keeps_fc120_fc84():
    lep = LEP.from_backbone(create_backbone("lenet5", 10), keep_fc=True)
    assert lep.fc.in_features == 84 and "trunk.fc.0.weight" in lep.state_dict()


def test_checkpoints_record_the_lep_and_old_ones_still_load(tmp_path):
    train, _ = load_dataset("digits")
    cfg = RunConfig()
    spec = ModelSpec.of(cfg, train)
    impactx = METHODS["impactx"]
    meta = checkpoint_meta(impactx, cfg, train, stage1_hash="0" * 64)
    assert meta["lep"] == "fc-layers-replaced"
    new = ImpactX.from_backbone(create_backbone("lenet5", 10), 32)
    save_checkpoint(tmp_path / "new.pt", new.state_dict(), {**meta, "val_accuracy": 0.5})
    loaded, _ = load_model(tmp_path / "new.pt", spec, impactx)
    assert loaded.lep.fc.in_features == 400
    old = ImpactX.from_backbone(create_backbone("lenet5", 10), 32, lep_keeps_fc=True)
    old_meta = {k: v for k, v in meta.items() if k != "lep"}  # as written before the paper's LEP
    save_checkpoint(tmp_path / "old.pt", old.state_dict(), {**old_meta, "val_accuracy": 0.5})
    loaded_old, _ = load_model(tmp_path / "old.pt", spec, impactx)
    assert loaded_old.lep.fc.in_features == 84
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded_old.eval()(x), old.eval()(x))


def test_a_run_reuses_a_checkpoint_only_if_it_is_the_model_the_method_builds_now(tmp_path):
    """``impactx run`` retrains an IMPACTX checkpoint from before the paper's LEP; one from
    before a setting existed counts as made with that setting's default."""
    train, _ = load_dataset("digits")
    cfg = RunConfig()
    run = RunDir(tmp_path)
    impactx = METHODS["impactx"]
    stage1 = run.checkpoint(METHODS["baseline"])
    save_checkpoint(stage1, create_backbone("lenet5", 10).state_dict(),
                    checkpoint_meta(METHODS["baseline"], cfg, train))
    meta = {**checkpoint_meta(impactx, cfg, train, stage1_hash=file_sha256(stage1)),
            "val_accuracy": 0.5}
    model = ImpactX.from_backbone(create_backbone("lenet5", 10), 32)
    save_checkpoint(run.checkpoint(impactx), model.state_dict(), meta)
    assert run.holds(impactx, cfg)
    # written before --precision existed: made in fp32, the default, so still reused
    before_precision = {**meta, "config": {k: v for k, v in meta["config"].items()
                                           if k != "precision"}}
    save_checkpoint(run.checkpoint(impactx), model.state_dict(), before_precision)
    assert run.holds(impactx, cfg)
    assert not run.holds(impactx, RunConfig(precision="bf16"))
    old_meta = {k: v for k, v in meta.items() if k != "lep"}  # written before the paper's LEP
    save_checkpoint(run.checkpoint(impactx), model.state_dict(), old_meta)
    assert not run.holds(impactx, cfg)
