"""The layering rules of docs/architecture.md, checked on the source: imports point down the
layers, no module imports itself back through others, and Ray and MLflow stay at the edges.

Every import counts, also the ones inside functions: a lazy import is still a dependency.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "impactx_ray"

# What each top-level part of the package may import from the package (besides itself), bottom up:
# defaults, errors, io, heap, lock → data → models → config → train, explain → eval, checks → methods
# → pipeline → rundir, report → runner → sweep → cli.
BASE = {"defaults", "devices", "errors", "io", "heap"}
ALLOWED = {
    "defaults": set(),
    "heap": set(),
    "devices": {"errors"},
    "capacity": {"errors"},
    "errors": set(),
    "io": {"errors"},
    "data": BASE,
    "models": BASE,
    "config": BASE | {"data", "models"},
    "train": BASE | {"data", "models", "config"},
    "explain": BASE | {"data", "config", "capacity"},
    "eval": BASE | {"data", "models", "config", "explain"},
    "methods": BASE | {"data", "models", "config", "train", "explain"},
    "checks": BASE | {"data", "config", "train", "explain"},
    "rundir": BASE | {"config", "methods", "train", "pipeline"},
    "report": BASE | {"eval", "methods", "pipeline", "config"},
    "pipeline": BASE | {"data", "models", "config", "train", "explain", "eval", "methods", "checks"},
    "runner": BASE | {"data", "config", "explain", "eval", "methods", "rundir", "train", "checks",
                      "report", "pipeline"},
    "flags": BASE,
    "lock": {"errors", "defaults"},
    "predict": BASE | {"data", "models", "config", "train", "explain", "methods", "rundir"},
    "serve": BASE | {"data", "config", "methods", "rundir", "predict", "explain"},
    "sweep": BASE | {"data", "models", "config", "train", "explain", "eval", "methods", "checks",
                     "lock", "report", "pipeline", "capacity", "serve"},
    "cli": BASE | {"data", "config", "flags", "methods", "rundir", "runner", "sweep", "lock",
                   "report", "predict", "serve", "train", "explain"},
    "__main__": {"cli"},
    "__init__": BASE,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(path: Path) -> set[str]:
    """The impactx_ray modules ``path`` imports, anywhere in the file, resolved to module names
    (``from impactx_ray.x import y`` is ``impactx_ray.x.y`` when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES
                     else node.module for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] == "impactx_ray"}
    return found


def part(module: str) -> str:
    """The top-level part of the package a module belongs to (``impactx_ray.x.y`` -> ``x``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


GRAPH = {m: imports_of(p) - {m} for m, p in MODULES.items()}


def test_every_part_has_a_layer():
    assert {part(m) for m in MODULES} <= set(ALLOWED)


def test_imports_point_down_the_layers():
    wrong = sorted(f"{m} imports {t}" for m, targets in GRAPH.items() for t in targets
                   if part(t) != part(m) and part(t) not in ALLOWED[part(m)])
    assert wrong == []


def test_the_checker_sees_lazy_and_from_imports(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from impactx_ray.explain import store\n"
                 "    import impactx_ray.train.loop\n")
    assert imports_of(f) == {"impactx_ray.explain.store", "impactx_ray.train.loop"}


def test_no_import_cycle():
    """No module reaches itself through the modules it imports (Tarjan's strongly connected
    components of the import graph; a package's ``__init__`` is its own node)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in MODULES:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(MODULES):
        if module not in index:
            visit(module)
    assert cycles == []


PLAIN = ["impactx_ray.models", "impactx_ray.train", "impactx_ray.explain", "impactx_ray.eval",
         "impactx_ray.eval.compare", "impactx_ray.methods", "impactx_ray.report",
         "impactx_ray.pipeline", "impactx_ray.runner", "impactx_ray.cli", "impactx_ray.predict",
         "impactx_ray.predict.files", "impactx_ray.serve"]


def test_plain_modules_import_neither_ray_nor_mlflow():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in PLAIN) +
            "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def _importers(package: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                  if any(isinstance(n, (ast.Import, ast.ImportFrom)) and
                         any(name.split(".")[0] == package for name in
                             ([a.name for a in n.names] if isinstance(n, ast.Import)
                              else [n.module or ""]))
                         for n in ast.walk(ast.parse(p.read_text()))))


def test_mlflow_is_imported_only_by_tracking_and_the_registry():
    # serving loads a registered model through MLflow (serve/deployment.py, lazily)
    assert _importers("mlflow") == ["serve/deployment.py", "serve/pyfunc_code.py", "serve/registry.py",
                                    "sweep/tracking.py"]


def test_ray_is_imported_only_by_the_actors_the_capacity_the_sweep_and_serving():
    assert all(p in ("explain/actors.py", "explain/dispatch.py", "capacity.py", "serve/deployment.py",
                     "serve/command.py")
               or p.startswith("sweep/") for p in _importers("ray"))
