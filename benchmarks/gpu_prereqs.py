"""Prerequisites of benchmarks/gpu_check.sh, checked in seconds before any long step starts.

Imports every module the check's steps import (the third-party ones by name, then the project's
own entry modules, which catches a transitive need the list forgot) and, for ``--device cuda``,
asks torch for the GPU. On success it prints one line of versions; on failure one line on stderr
naming every missing module and what to carry, and exit status 3.

    python benchmarks/gpu_prereqs.py --device cuda
    GPU_CHECK_REQUIRE="foo bar" python benchmarks/gpu_prereqs.py   # also require foo and bar
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Third-party modules the steps import (map_table.py, shap_engine.py, `impactx run --dataset digits`).
# shap and slicer are the ones the GPU machine lacks; gpu_wheels.sh fetches them.
MODULES = ("numpy", "scipy", "sklearn", "pandas", "tqdm", "PIL", "cv2", "numba", "llvmlite", "cloudpickle",
           "slicer", "shap", "torch", "torchvision", "timm")
# The project's own modules the steps import: none of them may need Ray, MLflow or Optuna.
ENTRY_MODULES = ("impactx_ray.cli", "impactx_ray.runner", "impactx_ray.explain.batched", "impactx_ray.models",
                 "impactx_ray.data", "shap_engine")
VERSIONS = ("torch", "numpy", "numba", "shap", "timm", "sklearn", "scipy", "cv2")
EXIT_MISSING = 3


def missing_modules(names: list[str]) -> dict[str, str]:
    """{missing module: why} for every name that cannot be imported; a name whose import fails
    on another missing module reports that one (ModuleNotFoundError.name)."""
    missing: dict[str, str] = {}
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            missing.setdefault(e.name or name, f"needed by {name}" if e.name and e.name != name else "")
        except ImportError as e:  # a blocked module (gpu_check.sh's stand-ins for ray, mlflow, optuna)
            missing.setdefault(name, str(e).splitlines()[0])
    return missing


def cuda_problem() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device (torch.version.cuda={torch.version.cuda})"
    return None


def versions(device: str) -> str:
    parts = [f"python {sys.version.split()[0]}"]
    for name in VERSIONS:
        parts.append(f"{name} {getattr(sys.modules.get(name), '__version__', '?')}")
    if device.startswith("cuda"):
        import torch

        parts.append(f"gpu {torch.cuda.get_device_name()}")
    return ", ".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # shap_engine, as map_table.py sees it
    extra = os.environ.get("GPU_CHECK_REQUIRE", "").split()
    missing = missing_modules([*MODULES, *extra, *ENTRY_MODULES])
    if missing:
        what = ", ".join(f"{m} ({why})" if why else m for m, why in missing.items())
        print(f"gpu_check: missing Python modules: {what}; python {sys.executable}; carry them as wheels "
              "(bash benchmarks/gpu_wheels.sh, then carry=['.whl'])", file=sys.stderr)
        return EXIT_MISSING
    if args.device.startswith("cuda") and (problem := cuda_problem()):
        print(f"gpu_check: no GPU for --device {args.device}: {problem}", file=sys.stderr)
        return EXIT_MISSING
    print(f"prerequisites ok: {versions(args.device)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
