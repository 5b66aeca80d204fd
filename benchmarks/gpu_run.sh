#!/usr/bin/env bash
# Everything that needs a GPU, in one command that fits a short GPU window (see benchmarks/NOTES.md,
# "The GPU run"): build, correctness of the CUDA and Triton kernels, op and model timings, report.
#
#   bash benchmarks/gpu_run.sh OUT [quick|full] [--dry-run] [--only STAGE,STAGE...]
#
#   quick      (default) within 9 minutes on one H200; the stages below in this order, each cut off
#              by `timeout` at its budget or at the run's deadline, whichever comes first, so an
#              overrunning stage is reported as "cut off" and the later ones still run and report.
#   full       every GPU test and benchmark (torch.compile, bwd-only cases, Triton autotuning in the
#              tests), for longer windows: larger budgets and no run deadline.
#   --dry-run  the CPU rehearsal (tests/test_gpu_run.py runs it in CI): every stage's logic on the
#              CPU: the build checks its tools instead of building, the GPU tests are selected with the
#              same -k as on a GPU and skipped by their `gpu` marker (a selection that matches nothing
#              fails), the op and model stages time a tiny subset on the CPU with one round, so the
#              JSON -> RESULTS.md -> SUMMARY.md plumbing runs for real; same OUT layout.
#   --only     run only these stages (the others are listed as "not run"), e.g. a second window.
#
# Environment: PYTHON (default python3: on the GPU machine that is the CUDA torch's interpreter),
# GPU_RUN_TOTAL_S (the run's deadline in seconds; quick 540, full none), GPU_RUN_BUDGET_<STAGE>
# (one stage's budget in seconds, e.g. GPU_RUN_BUDGET_BUILD=300). Exit status 0 when no stage
# failed or was cut off, 1 otherwise, 2 on a usage error.
#
# Stages, most important evidence first. Quick budgets (seconds) and the estimates behind them
# (H200 host, 16 cores, cold caches; how they were estimated: benchmarks/NOTES.md):
#
#   #  stage     what                                                         estimate  budget
#   1  build     pip install -e . (C++ and CUDA, sm_90, MAX_JOBS = nproc)       60-120     180
#   2  cuda      tests/test_fused_gpu.py (-k fused_cuda) + test_cuda_gpu.py:    30-60       90
#                fwd + all grads vs the reference,
#                bf16/fp16/fp32, odd N, determinism, races, opcheck, model
#                logits (quick: not the torch.compile and sanitizer tests)
#   3  triton16  tests/test_fused_gpu.py (-k fused_triton) + test_triton_gpu.py, 40-80     100
#                bf16/fp16 cases (quick: autotuning
#                off, xdist -n 8: the time is Triton compiles)
#   4  op        bench_op: every backend, ConViT-S/B, B = 64/256, bf16,          60-100     150
#                fwd and fwd_bwd (quick: no reference_compile, no bwd-only)
#   5  timm      swap_gpsa on timm's convit_small keeps its bf16 logits, every   15-30       60
#                GPU backend (tests/test_timm.py -m gpu)
#   6  model     bench_model: bf16 training step images/s, convit_tiny/small,    40-60       90
#                every backend vs plain attention vs timm (quick: eager only)
#   7  triton32  the same Triton tests: the fp32 cases and the rest               30-50       60
#   8  sanitize  compute-sanitizer memcheck + racecheck on a tiny cuda case      40-90      150
#                (skipped with the reason where the tool or the device refuses)
#   9  report    benchmarks/report.py -> OUT/RESULTS.md                              3       15
#
# The quick run's deadline (540 s) is enforced: stages 1-8 end by 510 s (a stage that would get
# less than 20 s is skipped: "no time left"), the report and summary get the rest.
#
# OUT holds at most 8 files, no deeper than OUT/logs/file: SUMMARY.md (per stage: passed / failed /
# cut off / skipped and why, with durations), RESULTS.md, <device>-<date>-op.json and -model.json
# (pytest-benchmark JSON with the commit: copy them to benchmarks/results/), logs/tests.log
# (stages 1-3, 5, 7, 8) and logs/bench.log (stages 4, 6, 9).
set -uo pipefail

usage() { sed -n '5,22p' "$0" | cut -c3- >&2; exit 2; }

OUT="" PROFILE=quick DRY=0 ONLY=""
while [ $# -gt 0 ]; do
  case $1 in
    quick|full) PROFILE=$1 ;;
    --dry-run) DRY=1 ;;
    --only) [ $# -ge 2 ] || usage; ONLY=",$2,"; shift ;;
    --only=*) ONLY=",${1#--only=},";;
    -h|--help) usage ;;
    -*) echo "gpu_run.sh: unknown option $1" >&2; usage ;;
    *) if [ -z "$OUT" ]; then OUT=$1; else echo "gpu_run.sh: unexpected argument $1" >&2; usage; fi ;;
  esac
  shift
