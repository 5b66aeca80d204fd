#!/usr/bin/env bash
# Build, test and benchmark on a GPU machine (see ../shared/GPU.md); logs and JSON go to OUT_DIR.
#
#   bash benchmarks/gpu_run.sh OUT_DIR [STAGE ...]
#
# Stages (default: all of them, in this order):
#   build        TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation --no-deps -e .
#   test         pytest tests -m gpu (the GPU tests), then the backend status
#   op           the op benchmarks            -> OUT_DIR/<gpu>-<date>-op.json
#   model        the eager model benchmarks   -> OUT_DIR/<gpu>-<date>-model.json
#   compile      the compiled model subset    -> OUT_DIR/<gpu>-<date>-compile.json
#   report       OUT_DIR/RESULTS.md from the JSON files in OUT_DIR
# Each stage fits in a 10-minute command on an H100, so they can also be run one per call. To
# publish: copy the JSON files into benchmarks/results/ and run `python benchmarks/report.py`.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_run.sh OUT_DIR [build|test|op|model|compile|report ...]}
shift
STAGES=${*:-build test op model compile report}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
STAMP=$(date -u +%Y-%m-%d)
# This run is what verifies the CUDA kernels: measure them even while they are opt-in.
export CONVIT_KERNELS_ENABLE_CUDA=1
STATUS=0

gpu_tag() {
  python -c "import torch; print(torch.cuda.get_device_name(0).lower().replace('nvidia ', '').replace(' ', '-'))"
}

run_bench() {  # name, then pytest arguments
  local name=$1; shift
  local json="$OUT/$(gpu_tag)-$STAMP-$name.json"
  echo "== benchmarks ($name) -> $json"
  python -m pytest --benchmark-only -p no:cacheprovider --benchmark-json "$json" "$@" \
    > "$OUT/bench-$name.log" 2>&1
  local rc=$?
  tail -n 5 "$OUT/bench-$name.log"
  [ $rc -eq 0 ] || { echo "benchmarks ($name) failed: rc=$rc (see bench-$name.log)"; STATUS=1; }
}

for stage in $STAGES; do
  case $stage in
    build)
      echo "== build"
      { nvidia-smi; python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } \
        > "$OUT/env.txt" 2>&1
      if ! TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
        tail -n 40 "$OUT/build.log"; echo "build failed (see build.log)"; exit 1
      fi
      ;;
    test)
      echo "== GPU tests"
      python -c "import convit_kernels as ck; print(ck.backend_status('cuda'))" | tee "$OUT/backends.txt"
      python -m pytest tests -m gpu -ra -p no:cacheprovider > "$OUT/gpu-tests.log" 2>&1 || STATUS=1
      tail -n 15 "$OUT/gpu-tests.log"
      ;;
    op) run_bench op benchmarks/bench_op.py ;;
    model) run_bench model benchmarks/bench_model.py -k eager ;;
    compile) run_bench compile benchmarks/bench_model.py -k "compile" ;;
    report)
      python benchmarks/report.py "$OUT"/*.json -o "$OUT/RESULTS.md" || STATUS=1
      ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
exit $STATUS
