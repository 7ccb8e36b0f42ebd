"""Run directories and inputs that can't be corrupted (issue 13): the lock, checks before anything
is written, bad image files, checkpoints that disagree with the config, tampered manifests, and
the warnings for a collapsed stage 1. Every bad input: exit 2, one line, no traceback, and the
run directory byte-identical afterwards.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import TINY, fails_cleanly, tree_digest

from impactx_ray.cli import main
from impactx_ray.config import RunConfig
from impactx_ray.errors import UserError
from impactx_ray.explain import ExplainSettings
from impactx_ray.io import file_sha256
from impactx_ray.lock import LOCK_NAME, DirLock
from impactx_ray.methods import BASELINE, METHODS, ModelSpec, checkpoint_meta
from impactx_ray.train.checkpoint import save_checkpoint

from fixtures_data import write_imagefolder

ROOT = Path(__file__).resolve().parents[1]

CFG = RunConfig(model="lenet5", dataset="digits", epochs=1, max_evals=40)
DONE = {"val_accuracy": 0.1, "best_epoch": 1, "seconds": 0.0}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, digits):
    """A finished run directory (untrained models, all-zero maps: made in a second, not trained),
    evaluated once so that it has its result.json."""
    out = tmp_path_factory.mktemp("finished") / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(CFG.to_dict()))
    train, _ = digits
    torch.manual_seed(0)
    spec = ModelSpec.of(CFG, train)
    stage1 = out / "stage1" / "model.pt"
    save_checkpoint(stage1, spec.backbone().state_dict(),
                    {**checkpoint_meta(BASELINE, CFG, train), **DONE})
    impactx = METHODS["impactx"]
    meta = {**checkpoint_meta(impactx, CFG, train, stage1_hash=file_sha256(stage1)), **DONE}
    save_checkpoint(out / "stage2" / "model.pt", impactx.build(spec, meta).state_dict(), meta)
    store = ExplainSettings.from_config(CFG).open_store(out / "maps", file_sha256(stage1), train)
    for i in range(store.num_shards):
        a, b = store.shard_range(i)
        store.write_shard(i, np.zeros((b - a, 32, 32, 3), dtype=np.float32))
    assert main(["evaluate", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture
def run_dir(finished, tmp_path):
    """A private copy of the finished run directory."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# -- 1. the lock -----------------------------------------------------------------------------------
def hold_lock_in_another_process(directory: Path) -> subprocess.Popen:
    code = ("import sys, time; from impactx_ray.lock import DirLock; "
            "DirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(
        run_dir, capsys):
    holder = hold_lock_in_another_process(run_dir)
    try:
        before = tree_digest(run_dir)
        for argv in (["run", "--out", str(run_dir), *TINY], ["stage2", "--out", str(run_dir)],
                     ["evaluate", "--out", str(run_dir)]):
            err = fails_cleanly(capsys, argv, f"run directory {run_dir} is in use by pid "
                                f"{holder.pid} on ", "wait for it to finish")
            assert "`-c " in err  # the holder's command line
        assert tree_digest(run_dir) == before
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the kernel drops the flock
        holder.wait()
    assert (run_dir / LOCK_NAME).exists()  # a stale lock file with the dead holder's record
    assert main(["evaluate", "--out", str(run_dir), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"taking over the lock on {run_dir} left by pid {holder.pid}" in err
    assert not (run_dir / LOCK_NAME).exists()  # released: the directory holds no lock file


def test_lock_is_exclusive_within_a_process_and_leaves_no_trace(tmp_path):
    target = tmp_path / "d"
    with DirLock(target, create=True):
        assert (target / LOCK_NAME).exists()
        with pytest.raises(UserError, match=f"is in use by pid {os.getpid()}"):
            DirLock(target).acquire()
    assert not target.exists()  # created for the lock, still empty: removed again


def test_a_second_sweep_on_one_out_is_refused(tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    holder = hold_lock_in_another_process(out)
    script = Path(__file__).resolve().parents[1] / "sweeps" / "full_grid.py"
    try:
        proc = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out),
                               "--restart"], capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"full_grid.py: error: sweep directory {out} is in use by pid "
                           f"{holder.pid} on ") and "wait for it to finish" in line
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # --restart moved nothing


@pytest.mark.slow
def test_two_concurrent_runs_on_one_out(tmp_path):
    """Two `impactx run` on one --out at once, as the issue ran them: one finishes, the other is
    refused on one line and changes nothing of the first."""
    out = tmp_path / "both"
    root = write_imagefolder(tmp_path / "imgs", classes=("a", "b"), n_per_class=6, size=(32, 32))
    del root
    argv = [sys.executable, "-m", "impactx_ray", "run", "--out", str(out), "--dataset",
            f"imagefolder:{tmp_path / 'imgs'}", "--epochs", "2", "--max-evals", "40", "--quiet"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, _, err in results if code == 2)
    assert refused.strip().startswith(f"impactx: error: run directory {out} is in use by pid ")
    assert len(refused.strip().splitlines()) == 1 and "Traceback" not in refused
    result = json.loads((out / "result.json").read_text())
    assert {"baseline_test_accuracy", "impactx_test_accuracy"} <= set(result)
    assert not (out / LOCK_NAME).exists()


