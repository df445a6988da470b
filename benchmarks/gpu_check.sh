#!/usr/bin/env bash
# The one run for a machine with an NVIDIA GPU: build the CUDA kernels, run every CUDA test, then the GPU benchmarks.
# Each stage runs under its own time limit and appends its output to OUT/log.txt as it goes; the benchmarks also
# append their results to OUT/*.jsonl one line per measurement (and the claims plot to OUT/gpu_claims.png), so a run
# cut short still leaves every number measured so far. Total limit ~15 minutes (the sum of the stage limits).
#
# Usage (from the repository root): bash benchmarks/gpu_check.sh [OUT]      (OUT defaults to gpu_results/)
#   GPU_CHECK_STAGES="1 2 3 4" runs only those stages (numbered from 1 in the list below), so the run can be split
#   over calls shorter than the total: e.g. "1 2 3 4", then "1 5 6 7" (the second build loads the first one's cache).
#   PYTHON=... picks the interpreter (default .venv/bin/python); it needs a CUDA build of torch, pytest, peft,
#   and optionally flash-linear-attention (the comparison anchor of bench_wkv6_cuda.py and bench_wkv7_cuda.py) and
#   matplotlib (the plot).
# Exit status 1 if any stage failed or ran out of time; every stage runs regardless.
#
# Adding a stage (WKV7's kernels, ...): one more `stage NAME LIMIT_SECONDS COMMAND...` line in the list below.
set -uo pipefail
PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${1:-gpu_results}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
status=0
stage_number=0

stage() {  # stage NAME LIMIT_SECONDS COMMAND...: run COMMAND under the limit, its output to the terminal and the log
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  stage_number=$((stage_number + 1))
  if [ -n "${GPU_CHECK_STAGES:-}" ] && [[ " $GPU_CHECK_STAGES " != *" $stage_number "* ]]; then
    echo "=== stage $stage_number ($name): skipped (GPU_CHECK_STAGES=$GPU_CHECK_STAGES) ===" | tee -a "$LOG"
    return
  fi
  echo "=== $name (limit ${limit} s) ===" | tee -a "$LOG"
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && echo "!!! $name: out of time after ${limit} s" | tee -a "$LOG"
  echo "=== $name: exit $rc, $((SECONDS - start)) s ===" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
}

"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'" || exit 1
{
  echo "# gpu_check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
} | tee -a "$LOG"

# build() raises with nvcc's full output, where a call of the op would only warn and fall back to torch; each op is
# built whatever happened to the other, so one failure does not hide the other's result
BUILD='import sys, time, torch
from visualrwkv_hf.ops import wkv6_compiled, wkv7_compiled
failed = False
for op in (wkv6_compiled, wkv7_compiled):
    start = time.perf_counter()
    try:
        op.build("cuda")
    except Exception as error:
        failed = True
        print(f"CUDA {op.name.upper()} build FAILED: {type(error).__name__}: {error}", flush=True)
        continue
    print(f"{torch.cuda.get_device_name()}: CUDA {op.name.upper()} kernels built and loaded in {time.perf_counter() - start:.0f} s")
sys.exit(1 if failed else 0)'

# ---- the stages, in order ----
stage "build the CUDA WKV6 and WKV7 kernels" 240 "$PYTHON" -c "$BUILD"
stage "CUDA tests" 120 "$PYTHON" -m pytest -q -p no:cacheprovider -rs -k "cuda and not nvcc" \
  tests/test_ops_wkv6_chunked.py tests/test_ops_wkv6_fla.py tests/test_ops_kernels.py tests/test_decode_graph.py \
  tests/test_ops_wkv7.py
stage "bench_wkv6_cuda (kernels vs fla, accuracy, crossover, 12 x 768 model)" 90 \
  "$PYTHON" benchmarks/bench_wkv6_cuda.py --repeats 3 --output "$OUT/bench_wkv6_cuda.jsonl"
stage "CUDA WKV7 chunked kernel tests" 150 "$PYTHON" -m pytest -q -p no:cacheprovider -rs -k cuda \
  tests/test_ops_wkv7_chunked.py
stage "bench_wkv7_cuda (chunked vs step kernel vs fla chunk_rwkv7 vs torch; accuracy; crossover)" 120 \
  "$PYTHON" benchmarks/bench_wkv7_cuda.py --repeats 3 --output "$OUT/bench_wkv7_cuda.jsonl"
stage "bench_decode_graph (12 x 768 bf16: eager vs CUDA-graph decode)" 40 \
  "$PYTHON" benchmarks/bench_decode_graph.py --output "$OUT/bench_decode_graph.jsonl"
stage "bench_gpu_claims (VisualRWKV vs LLaVA, 1.6B size, 1K-24K; LoRA step)" 120 \
  "$PYTHON" benchmarks/bench_gpu_claims.py --output "$OUT/gpu_claims.jsonl" --plot "$OUT/gpu_claims.png"
exit $status
