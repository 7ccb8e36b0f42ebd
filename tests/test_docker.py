"""docker/: Docker cannot run here, so the Dockerfile is linted and the YAML validated."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def test_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint not installed: pip install -e '.[test]'")
    proc = subprocess.run([exe, str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_uses_pinned_ray_gpu_image_and_non_root_user():
    import ray

    text = (DOCKER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in text
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")


def test_rayjob_manifest_runs_the_full_grid():
    job = yaml.safe_load((DOCKER / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("python sweeps/full_grid.py")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_compose_has_head_worker_and_mlflow():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"ray-head", "ray-worker", "mlflow"} <= set(services)
    assert "--head" in services["ray-head"]["command"]
    assert "ray-head:6379" in services["ray-worker"]["command"]
    for name in ("ray-head", "ray-worker"):
        assert services[name]["environment"]["MLFLOW_TRACKING_URI"].startswith("http://mlflow:")