# -- 2. every input checked before anything is written ---------------------------------------------
@pytest.mark.parametrize("extra, needle", [
    (["--seed", "-1"], "--seed must be an integer in [0, 4294967295], got -1"),
    (["--seed", "1e23"], "invalid int value: '1e23'"),
    (["--masker", "blur(0,0)"], "'blur(0,0)'"),
    (["--max-evals", "1000000000"], "--max-evals 1000000000 needs 2,861.0 GiB"),
    (["--model", "mobilenet", "--weights", "WEIGHTS"], "WEIGHTS"),
])
def test_bad_input_fails_before_the_run_directory_exists(tmp_path, capsys, extra, needle):
    weights = tmp_path / "weights.pth"
    weights.write_text("not a state dict")
    extra = [str(weights) if e == "WEIGHTS" else e for e in extra]
    out = tmp_path / "run"
    fails_cleanly(capsys, ["run", "--out", str(out), *TINY, *extra],
                  needle.replace("WEIGHTS", str(weights)))
    assert not out.exists()


@pytest.mark.parametrize("argv, needle", [
    (["stage1", "--seed", "-1"], "--seed"),
    (["stage1", "--weights", "WEIGHTS"], "cannot read lenet5 weights from"),
    (["explain", "--masker", "blur(0,0)"], "blur(0,0)"),
    (["explain", "--max-evals", "1000000000"], "use at most 174761"),
    (["stage1", "--lr", "1e30"], "baseline (A) diverged with --lr 1e+30: loss became nan"),
    (["evaluate", "--lambda", "1.4"], "stage2/model.pt was trained with lam=0.6, not lam=1.4"),
    (["stage2", "--epochs", "3"], "stage1/model.pt was trained with epochs=1, not epochs=3"),
    (["explain", "--seed", "5"], "stage1/model.pt was trained with seed=0, not seed=5"),
    (["run", "--epochs", "2"], "was trained with epochs=1, not epochs=2"),
])
def test_bad_input_on_a_finished_run_changes_nothing(run_dir, tmp_path, capsys, argv, needle):
    weights = tmp_path / "weights.pth"
    weights.write_text("not a state dict")
    argv = [str(weights) if a == "WEIGHTS" else a for a in argv]
    before = tree_digest(run_dir)
    fails_cleanly(capsys, [argv[0], "--out", str(run_dir), "--quiet", *argv[1:]], needle)
    assert tree_digest(run_dir) == before


def test_maps_made_with_other_settings_are_refused(run_dir, capsys):
    (store,) = (run_dir / "maps").iterdir()
    before = tree_digest(run_dir)
    fails_cleanly(capsys, ["stage2", "--out", str(run_dir), "--maps", str(store), "--max-evals",
                           "60"], f"map store {store} was made with max_evals=40, but this "
                  "run's settings say max_evals=60")
    assert tree_digest(run_dir) == before


def test_a_failed_run_does_not_block_the_corrected_rerun(tmp_path, capsys):
    write_imagefolder(tmp_path / "imgs", classes=("a", "b"), n_per_class=6, size=(32, 32))
    out = tmp_path / "run"
    argv = ["run", "--out", str(out), *TINY, "--dataset", f"imagefolder:{tmp_path / 'imgs'}"]
    fails_cleanly(capsys, [*argv, "--lr", "1e30", "--batch-size", "2"],
                  "baseline (A) diverged with --lr 1e+30")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert main([*argv, "--lr", "0.001", "--batch-size", "2"]) == 0
    assert json.loads((out / "config.json").read_text())["lr"] == 0.001


def test_result_json_records_what_the_models_were_trained_with(finished):
    result = json.loads((finished / "result.json").read_text())
    assert result["trained_with"]["baseline"] == CFG.subset(BASELINE.settings)
    assert result["trained_with"]["impactx"]["lam"] == 0.6


