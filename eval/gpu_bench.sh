#!/usr/bin/env bash
# The one prepared GPU check: `bash eval/gpu_bench.sh` from the repository root on a lent GPU machine.
#
#   1. pmod bench --device cuda --preset gpu-7b   (Vicuna-7B shapes, bf16, random weights built on the GPU;
#      576 and 2880 vision tokens; decode at batch 1 and 8; vs transformers; packed vs padded)  ~1.5-3 min
#   1b. the same weights, sections prefill_batch + generate_e2e (pmod/bench/section_e2e.py; its own process and
#      output folder, so that one failing cannot take the other's numbers): prefill at batch 1 / 8 / 32, and
#      576 (2880) + 64 -> 64 new tokens: TTFT, decode tok/s, total; dense vs p-MoD; eager vs CUDA graph (vs
#      compiled when the model class has its own compile())                                     ~2 min
#      (estimate: 7B prefill ~13 GFLOP/token at ~0.5 PFLOP/s = ~30 us/token, so batch 32 x 2938 tokens ~2.8 s a
#      call, ~40 s for the section; 32 generations of 64 tokens at 10-25 ms a step, ~60 s; CPU tiny run: 3.5 s)
#   2. python -m pmod_kernels.bench (Triton vs PyTorch reference, 7B row width), eval/sdpa_shape_cost.py ~20 s
#   3. pytest -m gpu (GPU-marked tests), tests/test_kernels.py (Triton kernels run on CUDA there),
#      and pytest -m flash when flash_attn imports (else a message saying it was skipped)         ~1-2 min
#
# Everything lands in $OUT (default ./out/gpu): bench/results.{json,md}, bench/speedup.png, *.log, env.txt,
# summary.txt. No network: uses the machine's python (PYTHON, else /opt/torch/.venv/bin/python, else python3)
# with pmod installed --no-deps (or, failing that, put on PYTHONPATH with a pmod_kernels shim). Each step has
# its own timeout so the whole script stays under 10 minutes; a failing step does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-/opt/torch/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
QUICK=${QUICK:-}  # QUICK=1 runs the bench with --quick
START=$(date +%s)
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }

# --- make pmod importable without touching the network ----------------------------------------------
if ! "$PY" -m pip install --no-deps --no-build-isolation --no-index -q -e . >"$OUT/install.log" 2>&1; then
  SHIM=$(mktemp -d)
  ln -s "$REPO/kernels" "$SHIM/pmod_kernels"  # the folder kernels/ installs as pmod_kernels
  export PYTHONPATH="$REPO:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  summary "install: pip -e failed (see install.log); using PYTHONPATH=$PYTHONPATH"
fi
{
  date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import torch as t, transformers as h; print('torch', t.__version__, t.version.cuda, '| transformers', h.__version__)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
  "$PY" -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>&1 | tail -1
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
"$PY" -c "import pmod, pmod_kernels" || { summary "FAIL: pmod does not import"; exit 1; }

# --- 1. the benchmark ---------------------------------------------------------------------------------
PYTHONUNBUFFERED=1 timeout 270 "$PY" -m pmod.bench --device cuda --preset gpu-7b --output "$OUT/bench" ${QUICK:+--quick} \
  --sections prefill,decode,hf_prefill,hf_decode,batching,packing 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
summary "bench: exit $rc ($(( $(date +%s) - START )) s elapsed); last line: $(tail -n 1 "$OUT/bench.log")"

PYTHONUNBUFFERED=1 timeout 200 "$PY" -m pmod.bench --device cuda --preset gpu-7b --output "$OUT/e2e" --warmup 1 --reps 3 \
  --sections prefill_batch,generate_e2e 2>&1 | tee "$OUT/e2e.log"
rc=${PIPESTATUS[0]}
summary "e2e bench: exit $rc ($(( $(date +%s) - START )) s elapsed); results in $OUT/e2e/results.md"

# --- 2. the kernels alone: Triton vs the PyTorch reference at a 7B row width ---------------------------
timeout 45 "$PY" -m pmod_kernels.bench --device cuda >"$OUT/kernels.txt" 2>&1  # the installed name, not the folder
summary "kernels bench: exit $? — $(tail -n 1 "$OUT/kernels.txt" | cut -c1-400)"

timeout 30 "$PY" eval/sdpa_shape_cost.py >"$OUT/sdpa_shape_cost.txt" 2>&1
summary "sdpa shape cost: exit $? — $(grep -c ms/call "$OUT/sdpa_shape_cost.txt") lines"

# --- 3. device tests ----------------------------------------------------------------------------------
if "$PY" -c "import pytest" 2>/dev/null; then
  run_tests() {  # name, timeout, pytest args...
    local name=$1 limit=$2; shift 2
    timeout "$limit" "$PY" -m pytest -q -p no:cacheprovider "$@" >"$OUT/$name.log" 2>&1
    local r=$?
    [ $r -eq 5 ] && summary "$name: no tests selected" || summary "$name: exit $r — $(tail -n 1 "$OUT/$name.log")"
  }
  run_tests pytest_gpu 60 -m gpu tests
  run_tests pytest_kernels 60 tests/test_kernels.py
  if "$PY" -c "import flash_attn" 2>/dev/null; then
    run_tests pytest_flash 60 -m flash tests
  else
    summary "flash: flash_attn is not importable here; flash-attn path tests skipped"
  fi
else
  summary "tests: pytest is not installed for $PY; device tests skipped"
fi
summary "done in $(( $(date +%s) - START )) s; results in $OUT"