done
[ -n "$OUT" ] || usage
STAGE_IDS="build cuda triton16 op timm model triton32 sanitize report"
for s in ${ONLY//,/ }; do
  case " $STAGE_IDS " in *" $s "*) ;; *) echo "gpu_run.sh: unknown stage '$s' (stages: $STAGE_IDS)" >&2; exit 2 ;; esac
done
mkdir -p "$OUT" || exit 2
if [ -n "$(ls -A "$OUT")" ]; then echo "gpu_run.sh: $OUT is not empty (the run writes at most 8 files there)" >&2; exit 2; fi
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2


export PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_run.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT/logs"
TESTS_LOG="$OUT/logs/tests.log" BENCH_LOG="$OUT/logs/bench.log"
: > "$TESTS_LOG"; : > "$BENCH_LOG"
START=$(date +%s)
STAMP=$(date -u +%Y-%m-%d)

# ---------------------------------------------------------------- profile: budgets and selections
if [ "$PROFILE" = quick ]; then
  declare -A BUDGET=([build]=180 [cuda]=90 [triton16]=100 [op]=150 [timm]=60 [model]=90 [triton32]=60
                     [sanitize]=150 [report]=15)
  TOTAL=${GPU_RUN_TOTAL_S:-540}
  # The two torch.compile tests take minutes cold and the sanitizer tests are stage 8's job.
  CUDA_K="not compile_fullgraph and not compute_sanitizer"
  TRITON_NOT_K="compile_fullgraph"
  # Select by model and mode only (the batches are 64 and 256 on a GPU), so provider renames
  # (sdpa / plain_sdpa) and new backends need no change here.
  OP_K="(convit_small- or convit_base-) and (-fwd- or -fwd_bwd-) and not reference_compile"
  MODEL_K="-eager-train"
  # Autotuning compiles and times every config per (N, D, dtype): minutes for the fp32 tests. The
  # tests check the math, which every config shares; the op stage autotunes (its figures need it).
  TEST_AUTOTUNE=0
  PER_TEST_TIMEOUT=120
else
  declare -A BUDGET=([build]=600 [cuda]=1500 [triton16]=900 [op]=2400 [timm]=120 [model]=2400
                     [triton32]=1200 [sanitize]=600 [report]=30)
  TOTAL=${GPU_RUN_TOTAL_S:-0}
  CUDA_K="" TRITON_NOT_K="" OP_K="" MODEL_K=""
  TEST_AUTOTUNE=1
  PER_TEST_TIMEOUT=900
fi
# bf16/fp16 Triton cases: the dtype-parametrized ones ("float16" also matches "bfloat16") and the
# tests that run in 16 bits only; stage 7 runs the complement.
TRITON16_K="(float16 or many_batch_heads or deterministic or races) and not float32"
TRITON32_K="not (float16 or many_batch_heads or deterministic or races)"
[ -n "$TRITON_NOT_K" ] && TRITON32_K="$TRITON32_K and not $TRITON_NOT_K" && TRITON16_K="$TRITON16_K and not $TRITON_NOT_K"
if [ $DRY = 1 ]; then
  # The same selections, narrowed to a few cheap CPU cases (batch 8 on CPU).
  OP_K="${OP_K:+($OP_K) and }convit_small-8-fwd- and (cpu or composed or cuda or triton)"
  MODEL_K="${MODEL_K:+($MODEL_K) and }convit_tiny- and (cpu or timm)"
  export CONVIT_BENCH_DEVICE=cpu CONVIT_BENCH_ROUNDS=1
  # The budgets are estimates for the GPU host; a shared 2-core CI machine runs the rehearsal's
  # Python processes several times slower, and a cut-off there would be noise, not a finding.
  for k in "${!BUDGET[@]}"; do BUDGET[$k]=$((BUDGET[$k] * 3)); done
else
  export CONVIT_BENCH_DEVICE=cuda   # fail loudly rather than time the CPU if CUDA is missing
fi
# This run is what verifies the CUDA kernels: test and time them while they are opt-in.
export CONVIT_KERNELS_ENABLE_CUDA=1
DEADLINE=0
[ "$TOTAL" -gt 0 ] 2>/dev/null && DEADLINE=$((START + TOTAL - 30))
MIN_STAGE_S=20

