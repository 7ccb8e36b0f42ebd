"""The CLI: every bad input is one line on stderr, exit 2, no traceback, nothing lost."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from impactx_ray.cli import main
from impactx_ray.config import RunConfig
from impactx_ray.data import load_dataset
from impactx_ray.explain import MapStore
from impactx_ray.io import file_sha256
from impactx_ray.methods import BASELINE, checkpoint_meta
from impactx_ray.models import create_backbone
from impactx_ray.train.checkpoint import save_checkpoint

TINY = ["--model", "lenet5", "--dataset", "digits", "--epochs", "1", "--max-evals", "40",
        "--quiet"]


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def fails_cleanly(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("impactx: error:") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("extra, needle", [
    (["--model", "resnet_nope"], "resnet_nope"),
    (["--dataset", "mnist"], "mnist"),
    (["--lambda", "-0.5"], "-0.5"),
    (["--val-fraction", "0"], "--val-fraction"),
    (["--val-fraction", "1.5"], "1.5"),
    (["--batch-size", "0"], "--batch-size"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "many"], "many"),
    (["--bogus-flag"], "--bogus-flag"),
])
def test_bad_run_arguments(tmp_path, capsys, extra, needle):
    out = tmp_path / "run"
    fails_cleanly(capsys, ["run", "--out", str(out), *TINY, *extra], needle)
    assert not out.exists(), "a rejected run must not create its directory"


def test_missing_data_without_download(tmp_path, capsys):
    root = tmp_path / "nodata"
    fails_cleanly(capsys, ["run", "--out", str(tmp_path / "r"), *TINY, "--dataset", "cifar10",
                           "--data-root", str(root)], str(root), "--download")
    assert not (tmp_path / "r").exists()


@pytest.fixture
def run_dir(tmp_path):
    """A run directory with a config and a (quickly made, untrained) stage-1 checkpoint."""
    out = tmp_path / "run"
    cfg = {"model": "lenet5", "dataset": "digits", "epochs": 1, "max_evals": 40}
    out.mkdir()
    (out / "config.json").write_text(json.dumps(RunConfig(**cfg).to_dict()))

    model = create_backbone("lenet5", 10)
    train, _ = load_dataset("digits")
    meta = {**checkpoint_meta(BASELINE, RunConfig(**cfg), train),
            "val_accuracy": 0.1, "best_epoch": 1, "seconds": 0.0}
    save_checkpoint(out / "stage1" / "model.pt", model.state_dict(), meta)
    return out


def test_unreadable_checkpoint(run_dir, capsys):
    (run_dir / "stage1" / "model.pt").write_bytes(b"not a checkpoint at all")
    before = tree_digest(run_dir)
    fails_cleanly(capsys, ["explain", "--out", str(run_dir), "--quiet"], "cannot read checkpoint")
    assert tree_digest(run_dir) == before


def test_mismatched_checkpoint(run_dir, tmp_path, capsys):
    other = tmp_path / "cifar100-model.pt"
    save_checkpoint(other, create_backbone("lenet5", 100).state_dict(),
                    {"kind": "stage1", "model": "lenet5", "num_classes": 100})
    before = tree_digest(run_dir)
    fails_cleanly(capsys, ["explain", "--out", str(run_dir), "--checkpoint", str(other)],
                  "num_classes=100")
    fails_cleanly(capsys, ["stage2", "--out", str(run_dir), "--checkpoint", str(other)],
                  "num_classes=100")
    assert tree_digest(run_dir) == before


def test_map_store_of_another_checkpoint(run_dir, tmp_path, capsys):
    store_path = tmp_path / "foreign-maps"
    MapStore.create_or_open(store_path, meta={"checkpoint_hash": "f" * 64, "masker": "blur(8,8)",
                                              "data_fingerprint": "0" * 64,
                                              "max_evals": 40, "batch_size": 100},
                            num_maps=1437, map_shape=(32, 32, 3))
    before = tree_digest(run_dir), tree_digest(store_path)
    fails_cleanly(capsys, ["stage2", "--out", str(run_dir), "--maps", str(store_path)],
                  str(store_path), "ffffffffffff")
    assert (tree_digest(run_dir), tree_digest(store_path)) == before


def test_run_into_directory_holding_another_run(run_dir, capsys):
    before = tree_digest(run_dir)
    fails_cleanly(capsys, ["run", "--out", str(run_dir), *TINY, "--lr", "0.005"], "lr=")
    assert tree_digest(run_dir) == before


def test_subcommand_without_run_dir(tmp_path, capsys):
    fails_cleanly(capsys, ["stage2", "--out", str(tmp_path / "nowhere")], "config.json")


def test_module_entry_point_reports_one_line():
    proc = subprocess.run([sys.executable, "-m", "impactx_ray", "run", "--epochs", "-3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["impactx: error: --epochs must be an integer "
                                                ">= 1, got -3"]


@pytest.mark.slow
def test_run_end_to_end_then_redo_steps(tmp_path, capsys):
    out = tmp_path / "e2e"
    argv = ["run", "--out", str(out), *TINY, "--epochs", "2", "--lr", "0.003"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "baseline (A) test accuracy" in printed and "IMPACTX test accuracy" in printed
    result = json.loads((out / "result.json").read_text())
    for key in ("baseline_test_accuracy", "impactx_test_accuracy"):
        assert 0.0 <= result[key] <= 1.0
    assert result["hyperparameters"]["lr"] == 0.003
    stores = list((out / "maps").iterdir())
    assert len(stores) == 1 and MapStore(stores[0]).is_complete()

    # A rerun reuses everything: the checkpoints are not rewritten.
    s1, s2 = file_sha256(out / "stage1" / "model.pt"), file_sha256(out / "stage2" / "model.pt")
    assert main(argv) == 0
    assert file_sha256(out / "stage1" / "model.pt") == s1
    assert file_sha256(out / "stage2" / "model.pt") == s2

    # Redoing stage 2 with another λ keeps the previous checkpoint beside the new one.
    assert main(["stage2", "--out", str(out), "--lambda", "1.2", "--quiet"]) == 0
    assert (out / "stage2" / f"model.{s2[:12]}.pt").exists()
    assert json.loads((out / "config.json").read_text())["lam"] == 1.2
    assert main(["evaluate", "--out", str(out)]) == 0
    assert json.loads((out / "result.json").read_text())["hyperparameters"]["lam"] == 1.2
    # every evaluation is in the run's record, as a sweep's cell is in MLflow, the latest last
    entries = [json.loads(line) for line in (out / "record.jsonl").read_text().splitlines()]
    assert [e["what"] for e in entries[-4:]] == ["start", "params", "metrics", "finish"]
    assert entries[-3]["params"]["lam"] == "1.2"
    assert entries[-2]["metrics"]["impactx_test_accuracy"] == json.loads(
        (out / "result.json").read_text())["impactx_test_accuracy"]
    state = torch.load(out / "stage2" / "model.pt", weights_only=True)
    assert state["meta"]["config"]["lam"] == 1.2


@pytest.mark.slow
def test_explain_on_ray_workers_equals_single_process(tmp_path, capsys):
    import shutil

    from impactx_ray.explain import load_maps

    one = tmp_path / "one"
    assert main(["run", "--out", str(one), *TINY, "--max-evals", "24"]) == 0
    two = tmp_path / "two"
    two.mkdir()
    shutil.copy(one / "config.json", two / "config.json")
    shutil.copytree(one / "stage1", two / "stage1")
    try:
        assert main(["explain", "--out", str(two), "--workers", "2", "--quiet"]) == 0
    finally:
        import ray

        ray.shutdown()
    assert np.array_equal(load_maps(two), load_maps(one))
    assert main(["stage2", "--out", str(two), "--quiet"]) == 0
