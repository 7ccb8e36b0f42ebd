#!/usr/bin/env bash
# One prepared GPU check (issue #25, point 5), under 8 minutes on one H200:
#   prereqs    every module the steps import, the GPU, nvidia-smi (one line and exit 3 if not)
#   run        `python -m impactx_ray run --device DEV --dataset digits --model lenet5`, smoke-sized
#   parity     shap_engine.py: the engine's maps (eager, compiled) against shap's on DEV
#   map-table  map_table.py: LeNet-5 (32, 96), MobileNet, EfficientNet-B2; fp32 and bf16, eager and
#              compiled; nvidia-smi sampled every 500 ms meanwhile (step "smi")
# Every file lands in --out (few and flat, as the device tool brings back at most 8); each step's
# output goes to gpu_check.log, and summary.txt has one line per step: ok/failed, seconds, digest.
# A failed step does not stop the next; the exit status is 1 if any failed.
#
# On the device machine (wheels from bash benchmarks/gpu_wheels.sh, run here first):
#   run(command="bash benchmarks/gpu_check.sh --out $OUT", carry=[".whl"], timeout_s=540)
# Here, without a GPU: every command line of the GPU run with tiny sizes, in about 2-3 minutes:
#   bash benchmarks/gpu_check.sh --device cpu --dry-run --out /tmp/gpu_check
set -euo pipefail