PYTEST=("$PYTHON" -m pytest -p no:cacheprovider -ra --tb=short)
XDIST=()
if [ $DRY = 0 ]; then
  "$PYTHON" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
  "$PYTHON" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout="$PER_TEST_TIMEOUT")
fi

# ---------------------------------------------------------------- the environment
"$PYTHON" - > "$WORK/env.txt" 2>&1 <<'EOF'
import os, platform, sys
print(f"python {platform.python_version()} ({sys.executable})")
try:
    import torch
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"device {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible")
except Exception as err:
    print(f"torch not importable: {err!r}")
try:
    import triton
    print(f"triton {triton.__version__}")
except Exception as err:
    print(f"triton not importable: {err!r}")
EOF
{
  echo "cpus $(nproc), host $(uname -srm)"
  command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | head -n 4
  command -v nvcc >/dev/null && nvcc --version 2>&1 | tail -n 1
  git rev-parse HEAD 2>/dev/null | sed 's/^/commit /'
  changed=$(git status --porcelain 2>/dev/null | wc -l)
  [ "$changed" -gt 0 ] && echo "working tree: $changed uncommitted change(s) (listed in logs/tests.log)"
} >> "$WORK/env.txt" 2>&1
TAG=$(sed -n 's/^device \(.*\), sm_.*/\1/p' "$WORK/env.txt" | tr 'A-Z' 'a-z' | sed 's/^nvidia //; s/[^a-z0-9]\+/-/g; s/-$//')
[ -n "$TAG" ] || TAG=cpu
OP_JSON="$OUT/$TAG-$STAMP-op.json" MODEL_JSON="$OUT/$TAG-$STAMP-model.json"
{ echo "===== environment"; cat "$WORK/env.txt"; echo; } | tee -a "$TESTS_LOG" >> "$BENCH_LOG"
git status --porcelain 2>/dev/null | sed 's/^/  changed: /' >> "$TESTS_LOG"

# ---------------------------------------------------------------- running a stage
ROWS=() FAILS=() BAD=0 N=0

pytest_counts() {  # "passed failed errors skipped" of the last pytest summary line in $1
  local line p f e s
  line=$(grep -E ' in [0-9.]+s' "$1" | grep -E 'passed|failed|skipped|error|no tests ran|deselected' | tail -n 1)
  p=$(grep -oE '[0-9]+ passed' <<<"$line" | grep -oE '^[0-9]+'); f=$(grep -oE '[0-9]+ failed' <<<"$line" | grep -oE '^[0-9]+')
  e=$(grep -oE '[0-9]+ errors?' <<<"$line" | grep -oE '^[0-9]+'); s=$(grep -oE '[0-9]+ skipped' <<<"$line" | grep -oE '^[0-9]+')
  echo "${p:-0} ${f:-0} ${e:-0} ${s:-0}"
}