# -- 5. directories and files that are not what they should be -------------------------------------
def test_out_pointing_at_a_file(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("mine")
    for cmd in ("run", "evaluate"):
        fails_cleanly(capsys, [cmd, "--out", str(target), *TINY], f"--out {target} is a file")
    assert target.read_text() == "mine"


def test_out_in_a_read_only_directory(run_dir, tmp_path, capsys):
    if os.geteuid() == 0:  # root writes through permission bits: make it immutable instead
        make_ro = subprocess.run(["chattr", "+i", str(run_dir)], capture_output=True)
        if make_ro.returncode != 0:
            pytest.skip("no way to make a directory read-only for root here (chattr)")
        undo = ["chattr", "-i", str(run_dir)]
    else:
        run_dir.chmod(0o555)
        undo = ["chmod", "755", str(run_dir)]
    try:
        before = tree_digest(run_dir)
        fails_cleanly(capsys, ["evaluate", "--out", str(run_dir)], f"cannot write in --out {run_dir}")
        fails_cleanly(capsys, ["run", "--out", str(run_dir / "new"), *TINY],
                      f"cannot create --out {run_dir / 'new'}")
        assert tree_digest(run_dir) == before
    finally:
        subprocess.run(undo, check=True)


@pytest.mark.parametrize("content, needle", [
    ("[]", "must be a JSON object, got list"),
    ("null", "must be a JSON object, got NoneType"),
    ('{"device": 5}', "config value device=5 must be a string"),
    ('{"epochs": "3"}', "--epochs must be an integer >= 1, got '3'"),
    ('{"pretrained": "yes"}', "pretrained='yes' must be true or false"),
    ("{not json", "cannot read"),
])
def test_a_broken_config_json(run_dir, capsys, content, needle):
    (run_dir / "config.json").write_text(content)
    before = tree_digest(run_dir)
    err = fails_cleanly(capsys, ["evaluate", "--out", str(run_dir)], needle)
    assert "config.json" in err
    assert tree_digest(run_dir) == before


def _manifest(run_dir: Path) -> Path:
    (path,) = (run_dir / "maps").glob("*/manifest.json")
    return path


def test_a_manifest_without_meta(run_dir, capsys):
    manifest = json.loads(_manifest(run_dir).read_text())
    del manifest["meta"]
    _manifest(run_dir).write_text(json.dumps(manifest))
    before = tree_digest(run_dir)
    fails_cleanly(capsys, ["stage2", "--out", str(run_dir)], "is damaged: no meta object")
    assert tree_digest(run_dir) == before


@pytest.mark.parametrize("name", ["../../x.npy", "/tmp/x.npy", "sub/shard.npy", ".hidden.npy"])
def test_a_tampered_manifest_cannot_reach_outside_the_store(run_dir, tmp_path, capsys, name):
    outside = tmp_path / "x.npy"
    outside.write_bytes(b"precious")
    manifest = json.loads(_manifest(run_dir).read_text())
    manifest["shards"][0]["file"] = name
    _manifest(run_dir).write_text(json.dumps(manifest))
    before = tree_digest(run_dir)
    for cmd in ("stage2", "explain"):  # reading it, and (re)writing its shards
        fails_cleanly(capsys, [cmd, "--out", str(run_dir), "--quiet"],
                      f"shard 0 file {name!r} is not a file name inside the store")
    assert tree_digest(run_dir) == before and outside.read_bytes() == b"precious"


# -- 6. a stage 1 at chance level and constant maps are reported --------------------------------------
def test_a_collapsed_stage1_and_constant_maps_are_warned_about(finished):
    result = json.loads((finished / "result.json").read_text())
    chance, zero = result["warnings"]
    assert chance.startswith(f"baseline (A) ({finished / 'stage1' / 'model.pt'}) is at chance "
                             "level: validation accuracy 0.1000")
    assert zero.startswith("1437 of 1437 SHAP maps are constant (1437 all zero)")


def test_the_eval_budget_bound_is_the_map_engine_s(monkeypatch):
    from impactx_ray.checks import check_eval_budget
    from impactx_ray.defaults import MASK_BYTES
    from impactx_ray.explain.batched import BatchedPartition, mask_budget

    # the images in lockstep: the CPU cap on a CPU, a quarter of a GPU's free memory (never less)
    def engine(device):
        return BatchedPartition(lambda x: x, (32, 32, 3), masker="blur(8,8)", max_evals=2000, batch_size=100,
                                device=device)

    # a CPU keeps lineages (2 int64 a row), queues (2 slots of 64 bytes a row), values, the images
    per_image = 2001 * 16 + 2001 * 128 + (2 * 3072 - 1) * 8 + 2 * 3072 * 4
    assert mask_budget(torch.device("cpu")) == MASK_BYTES and engine("cpu").bytes_per_image() == per_image
    assert engine("cpu").images_in_flight == MASK_BYTES // per_image == 1483
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (78 << 30, 80 << 30))
    assert mask_budget(torch.device("cuda")) == (78 << 30) // 4
    assert engine("cuda").images_in_flight == (78 << 30) // 4 // (2001 * 32 * 32 * 3) == 3406  # the GPU's arena
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 30, 80 << 30))
    assert mask_budget(torch.device("cuda")) == MASK_BYTES  # a nearly full GPU: the floor
    check_eval_budget(174761, (32, 32, 3))  # the most that fits
    with pytest.raises(UserError, match="use at most 174761"):
        check_eval_budget(174762, (32, 32, 3))


def test_chance_and_constant_map_checks():
    from impactx_ray.checks import chance_warning, constant_map_counts, constant_maps_warning

    assert chance_warning(0.0, np.zeros(19, dtype=int)) is None  # too few to tell
    y = np.array([0] * 60 + [1] * 40)
    assert chance_warning(0.6, y) is not None      # always answering class 0
    assert chance_warning(0.69, y) is not None     # within two standard deviations (0.098)
    assert chance_warning(0.75, y) is None
    maps = np.random.default_rng(0).normal(size=(5, 4, 4, 3)).astype(np.float32)
    maps[1] = 0.0
    maps[3] = 2.5
    assert constant_map_counts(maps) == (2, 1)
    assert constant_maps_warning([(0, 0)], 5) is None
    assert constant_maps_warning([(2, 1)], 5).startswith("2 of 5 SHAP maps are constant (1 all")