usage() {
  cat <<'EOF'
usage: gpu_check.sh --out DIR [--device cuda|cpu] [--dry-run] [--only-prereqs] [--budget-s S] [--python PY]
                    [--wheels DIR]
  --out DIR      output folder (created; this script's own files in it are replaced)
  --device DEV   cuda (default) or cpu
  --dry-run      the same steps and flags with tiny sizes (a CPU test of the command lines)
  --only-prereqs check the prerequisites (installing carried wheels as needed) and stop: seconds
  --budget-s S   total seconds for all steps (default 460; each step's timeout is cut to what is left)
  --python PY    interpreter (default: $PYTHON, else .venv/bin/python if present, else python3)
  --wheels DIR   wheels installed to a temporary site folder when a module is missing (default .whl)
Environment: GPU_CHECK_REQUIRE="mod ..." adds modules the prerequisite check requires (its tests use it).
EOF
}

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT_DIR="" DEVICE=cuda DRY_RUN=0 ONLY_PREREQS=0 BUDGET_S=460 WHEELS="$REPO/.whl"
PY=${PYTHON:-$([ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3)}
while [ $# -gt 0 ]; do
  case $1 in
    --out) OUT_DIR=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --only-prereqs) ONLY_PREREQS=1; shift ;;
    --budget-s) BUDGET_S=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
# a relative --python names a file from here, and the script runs from the repository's root
if [[ $PY == */* && -d $(dirname "$PY") ]]; then PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY"); fi
[ -n "$OUT_DIR" ] || { echo "gpu_check: --out DIR is required" >&2; usage >&2; exit 2; }
case $DEVICE in cuda|cuda:*|cpu) ;; *) echo "gpu_check: --device must be cuda or cpu, not $DEVICE" >&2; exit 2 ;; esac

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
DEV=${DEVICE%%:*}  # file names: map_table_cuda.jsonl, map_table_cpu.jsonl
LOG=$OUT_DIR/gpu_check.log SUMMARY=$OUT_DIR/summary.txt SMI_CSV=$OUT_DIR/nvidia_smi.csv
MAP_JSONL=$OUT_DIR/map_table_$DEV.jsonl
rm -f "$LOG" "$SUMMARY" "$SMI_CSV" "$MAP_JSONL" "$OUT_DIR/shap_engine_$DEV.json" "$OUT_DIR"/run_*
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # run directory, step outputs, installed wheels
START=$SECONDS FAILED=0 SMI_PID=""
CASES=(lenet5-32 lenet5-96 mobilenet efficientnet_b2)

# Sizes: the GPU run's, or the dry run's (same flags, tiny numbers). Timeouts are per step, in s.
if [ "$DRY_RUN" = 1 ]; then
  RUN_ARGS=(--epochs 1 --max-evals 16) RUN_LIMIT=120
  PARITY_ARGS=(--images 2 --max-evals 16 --repeats 1) PARITY_LIMIT=120
  MAP_ARGS=(--max-evals 16 --images-scale 0.1 --train-epochs 0 --forward-batch 32 32 8 8)
  MAP_ROW_S=30  # the row in flight when map_table.py's --budget-s runs out may take this long
  # no cold torch.compile on a 2-core CPU (34-87 s per model): torch.compile runs the eager model
  export TORCH_COMPILE_DISABLE=1
else
  RUN_ARGS=(--epochs 3 --max-evals 500) RUN_LIMIT=150
  PARITY_ARGS=(--images 16 --max-evals 2000 --repeats 1) PARITY_LIMIT=120
  MAP_ARGS=(--max-evals 2000 --images-scale 1 --train-epochs 2 --forward-batch 4096 4096 1024 1024)
  MAP_ROW_S=90  # EfficientNet-B2 compiled: about 40 s of compile, then its maps and forward bound
fi

log() { echo "[gpu_check $(date +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$LOG"; }

record() {  # record STEP STATUS SECONDS NOTE: one summary line; any status but ok/skipped fails the check
  printf '%-10s %-18s %5ss  %s\n' "$1" "$2" "$3" "$4" >>"$SUMMARY"
  log "$1: $2 ($3 s) $4"
  case $2 in ok|skipped*) ;; *) FAILED=1 ;; esac
}

left() { echo $((BUDGET_S - (SECONDS - START))); }

# run_step NAME LIMIT CMD...: CMD under `timeout` (cut to the budget left), its output streamed to the
# log (so a check killed from outside still brings it back) and to $WORK/NAME.out; returns CMD's status.
run_step() {
  local name=$1 limit=$2 rc
  shift 2
  [ "$limit" -le "$(left)" ] || limit=$(left)
  if [ "$limit" -lt 10 ]; then
    STEP_S=0
    return 125
  fi
  log "$name (timeout ${limit}s): $*"
  local t0=$SECONDS
  set +e
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$WORK/$name.out" >>"$LOG"
  rc=${PIPESTATUS[0]}
  set -e
  STEP_S=$((SECONDS - t0))
  return "$rc"
}

fail_rc() { [ "$rc" -ne 0 ] || rc=1; }  # a step whose command passed but whose output is wrong: status 1

why() {  # why RC: the status word for a step's exit code
  case $1 in 0) echo ok ;; 124|137) echo "failed (timeout)" ;; 125) echo "failed (no budget)" ;;
    *) echo "failed (exit $1)" ;; esac
}

# Modules this project's environment has and the GPU machine lacks (Ray is too big to carry; the
# serve stack and MLflow are not needed): in a dry run, stand-ins that refuse to be imported make
# a step fail here if it starts to need one. Not on the GPU, which lacks them for real.
ABSENT_MODULES=(ray mlflow optuna fastapi starlette uvicorn pydantic)
block_absent_modules() {
  local m
  for m in "${ABSENT_MODULES[@]}"; do
    mkdir -p "$WORK/absent/$m"
    echo "raise ImportError('$m is not on the GPU machine; gpu_check.sh steps must not import it')" \
      >"$WORK/absent/$m/__init__.py"
  done
}

install_wheels() {  # the carried wheels into $WORK/site, which PYTHONPATH names from the start
  compgen -G "$WHEELS/*.whl" >/dev/null || return 1
  log "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    "$WHEELS"/*.whl >>"$LOG" 2>&1
}

# prereqs: all of it in seconds, before any long step; on failure one line on stderr and exit 3.
check_prereqs() {
  local t0=$SECONDS line=""
  command -v "$PY" >/dev/null || line="gpu_check: no python: $PY"
  if [ -z "$line" ] && [ "$DEV" = cuda ] && ! command -v nvidia-smi >/dev/null; then
    line="gpu_check: --device $DEVICE but nvidia-smi is not on PATH"
  fi
  if [ -z "$line" ] && ! "$PY" benchmarks/gpu_prereqs.py --device "$DEVICE" >>"$LOG" 2>"$WORK/prereqs.err"; then
    if install_wheels && "$PY" benchmarks/gpu_prereqs.py --device "$DEVICE" >>"$LOG" 2>"$WORK/prereqs.err"; then
      :
    else
      line=$(grep -m1 '^gpu_check:' "$WORK/prereqs.err" || tail -n1 "$WORK/prereqs.err")
      cat "$WORK/prereqs.err" >>"$LOG"
    fi
  fi
  if [ -n "$line" ]; then
    record prereqs failed $((SECONDS - t0)) "$line"
    echo "$line" >&2
    exit 3
  fi
  record prereqs ok $((SECONDS - t0)) "$(grep '^prerequisites ok' "$LOG" | tail -n1 | cut -d: -f2-)"
}

step_run() {  # the CLI's single-process path on DEV, smoke-sized; its small files come back
  local rc=0 note
  run_step run "$RUN_LIMIT" "$PY" -m impactx_ray run --device "$DEVICE" --dataset digits --model lenet5 \
    "${RUN_ARGS[@]}" --quiet --out "$WORK/run" || rc=$?
  if [ -f "$WORK/run/result.json" ]; then
    cp "$WORK/run/result.json" "$OUT_DIR/run_result.json"
    (cd "$WORK/run" && find . -name '*.json' -o -name '*.jsonl' | tar -czf "$OUT_DIR/run_files.tar.gz" -T -)
    note=$("$PY" benchmarks/gpu_digest.py run "$WORK/run/result.json" --device "$DEVICE") || fail_rc
  else
    note="no result.json"
    fail_rc
  fi
  record run "$(why "$rc")" "$STEP_S" "$note"
}

step_parity() {  # shap_engine.py prints max |engine - shap| / max |shap| for the eager and compiled engine
  local rc=0 note=""
  run_step parity "$PARITY_LIMIT" "$PY" benchmarks/shap_engine.py --device "$DEVICE" --compile \
    "${PARITY_ARGS[@]}" --json "$OUT_DIR/shap_engine_$DEV.json" || rc=$?
  if [ -f "$WORK/parity.out" ]; then
    # on CUDA 3 in 4 images: the forward's rounding differs per batch size there (gpu_digest.py)
    note=$("$PY" benchmarks/gpu_digest.py parity "$WORK/parity.out" --min-share "$([ "$DEV" = cuda ] && echo 0.75 || echo 1)") \
      || fail_rc
  fi
  record parity "$(why "$rc")" "$STEP_S" "$note"
}

start_smi() {  # GPU utilisation and memory every 500 ms while the map rows run
  command -v nvidia-smi >/dev/null || return 0
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 500 >"$SMI_CSV" 2>>"$LOG" &
  SMI_PID=$!
}

stop_smi() {
  [ -n "$SMI_PID" ] || return 0
  kill "$SMI_PID" 2>/dev/null || true
  wait "$SMI_PID" 2>/dev/null || true
  SMI_PID=""
}

record_smi() {
  local note rc=0
  if [ ! -f "$SMI_CSV" ]; then
    record smi "skipped (no nvidia-smi)" 0 ""
    return
  fi
  note=$("$PY" benchmarks/gpu_digest.py smi "$SMI_CSV") || rc=1
  record smi "$(why "$rc")" 0 "$note"
}

step_map_table() {  # last: it takes what the budget leaves, and stops starting rows MAP_ROW_S before that
  local rc=0 limit note
  limit=$(left)
  start_smi
  run_step map-table "$limit" "$PY" benchmarks/map_table.py --device "$DEVICE" --cases "${CASES[@]}" \
    --precisions fp32 bf16 --compiled fp32 bf16 "${MAP_ARGS[@]}" --budget-s $((limit - MAP_ROW_S)) \
    --out "$MAP_JSONL" || rc=$?
  stop_smi
  if [ -s "$MAP_JSONL" ]; then
    note=$("$PY" benchmarks/gpu_digest.py table "$MAP_JSONL" --cases "${CASES[@]}") || fail_rc
  else
    note="no rows"
    fail_rc
  fi
  record map-table "$(why "$rc")" "$STEP_S" "$(echo "$note" | tail -n1)"
  record_smi
  { echo; echo "map table ($MAP_JSONL):"; echo "$note"; } >>"$SUMMARY"
}

cleanup() {
  stop_smi
  rm -rf "$WORK"
}
trap cleanup EXIT

cd "$REPO"
# The project runs from its tree (the GPU machine has no install of it); wheels go to $WORK/site.
export PYTHONUNBUFFERED=1 PYTHONPATH=$WORK/absent:$WORK/site:$REPO
[ "$DRY_RUN" = 0 ] || block_absent_modules
log "device $DEVICE, dry run $DRY_RUN, budget ${BUDGET_S}s, python $PY, output $OUT_DIR"
check_prereqs
[ "$ONLY_PREREQS" = 0 ] || exit 0
# The quick steps first, so that a slow map table cannot starve them of the budget.
step_run
step_parity
step_map_table
log "done in $((SECONDS - START)) s; $([ "$FAILED" = 0 ] && echo 'all steps ok' || echo 'some step FAILED'): $SUMMARY"
exit "$FAILED"