# run_stage ID KIND LOG COMMAND...   KIND: pytest (judged by its summary line) or script (exit 0 =
# passed, 77 = skipped, lines "STEP: ..." / "RESULT: ..." give the detail).
run_stage() {
  local id=$1 kind=$2 log=$3; shift 3
  local var="GPU_RUN_BUDGET_${id^^}" budget t now status detail rc t0 dur p f e s
  N=$((N + 1))
  budget=${!var:-${BUDGET[$id]}}
  if [ -n "$ONLY" ] && [[ $ONLY != *",$id,"* ]]; then
    ROWS+=("| $N | $id | not run | | $budget | not in --only |"); return
  fi
  t=$budget; now=$(date +%s)
  if [ "$DEADLINE" -gt 0 ] && [ "$id" != report ]; then
    if [ $((DEADLINE - now)) -lt "$t" ]; then
      t=$((DEADLINE - now))
      if [ "$t" -lt "$MIN_STAGE_S" ]; then
        ROWS+=("| $N | $id | skipped | 0 | $budget | no time left: $t s to the run's deadline |")
        echo "[$id] skipped: no time left"; return
      fi
    fi
  fi
  local tmp="$WORK/$id.log"
  { echo "===== stage $N: $id ($(date -u +%T) UTC, budget ${t} s)"; printf '$'; printf ' %q' "$@"; echo; } > "$tmp"
  echo "[$id] started $(date -u +%T) UTC, budget ${t} s"
  t0=$(date +%s.%N)
  timeout -s INT -k 10 "$t" "$@" >> "$tmp" 2>&1
  rc=$?
  dur=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')
  local steps
  steps=$(sed -n 's/^\(STEP\|RESULT\): //p' "$tmp" | paste -sd '\t' - | sed 's/\t/; /g')
  if [ "$kind" = pytest ]; then
    read -r p f e s <<<"$(pytest_counts "$tmp")"
    detail="$p passed, $f failed, $e errors, $s skipped"
  else
    detail=${steps:-$(grep -v '^\s*$' "$tmp" | tail -n 1 | cut -c1-200)}
  fi
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    status="cut off"; detail="timeout after ${t} s; so far: $detail"; BAD=1
  elif [ "$kind" = pytest ] && [ $rc -eq 5 ] && [ "$s" = 0 ]; then
    status=failed; detail="no test selected (pytest exit status 5): the -k selection matches nothing"; BAD=1
  elif [ "$kind" = pytest ] && { [ $rc -eq 0 ] || [ $rc -eq 5 ]; } && [ "$p" = 0 ] && [ "$s" != 0 ]; then
    local why
    why=$(grep -m1 -E '^SKIPPED \[' "$tmp" | sed -E 's/^SKIPPED \[[0-9]+\] [^ ]+: //')
    status=skipped; detail="all $s selected tests skipped: ${why:-see the log}"
  elif [ $rc -eq 0 ]; then
    status=passed
  elif [ "$kind" = script ] && [ $rc -eq 77 ]; then
    status=skipped
  else
    status=failed; detail="exit status $rc; $detail"; BAD=1
  fi
  [ "$kind" = pytest ] && [ -n "$steps" ] && detail="$detail; $steps"
  ROWS+=("| $N | $id | $status | $dur | $t | ${detail//|/\\|} |")
  local failed
  failed=$(grep -E '^(FAILED|ERROR) ' "$tmp" | head -n 20)
  [ -n "$failed" ] && FAILS+=("**$id** ($(grep -cE '^(FAILED|ERROR) ' "$tmp") failing):" "$(sed 's/^/    /' <<<"$failed")")
  echo "[$id] $status in ${dur} s: $detail"
  # Keep the logs small: the head (the command, collection) and the tail (failures, summary).
  local lines
  lines=$(wc -l < "$tmp")
  if [ "$lines" -gt 3000 ]; then
    { head -n 500 "$tmp"; echo "... [$((lines - 3000)) lines left out] ..."; tail -n 2500 "$tmp"; } >> "$log"
  else
    cat "$tmp" >> "$log"
  fi
  echo "===== stage $id: $status in ${dur} s: $detail" >> "$log"; echo >> "$log"
}

# ---------------------------------------------------------------- stage bodies (run under timeout)
build_dry() {  # what the build needs, checked without building
  local cmd="TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) $PYTHON -m pip install --no-build-isolation --no-deps --no-index -e ."
  echo "dry run: would run: $cmd"
  "$PYTHON" -m pip --version || { echo "RESULT: $PYTHON -m pip is missing"; return 1; }
  "$PYTHON" -c "import setuptools, torch.utils.cpp_extension; print('setuptools', setuptools.__version__)" \
    || { echo "RESULT: setuptools or torch.utils.cpp_extension not importable"; return 1; }
  "$PYTHON" -c "compile(open('setup.py').read(), 'setup.py', 'exec')" || { echo "RESULT: setup.py does not compile"; return 1; }
  echo "nvcc: $(command -v nvcc || echo 'not on PATH (a GPU machine has it)')"
  echo "RESULT: dry run: pip, setuptools and setup.py checked; would run: $cmd"
  return 77
}
build_gpu() {
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e . \
    || { echo "RESULT: pip install failed (the later stages use whatever convit_kernels they find)"; return 1; }
  "$PYTHON" -c "
import convit_kernels as ck
status = ck.backend_status('cuda')
print(status)
print('RESULT: built; on cuda: ' + ', '.join(f'{k} {v}' for k, v in status.items() if k in ('cuda', 'triton', 'sdpa')))
"
}
export -f build_dry build_gpu

# ---------------------------------------------------------------- the stages
# 1. build
if [ $DRY = 1 ]; then run_stage build script "$TESTS_LOG" bash -c build_dry
else run_stage build script "$TESTS_LOG" bash -c build_gpu; fi

# 2-3. CUDA and Triton correctness (16-bit first). On CPU the `gpu` marker skips every selected test.
run_stage cuda pytest "$TESTS_LOG" "${PYTEST[@]}" -m gpu tests/test_fused_gpu.py tests/test_cuda_gpu.py \
  -k "(fused_cuda or test_cuda_gpu)${CUDA_K:+ and ($CUDA_K)}"
