#!/usr/bin/env bash
# Fetch, HERE, the wheels benchmarks/gpu_check.sh needs on the GPU machine, into .whl/ (git-ignored
# through .git/info/exclude), pinned to docker/constraints.txt.
#
# Why only these: the GPU machine (device kind nvidia-h200, Python 3.12, x86-64) has its own torch,
# numpy, scipy, scikit-learn, pandas, numba, llvmlite, opencv-python-headless, timm, tqdm and
# cloudpickle (/work/.library/device/KINDS.md), and gpu_check.sh runs the project from PYTHONPATH,
# so it lacks only shap and shap's pure-Python dependency slicer (about 1 MiB together). Ray is
# not needed: single-process `impactx run` and the benchmarks never import it.
#
#   bash benchmarks/gpu_wheels.sh          # then run(..., carry=[".whl"])
set -euo pipefail

NAMES=(shap slicer)
PY_VERSION=3.12  # the GPU machine's python3 (KINDS.md)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64)

cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

pin() {  # the version docker/constraints.txt pins for $1
  local v
  v=$(grep -i "^$1==" docker/constraints.txt | cut -d= -f3)
  [ -n "$v" ] || { echo "gpu_wheels: $1 is not pinned in docker/constraints.txt" >&2; exit 2; }
  echo "$v"
}

# .whl/ must never be committed, yet travel with carry=[".whl"]
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
mkdir -p .whl

plat_flags=()
for p in "${PLATFORMS[@]}"; do plat_flags+=(--platform "$p"); done
for name in "${NAMES[@]}"; do
  version=$(pin "$name")
  rm -f .whl/"$name"-*.whl  # two versions of one package stop the install there
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    "${plat_flags[@]}" -d .whl "$name==$version"
done

total=0
for name in "${NAMES[@]}"; do
  for f in .whl/"$name"-*.whl; do
    size=$(stat -c %s "$f")
    total=$((total + size))
    awk -v s="$size" -v f="$f" 'BEGIN { printf "%8.2f MiB  %s\n", s / 1048576, f }'
  done
done
awk -v s="$total" 'BEGIN { printf "%8.2f MiB  total (what travels, carried paths included, may total 64 MiB)\n", s / 1048576 }'
