"""DESIGN.md's boundaries: models, loops, explainers and metrics import neither Ray nor MLflow."""

import subprocess
import sys

PLAIN = ["impactx_ray.models", "impactx_ray.train", "impactx_ray.explain.shap_maps",
         "impactx_ray.explain.batched", "impactx_ray.explain.store", "impactx_ray.eval",
         "impactx_ray.eval.compare", "impactx_ray.runner", "impactx_ray.cli"]


def test_plain_modules_import_neither_ray_nor_mlflow():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in PLAIN) +
            "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_mlflow_is_imported_only_by_tracking():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "impactx_ray"
    importers = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                       if "import mlflow" in p.read_text() or "from mlflow" in p.read_text())
    assert importers == ["sweep/tracking.py"]