export CONVIT_KERNELS_TRITON_AUTOTUNE=$TEST_AUTOTUNE
run_stage triton16 pytest "$TESTS_LOG" "${PYTEST[@]}" "${XDIST[@]}" -m gpu \
  tests/test_fused_gpu.py tests/test_triton_gpu.py -k "(fused_triton or test_triton_gpu) and ($TRITON16_K)"

# 4. op timing (autotuned Triton: the figures are the product)
export CONVIT_KERNELS_TRITON_AUTOTUNE=1
run_stage op pytest "$BENCH_LOG" "${PYTEST[@]}" benchmarks/bench_op.py --benchmark-only \
  --benchmark-json "$OP_JSON" ${OP_K:+-k "$OP_K"}

# 5. timm's ConViT with our GPSA
export CONVIT_KERNELS_TRITON_AUTOTUNE=$TEST_AUTOTUNE
if [ -f tests/test_timm.py ]; then
  run_stage timm pytest "$TESTS_LOG" "${PYTEST[@]}" -m gpu tests/test_timm.py
else
  N=$((N + 1)); ROWS+=("| $N | timm | skipped | 0 | ${BUDGET[timm]} | tests/test_timm.py not found |")
fi

# 6. model training step
export CONVIT_KERNELS_TRITON_AUTOTUNE=1
run_stage model pytest "$BENCH_LOG" "${PYTEST[@]}" benchmarks/bench_model.py --benchmark-only \
  --benchmark-json "$MODEL_JSON" ${MODEL_K:+-k "$MODEL_K"}

# 7. Triton fp32 and the rest of its tests
export CONVIT_KERNELS_TRITON_AUTOTUNE=$TEST_AUTOTUNE
run_stage triton32 pytest "$TESTS_LOG" "${PYTEST[@]}" "${XDIST[@]}" -m gpu \
  tests/test_fused_gpu.py tests/test_triton_gpu.py -k "(fused_triton or test_triton_gpu) and ($TRITON32_K)"

# 8. compute-sanitizer
if [ $DRY = 1 ]; then
  run_stage sanitize script "$TESTS_LOG" "$PYTHON" benchmarks/gpu_sanitize_case.py --dry-run
else
  run_stage sanitize script "$TESTS_LOG" "$PYTHON" benchmarks/gpu_sanitize_case.py
fi

# 9. the RESULTS table from this run's JSON
JSONS=()
for j in "$OP_JSON" "$MODEL_JSON"; do [ -s "$j" ] && JSONS+=("$j"); done
if [ ${#JSONS[@]} -gt 0 ]; then
  run_stage report script "$BENCH_LOG" "$PYTHON" benchmarks/report.py "${JSONS[@]}" -o "$OUT/RESULTS.md"
else
  N=$((N + 1)); ROWS+=("| $N | report | skipped | 0 | ${BUDGET[report]} | no benchmark JSON was written |")
fi

# ---------------------------------------------------------------- the summary
END=$(date +%s)
{
  echo "# GPU run: $PROFILE profile$([ $DRY = 1 ] && echo ', CPU rehearsal (--dry-run)')"
  echo
  echo "- Command: \`bash benchmarks/gpu_run.sh OUT $PROFILE$([ $DRY = 1 ] && echo ' --dry-run')${ONLY:+ --only ${ONLY:1:-1}}\` (PYTHON=$PYTHON)"
  echo "- Started $(date -u -d "@$START" '+%F %T') UTC, took $((END - START)) s$([ "$TOTAL" -gt 0 ] && echo " (deadline $TOTAL s)")$([ $DRY = 1 ] && echo '; dry run: stage budgets x3')"
  sed 's/^/- /' "$WORK/env.txt"
  echo "- Overall: $([ $BAD = 0 ] && echo 'no stage failed or was cut off' || echo 'SOME STAGES FAILED OR WERE CUT OFF')"
  echo
  echo "| # | stage | status | time s | budget s | detail |"
  echo "|---|---|---|---:|---:|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  if [ ${#FAILS[@]} -gt 0 ]; then
    echo "## Failing tests"; echo; printf '%s\n' "${FAILS[@]}"; echo
  fi
  echo "## Files"
  echo
  (cd "$OUT" && find . -type f ! -name SUMMARY.md | sort | sed 's|^\./|- |')
  echo "- SUMMARY.md"
  echo
  echo "Logs: logs/tests.log (build, cuda, triton16, timm, triton32, sanitize), logs/bench.log (op, model, report)."
  echo "To publish: copy the JSON files to benchmarks/results/ and run \`python3 benchmarks/report.py\`."
} > "$OUT/SUMMARY.md"
cat "$OUT/SUMMARY.md"
exit $BAD
