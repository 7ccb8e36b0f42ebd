"""docker/: no Docker daemon, kubectl cluster or cloud here, so everything is checked statically: the
Dockerfile is linted; compose.yaml is validated against the compose spec, the RayJob against
KubeRay's CRD schema (both vendored in tests/schemas/, see its README), the other Kubernetes
manifests against Kubernetes' own schemas (kubernetes-validate, offline, strict), cluster.yaml
against the schema Ray ships and Ray's own config check; the two Python helpers are run."""

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
IMAGE = "impactx-ray:latest"  # the one name the Makefile's render targets replace
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())  # oldest supported, newest known
MIN_DRIVER = {12: 525, 13: 580}  # CUDA major -> minimum Linux driver (NVIDIA's compatibility table)


def _load(name):
    return list(yaml.safe_load_all((DOCKER / name).read_text()))


def _kind(name, kind):
    return next(d for d in _load(name) if d["kind"] == kind)


def _full_grid():
    spec = importlib.util.spec_from_file_location("full_grid", ROOT / "sweeps" / "full_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pod_templates():
    """(where, pod template) of every pod the manifests make, the RayJob's included."""
    found = []
    for path in sorted(DOCKER.glob("*.k8s.yaml")):
        for d in _load(path.name):
            if "template" in d.get("spec", {}):
                found.append((f"{path.name}:{d['kind']}", d["spec"]["template"]))
    job = _kind("rayjob.yaml", "RayJob")["spec"]
    found.append(("rayjob.yaml:submitter", job["submitterPodTemplate"]))
    found.append(("rayjob.yaml:head", job["rayClusterSpec"]["headGroupSpec"]["template"]))
    found += [(f"rayjob.yaml:{w['groupName']}", w["template"]) for w in job["rayClusterSpec"]["workerGroupSpecs"]]
    return found


def test_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint not installed: pip install -e '.[test]'")
    proc = subprocess.run([exe, str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_layers_pins_user_and_gpu_driver():
    import ray
    import torch

    text = (DOCKER / "Dockerfile").read_text()
    # the Ray image of the pinned Ray version, without CUDA: torch's wheels bring CUDA once
    assert f"FROM rayproject/ray:{ray.__version__}-py311\n" in text
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1] == "1000"  # the uid every pod's runAsUser names
    # dependencies (every install constrained by the shared pins) before the code
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs and all("-c docker/constraints.txt" in line for line in installs)
    assert text.index("-r /tmp/requirements.txt") < text.index("COPY --chown=1000:100 impactx_ray")
    assert "chown 1000:100 /shared" in text  # the named volume starts writable by uid 1000
    assert "COPY --chown=1000:100 docker/mlflow_server.py docker/preload.py ./docker/" in text
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "data", "runs", "docker/secrets"} <= set(ignored)
    # the driver the GPU nodes need is the one the CUDA runtime the image installs needs
    pins = (DOCKER / "constraints.txt").read_text()
    cuda = ".".join(re.search(r"^nvidia-cuda-runtime==(\d+)\.(\d+)\.", pins, re.M).groups())
    assert torch.version.cuda in (None, cuda)  # this environment's torch (None: a CPU-only build)
    assert f"CUDA {cuda}" in text and f">= {MIN_DRIVER[int(cuda.split('.')[0])]}" in text
    assert "NVIDIA_VISIBLE_DEVICES=" not in text  # no container sees GPUs it was not given


def test_constraints_pin_every_installed_package():
    """The image and CI install from one pin file, and it pins what this environment runs."""
    from importlib.metadata import version

    pins = dict(line.split("==") for line in (DOCKER / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    for name in ("torch", "ray", "mlflow", "timm", "shap", "optuna", "psycopg", "pytest", "kubernetes-validate"):
        assert pins[name] == version(name), name
    assert "-c $(PINS)" in (ROOT / "Makefile").read_text()


def test_no_placeholders_and_one_image_name():
    for path in DOCKER.rglob("*"):
        if path.is_file() and not {"secrets", "__pycache__"} & set(path.parts):
            assert "example.com" not in path.read_text(errors="replace"), f"{path.name}: a placeholder registry"
    images = {c["image"] for _, t in _pod_templates() for c in t["spec"]["containers"]}
    images |= {s["image"] for s in yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"].values()}
    images.add(yaml.safe_load((DOCKER / "cluster.yaml").read_text())["docker"]["image"])
    assert images == {IMAGE, "postgres:16.6-bookworm"}
    for where, t in _pod_templates():  # a kind-loaded or commit-tagged image is used as it is
        assert all(c["imagePullPolicy"] == "IfNotPresent" for c in t["spec"]["containers"]
                   if c["image"] == IMAGE), where


def test_make_renders_the_image_into_every_manifest(tmp_path):
    make = ["make", "-s", "-C", str(ROOT), f"DEPLOY={tmp_path}", "REGISTRY=reg.test/team", "TAG=v1"]
    subprocess.run([*make, "k8s-manifests"], check=True, capture_output=True)
    rendered = sorted(p.name for p in (tmp_path / "k8s").iterdir())
    assert rendered == sorted([p.name for p in DOCKER.glob("*.k8s.yaml")] + ["rayjob.yaml"])
    proc = subprocess.run([*make, "cluster-config"], capture_output=True, text=True)
    assert proc.returncode == 2 and "AMI=" in proc.stdout  # refused without the AMI and the NFS export
    subprocess.run([*make, "cluster-config", "AMI=ami-0123", "SHARED_NFS=nfs.test:/"], check=True, capture_output=True)
    for path in [*(tmp_path / "k8s").iterdir(), tmp_path / "cluster.yaml"]:
        text = path.read_text()
        assert IMAGE not in text and "@AMI@" not in text and "@SHARED_NFS@" not in text, path.name
        assert "reg.test/team/impactx-ray:v1" in text or path.name in ("storage.k8s.yaml", "postgres.k8s.yaml")
    cluster = yaml.safe_load((tmp_path / "cluster.yaml").read_text())
    assert {t["node_config"]["ImageId"] for t in cluster["available_node_types"].values()} == {"ami-0123"}


def _k8s_validate(doc):
    for v in K8S_VERSIONS:
        kubernetes_validate.validate(doc, v, strict=True)  # strict: unknown fields are errors


def test_k8s_manifests_are_valid_kubernetes():
    for path in sorted(DOCKER.glob("*.k8s.yaml")):
        for doc in _load(path.name):
            _k8s_validate(doc)
    for _, template in _pod_templates():  # the RayJob's pods, as the core type they become
        _k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template})


def test_the_validators_reject_a_bad_manifest():
    """The validation is real: a wrong type and a misspelled field are caught."""
    deployment = _kind("mlflow.k8s.yaml", "Deployment")
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "5000"
    with pytest.raises(kubernetes_validate.ValidationError, match="not of type 'integer'"):
        _k8s_validate(bad)
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["securityContex"] = bad["spec"]["template"]["spec"].pop("securityContext")
    with pytest.raises(kubernetes_validate.ValidationError, match="securityContex"):
        _k8s_validate(bad)
    job = _kind("rayjob.yaml", "RayJob")
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "8"
    schema = json.loads((SCHEMAS / "kuberay-rayjob-v1.schema.json").read_text())
    assert any("is not of type 'integer'" in e.message for e in jsonschema.Draft7Validator(schema).iter_errors(job))


def test_every_pod_runs_as_the_image_user_with_an_fsgroup():
    """A fresh volume is root-owned: without fsGroup the first write of uid 1000 fails."""
    for where, template in _pod_templates():
        ctx = template["spec"].get("securityContext", {})
        assert ctx.get("runAsUser") and ctx.get("fsGroup") and ctx.get("runAsNonRoot") is True, where
        claims = {v["persistentVolumeClaim"]["claimName"] for v in template["spec"].get("volumes", [])
                  if "persistentVolumeClaim" in v}
        if "impactx-shared" in claims or template["spec"]["containers"][0]["image"] == IMAGE:
            assert (ctx["runAsUser"], ctx.get("runAsGroup"), ctx["fsGroup"]) == (1000, 100, 100), where
    pvc = _kind("storage.k8s.yaml", "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == "impactx-shared" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]


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


def test_rayjob_is_valid_for_kuberay_and_consistent():
    import ray

    job = _kind("rayjob.yaml", "RayJob")
    schema = json.loads((SCHEMAS / "kuberay-rayjob-v1.schema.json").read_text())
    _validate(job, schema)
    assert _unknown_fields(job, schema) == []
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert cluster["authOptions"] == {"mode": "token"} and cluster["rayVersion"] == ray.__version__
    # the entrypoint is the GPU preset, and the sweep's own parser takes it
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "sweeps/full_grid.py"] and "--download" not in argv
    args = _full_grid().parse(argv[2:])
    assert str(args.out).startswith("/shared/") and args.data_root.startswith("/shared/")
    workers = cluster["workerGroupSpecs"][0]
    gpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert cluster["enableInTreeAutoscaling"] is True and workers["minReplicas"] == 0
    assert args.gpus_per_trial == 1 and args.map_workers * args.gpus_per_map_worker == workers["maxReplicas"] * gpus
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    assert spec["submitterPodTemplate"]["spec"]["containers"][0]["name"] == "ray-job-submitter"  # KubeRay's
    # offline: weights pre-loaded by the preload Job into the same HF_HOME and data root
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    preload = _kind("preload.k8s.yaml", "Job")["spec"]["template"]["spec"]["containers"][0]
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_HOME"].startswith("/shared/")
    assert {"name": "HF_HOME", "value": env["HF_HOME"]} in preload["env"]
    assert f"--data-root={args.data_root}" in preload["command"]
    # MLflow: the driver's URI is the Service, its Host is allowed, the printed UI is the port-forward
    service = _kind("mlflow.k8s.yaml", "Service")
    host = f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert env["MLFLOW_TRACKING_URI"] == f"http://{host}"
    assert env[_full_grid().UI_ENV_VAR] == f"http://127.0.0.1:{service['spec']['ports'][0]['port']}"
    command = _kind("mlflow.k8s.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]["command"]
    allowed = next(a for a in command if a.startswith("--allowed-hosts=")).split("=", 1)[1]
    assert host in allowed.split(","), "the server would answer the Ray pods 403 Invalid Host"


def test_the_database_password_is_only_in_secret_files():
    deployment = _kind("mlflow.k8s.yaml", "Deployment")["spec"]["template"]["spec"]
    postgres = _kind("postgres.k8s.yaml", "StatefulSet")["spec"]["template"]["spec"]
    for pod, var in ((deployment, "MLFLOW_DB_PASSWORD_FILE"), (postgres, "POSTGRES_PASSWORD_FILE")):
        container = pod["containers"][0]
        assert not any("backend-store-uri" in a or "$(" in a for a in container.get("command", []))
        assert not any("valueFrom" in e for e in container["env"])  # no secret in an env var
        path = next(e["value"] for e in container["env"] if e["name"] == var)
        mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == "mlflow-db" and path.endswith("/password")
    probe = deployment["containers"][0]["readinessProbe"]["httpGet"]
    assert probe["path"] in _mlflow_health_endpoints()  # exempt from the Host check the kubelet would fail


def _mlflow_health_endpoints():
    """mlflow.server.security_utils.HEALTH_ENDPOINTS, read without importing the server (slow)."""
    import ast

    source = Path(importlib.util.find_spec("mlflow").origin).parent / "server" / "security_utils.py"
    tree = ast.parse(source.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "HEALTH_ENDPOINTS")
    return ast.literal_eval(node.value)


def test_mlflow_server_wrapper_passes_the_uri_by_environment(tmp_path):
    from mlflow.cli import server

    option = next(p for p in server.params if p.name == "backend_store_uri")
    assert option.envvar == "MLFLOW_BACKEND_STORE_URI"  # what the wrapper relies on
    fake = tmp_path / "bin" / "mlflow"  # records what `mlflow` was started with
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\nout = open({str(tmp_path / 'got')!r}, 'w')\n"
                    "json.dump([sys.argv[1:], os.environ.get('MLFLOW_BACKEND_STORE_URI')], out)\n")
    fake.chmod(0o755)
    (tmp_path / "pw").write_text("p@ss:w/rd\n")
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_DB_PASSWORD_FILE": str(tmp_path / "pw"), "MLFLOW_DB_HOST": "db:5432"}
    script = str(DOCKER / "mlflow_server.py")
    subprocess.run([sys.executable, script, "--host=0.0.0.0"], env=env, check=True)
    argv, uri = json.loads((tmp_path / "got").read_text())
    assert argv == ["server", "--host=0.0.0.0"] and "p@ss" not in " ".join(argv)
    assert uri == "postgresql+psycopg://mlflow:p%40ss%3Aw%2Frd@db:5432/mlflow"
    for extra, message in (([], "cannot read"), (["--backend-store-uri=x"], "pass no --backend-store-uri")):
        bad = {**env, "MLFLOW_DB_PASSWORD_FILE": str(tmp_path / "missing")}
        proc = subprocess.run([sys.executable, script, *extra], env=bad, capture_output=True, text=True)
        assert proc.returncode != 0 and message in proc.stderr


def _ray_public_paths():
    import inspect

    from ray.dashboard import http_server_agent, http_server_head

    return inspect.getsource(http_server_head), http_server_agent.PUBLIC_EXACT_PATHS


def test_compose_is_valid_healthy_and_keeps_secrets_off_command_lines():
    raw = (DOCKER / "compose.yaml").read_text()
    compose = yaml.safe_load(raw)
    _validate(compose, json.loads((SCHEMAS / "compose-spec.json").read_text()))
    services = compose["services"]
    assert {"ray-head", "ray-worker", "ray-gpu-worker", "mlflow", "postgres"} <= set(services)
    assert "--head" in services["ray-head"]["command"] and "--num-gpus=0" in services["ray-head"]["command"]
    # secrets: files under docker/secrets/ (git- and build-ignored), never interpolated or in env
    assert "${" not in raw and "PASSWORD:" not in raw and "RAY_AUTH_TOKEN:" not in raw
    assert all(s["file"].startswith("./secrets/") for s in compose["secrets"].values())
    if shutil.which("git") and (ROOT / ".git").exists():  # never committed by mistake
        check = ["git", "-C", str(ROOT), "check-ignore", "-q", "docker/secrets/ray_auth_token"]
        assert subprocess.run(check).returncode == 0
    for name, service in services.items():
        env = service.get("environment", {})
        for key, value in env.items():
            if key.endswith("_FILE") or key.endswith("_TOKEN_PATH"):
                secret = value.removeprefix("/run/secrets/")
                assert secret in service["secrets"] and secret in compose["secrets"], (name, key)
        assert service.get("restart") == "unless-stopped", name
        assert service.get("healthcheck"), name
        for dep, cond in service.get("depends_on", {}).items():  # `up --wait` = ready to submit
            assert cond == {"condition": "service_healthy"} and services[dep].get("healthcheck"), (name, dep)
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/")
    mlflow = services["mlflow"]
    assert mlflow["command"][:2] == ["python", "docker/mlflow_server.py"]
    assert not any("backend-store-uri" in a for a in mlflow["command"])
    allowed = next(a for a in mlflow["command"] if a.startswith("--allowed-hosts=")).split("=", 1)[1]
    assert "mlflow:5000" in allowed.split(",") and mlflow["image"] == services["ray-head"]["image"]
    # the healthchecks hit endpoints that answer without the token, and MLflow's Host-exempt one
    head_source, agent_public = _ray_public_paths()
    assert "/health'" in " ".join(mlflow["healthcheck"]["test"]) and "/health" in _mlflow_health_endpoints()
    assert '"/api/gcs_healthz"' in head_source and "/api/local_raylet_healthz" in agent_public
    assert "8265/api/gcs_healthz" in " ".join(services["ray-head"]["healthcheck"]["test"])
    # Ray nodes: token auth from the secret, the UI address the host opens, HF cache on /shared
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published)
    ui_port = next(p for p in mlflow["ports"]).split(":")[1]
    for name in ("ray-head", "ray-worker", "ray-gpu-worker"):
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env[_full_grid().UI_ENV_VAR] == f"http://127.0.0.1:{ui_port}"
        assert env["HF_HOME"].startswith("/shared/") and "shared:/shared" in services[name]["volumes"]
        assert "RAY_ADDRESS" not in env  # ray.init would read it
    gpu = services["ray-gpu-worker"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_cluster_yaml_is_valid_for_rays_cluster_launcher():
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DOCKER / "cluster.yaml").read_text())
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    _validate(config, json.loads(schema_path.read_text()))
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs before any cloud call
    types = config["available_node_types"]
    head, gpu = types[config["head_node_type"]], types["gpu"]
    assert head["resources"]["GPU"] == 0 and "--num-gpus=0" in " ".join(config["head_start_ray_commands"])
    assert gpu["min_workers"] == 0 and gpu["resources"]["GPU"] >= 1
    job = _kind("rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert gpu["max_workers"] * gpu["resources"]["GPU"] == job["maxReplicas"]  # the same 8 GPUs
    assert "--gpus all" in gpu["docker"]["worker_run_options"]
    options = " ".join(config["docker"]["run_options"])
    assert "-e RAY_AUTH_MODE=token" in options and "-e HF_HUB_OFFLINE=1" in options
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert f"-e {_full_grid().UI_ENV_VAR}=http://127.0.0.1:5000" in options
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu"]["resources"]["GPU"] = "1"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def _fake_hub_cache(hf_home, timm_name):
    """The Hugging Face cache layout timm reads offline, holding a (random) state dict."""
    import timm
    from safetensors.torch import save_file

    model = timm.create_model(timm_name, pretrained=False)
    repo = hf_home / "hub" / ("models--" + model.pretrained_cfg["hf_hub_id"].replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file(model.state_dict(), snapshot / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


def test_preload_fills_hf_home_and_the_sweep_then_reads_it_offline(tmp_path):
    from impactx_ray.models.timm_backbones import TIMM_NAMES

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(DOCKER / "preload.py"), "--data-root", str(tmp_path / "data"),
           "--models", "lenet5", "mobilenet", "--datasets", "digits"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and f"weights of mobilenet ({TIMM_NAMES['mobilenet']})" in proc.stderr
    _fake_hub_cache(tmp_path / "hf", TIMM_NAMES["mobilenet"])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "weights  mobilenet" in proc.stdout and str(tmp_path / "hf") in proc.stdout


def test_the_docs_name_what_docker_holds():
    docs = (ROOT / "docs" / "sweeps.md").read_text()
    start, end = docs.index("### 3. docker compose"), docs.index("## Token authentication")
    section = docs[start:end]
    for path in sorted(DOCKER.iterdir()):
        if path.suffix in (".yaml", ".py") and path.name != "constraints.txt":
            assert f"docker/{path.name}" in section, path.name
    for needed in ("exec ray-head ray job submit", "up -d --build --wait", "compose -f docker/compose.yaml cp",
                   "ray job logs -f", "jsonpath='{.data.auth_token}'", "svc/impactx-full-grid-head-svc 8265",
                   "port-forward svc/mlflow 5000", "ray up build/deploy/cluster.yaml", "make push REGISTRY="):
        assert needed in section, needed
    assert re.search(r"impactx/<name>", section) and "registry.example.com" not in docs
