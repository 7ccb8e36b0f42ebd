"""benchmarks/gpu_check.sh, the prepared GPU check, tested without a GPU: its dry run on the CPU
runs every command line of the GPU run with tiny sizes (so a typo fails here, not on the GPU
machine), and its prerequisite check fails on one line naming what is missing."""

import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
CASES = {"lenet5-32", "lenet5-96", "mobilenet", "efficientnet_b2"}
STEPS = ("prereqs", "run", "parity", "map-table", "smi")

# A stand-in nvidia-smi: its arguments to a file, the CSV header, then a sample every 0.2 s until killed.
FAKE_SMI = """#!/usr/bin/env bash
echo "$*" >"$FAKE_SMI_ARGS"
echo "timestamp, utilization.gpu [%], memory.used [MiB]"
i=0
while true; do echo "2026/11/30 12:00:00.000, $((i * 7 % 100)) %, $((1000 + i)) MiB"; i=$((i + 1)); sleep 0.2; done
"""


def gpu_check(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def summary_steps(out: Path) -> dict[str, str]:
    """{step: status} from summary.txt's step lines (the map-table digest follows a blank line)."""
    text = (out / "summary.txt").read_text().split("\n\n")[0]
    return {line.split()[0]: line.split()[1] for line in text.splitlines()}


def digest_module():
    spec = importlib.util.spec_from_file_location("gpu_digest", ROOT / "benchmarks" / "gpu_digest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_runs_every_step_on_the_cpu(tmp_path):
    """103 s on the idle 2-core CPU, 219 s under a load of 3. Every step ok, the map table has every
    case eager and compiled in fp32 and bf16, nvidia-smi (a stand-in) was sampled with the real
    flags, and what the device tool brings back (at most 8 files, plain names) holds everything."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(FAKE_SMI)
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    proc = gpu_check("--device", "cpu", "--dry-run", "--out", str(out),
                     env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SMI_ARGS": str(tmp_path / "smi_args")})
    assert proc.returncode == 0, proc.stdout + proc.stderr + (out / "gpu_check.log").read_text()[-3000:]
    assert summary_steps(out) == dict.fromkeys(STEPS, "ok")

    rows = [json.loads(line) for line in (out / "map_table_cpu.jsonl").read_text().splitlines()]
    ran = {(r["case"], r["row"], r.get("precision")) for r in rows if "maps_per_s" in r}
    for case in CASES:
        assert (case, "shap", "fp32") in ran
        for precision in ("fp32", "bf16"):
            assert {(case, "engine eager", precision), (case, "engine compiled", precision)} <= ran, case
    assert rows[-1]["row"] == "done" and not [r for r in rows if r.get("status") == "not run"]

    assert (tmp_path / "smi_args").read_text().split() == [
        "--query-gpu=timestamp,utilization.gpu,memory.used", "--format=csv", "-lms", "500"]
    assert json.loads((out / "run_result.json").read_text())["device"] == "cpu"
    assert "rows" in json.loads((out / "shap_engine_cpu.json").read_text())
    files = list(out.iterdir())
    assert len(files) <= 8 and all(f.is_file() and re.fullmatch(r"[A-Za-z0-9._-]+", f.name) for f in files)


@pytest.mark.parametrize("module", ["no_such_module_for_gpu_check", "ray"])
def test_missing_module_fails_first_on_one_line(tmp_path, module):
    """A module the steps need and cannot import stops the check before any long step, on one line
    naming it. In a dry run Ray is one: a stand-in refuses it, as the GPU machine lacks it."""
    out, no_wheels = tmp_path / "out", tmp_path / "no_wheels"
    no_wheels.mkdir()
    proc = gpu_check("--device", "cpu", "--dry-run", "--out", str(out), "--wheels", str(no_wheels),
                     env={"GPU_CHECK_REQUIRE": module}, timeout=120)
    assert proc.returncode == 3
    assert len(proc.stderr.splitlines()) == 1 and module in proc.stderr, proc.stderr
    assert proc.stderr.startswith("gpu_check: missing Python modules:")
    assert summary_steps(out) == {"prereqs": "failed"}
    assert not (out / "map_table_cpu.jsonl").exists()


def test_missing_module_is_installed_from_the_carried_wheels(tmp_path):
    """As on the GPU machine: a missing module whose wheel is in --wheels is installed to a
    temporary site folder, and the check goes on (--only-prereqs stops it there)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    info = "gpucheck_probe-0.1.dist-info"
    with zipfile.ZipFile(wheels / "gpucheck_probe-0.1-py3-none-any.whl", "w") as whl:
        whl.writestr("gpucheck_probe.py", "VALUE = 1\n")
        whl.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpucheck-probe\nVersion: 0.1\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", f"gpucheck_probe.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    out = tmp_path / "out"
    proc = gpu_check("--device", "cpu", "--only-prereqs", "--out", str(out), "--wheels", str(wheels),
                     env={"GPU_CHECK_REQUIRE": "gpucheck_probe"}, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary_steps(out) == {"prereqs": "ok"}
    assert "installing 1 wheels" in (out / "gpu_check.log").read_text()


def test_missing_python_and_nvidia_smi_fail_on_one_line(tmp_path):
    proc = gpu_check("--device", "cpu", "--out", str(tmp_path), "--python", str(tmp_path / "no-python"))
    assert proc.returncode == 3 and proc.stderr == f"gpu_check: no python: {tmp_path / 'no-python'}\n"
    if not any((Path(d) / "nvidia-smi").exists() for d in os.environ["PATH"].split(os.pathsep)):
        proc = gpu_check("--device", "cuda", "--out", str(tmp_path))
        assert proc.returncode == 3 and proc.stderr == "gpu_check: --device cuda but nvidia-smi is not on PATH\n"


def test_bad_arguments_are_refused(tmp_path):
    assert gpu_check("--out", str(tmp_path), "--devise", "cpu").returncode == 2
    assert gpu_check("--device", "cpu").returncode == 2  # --out is required
    assert gpu_check("--out", str(tmp_path), "--device", "tpu").returncode == 2


def test_digests_read_each_steps_output(tmp_path):
    d = digest_module()
    printout = tmp_path / "parity.out"
    printout.write_text("lenet5, 32x32 digits\nmax |batched - shap| / max |shap|: eager 2.1e-06, compiled 3.5e-02\n")
    ok, line = d.parity(str(printout), 1e-5)
    assert ok and "eager 2.1e-06, compiled 3.5e-02" in line
    assert not d.parity(str(printout), 1e-6)[0]
    printout.write_text("Traceback ...\n")
    assert not d.parity(str(printout), 1e-5)[0]
    printout.write_text("max |batched - shap| / max |shap|: eager 6.8e-03, compiled 4.5e-06\n"
                        "images within 1e-05 of shap's map scale: eager 14/16, compiled 16/16\n")
    assert not d.parity(str(printout), 1e-5)[0]  # all images by default
    ok, line = d.parity(str(printout), 1e-5, min_share=0.75)  # CUDA's bar: 12 of 16
    assert ok and "eager 14/16 images within 1e-05" in line
    assert not d.parity(str(printout), 1e-5, min_share=0.9)[0]

    csv = tmp_path / "smi.csv"  # nvidia-smi's own format: a header, then "value unit" fields
    csv.write_text("timestamp, utilization.gpu [%], memory.used [MiB]\n"
                   "2026/11/30 12:00:00.000, 0 %, 500 MiB\n2026/11/30 12:00:00.500, 90 %, 20480 MiB\n")
    ok, line = d.smi(str(csv))
    assert ok and "2 samples" in line and "mean 45%" in line and "max 90%" in line and "20480 MiB" in line
    csv.write_text("timestamp, utilization.gpu [%], memory.used [MiB]\n")
    assert not d.smi(str(csv))[0]

    jsonl = tmp_path / "rows.jsonl"
    rows = [{"case": "lenet5-32", "row": "engine eager", "precision": "fp32", "maps_per_s": 100.0,
             "vs_shap_maps": 1e-6}, {"case": "mobilenet", "row": "engine eager", "status": "not run"},
            {"row": "done", "seconds": 12.0}]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ok, lines = d.table(str(jsonl), ["lenet5-32"])
    assert ok and lines[-1] == "1 rows timed, 1 not run (budget), map_table.py done in 12 s"
    ok, lines = d.table(str(jsonl), ["lenet5-32", "mobilenet"])
    assert not ok and lines[-1].endswith("no timed engine row for mobilenet")

    result = tmp_path / "result.json"
    result.write_text(json.dumps({"device": "cuda", "baseline_test_accuracy": 0.9, "impactx_test_accuracy": 0.95,
                                  "timings_s": {"maps_computed": 1437, "maps_per_s": 400.0}}))
    assert d.run(str(result), "cuda") == (True, "device cuda, baseline 0.9000, impactx 0.9500, "
                                          "1437 maps at 400.0 maps/s")
    assert not d.run(str(result), "cpu")[0]
