"""Sweep identity and resume safety: a name per sweep, resume only with the same settings,
--restart keeps the old results aside."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from impactx_ray.errors import UserError
from impactx_ray.sweep.identity import RECORD, claim, default_name

SCRIPT = Path(__file__).resolve().parents[1] / "sweeps" / "full_grid.py"
SETTINGS = {"cells": ["lenet5-digits"], "epochs": 3, "max_evals": 100, "smoke": True}


def quiet(_msg):
    pass


def test_a_new_sweep_records_its_identity(tmp_path):
    out = tmp_path / "smoke"
    sweep = claim(out, SETTINGS, log=quiet)
    assert sweep.name == default_name(out) and sweep.name.startswith("smoke-")
    assert sweep.experiment == f"impactx/{sweep.name}" and len(sweep.id) == 8
    assert sweep.key("lenet5-digits/stage1") == f"{sweep.id}/lenet5-digits/stage1"
    record = json.loads((out / RECORD).read_text())
    assert record["settings"] == SETTINGS and record["id"] == sweep.id
    assert claim(out, SETTINGS, log=quiet) == sweep  # a rerun resumes the same sweep


def test_two_outs_with_one_folder_name_are_two_sweeps(tmp_path):
    a, b = claim(tmp_path / "x" / "smoke", SETTINGS, log=quiet), claim(tmp_path / "y" / "smoke",
                                                                        SETTINGS, log=quiet)
    assert a.name != b.name and a.experiment != b.experiment and a.id != b.id


def test_other_settings_are_refused_on_one_line_and_change_nothing(tmp_path):
    out = tmp_path / "smoke"
    claim(out, SETTINGS, log=quiet)
    (out / "tune").mkdir()
    before = sorted(p.name for p in out.iterdir()), (out / RECORD).read_bytes()
    with pytest.raises(UserError, match=r"started with epochs=3 \(asked: 5\).*--restart") as e:
        claim(out, {**SETTINGS, "epochs": 5}, log=quiet)
    assert "\n" not in str(e.value)
    assert (sorted(p.name for p in out.iterdir()), (out / RECORD).read_bytes()) == before
    with pytest.raises(UserError, match="holds sweep 'smoke-.*not 'other'"):
        claim(out, SETTINGS, name="other", log=quiet)


def test_restart_keeps_the_old_results_aside(tmp_path):
    out = tmp_path / "smoke"
    first = claim(out, SETTINGS, log=quiet)
    (out / "tune").mkdir()
    (out / "summary.md").write_text("old")
    (out / "mlflow.db").write_text("runs of every generation")
    second = claim(out, {**SETTINGS, "epochs": 5}, restart=True, log=quiet)
    assert second.name == first.name and second.id != first.id  # a new run tree, same experiment
    (aside,) = (out / "previous").iterdir()
    assert (aside / "summary.md").read_text() == "old" and (aside / "tune").is_dir()
    assert json.loads((aside / RECORD).read_text())["settings"]["epochs"] == 3
    assert (out / "mlflow.db").read_text() == "runs of every generation"  # kept in place
    assert json.loads((out / RECORD).read_text())["settings"]["epochs"] == 5


def test_a_sweep_directory_from_before_identities_resumes_into_its_experiment(tmp_path):
    out = tmp_path / "old"
    (out / "tune").mkdir(parents=True)
    sweep = claim(out, SETTINGS, log=quiet)
    assert (sweep.id, sweep.experiment) == ("", "impactx")
    assert sweep.key("sweep") == "sweep"  # the old keys, so its runs are found again


def test_full_grid_refuses_a_rerun_with_other_settings(tmp_path):
    out = tmp_path / "smoke"
    claim(out, {"stale": True}, log=quiet)
    before = (out / RECORD).read_bytes()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--epochs", "5", "--out",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"full_grid.py: error: {out} holds a sweep started with ")
    assert "epochs=None (asked: 5)" in line and "--restart" in line
    assert (out / RECORD).read_bytes() == before and sorted(p.name for p in out.iterdir()) == [RECORD]

