#!/usr/bin/env bash
# Device checks (issues 4, 6 and 14), one prepared script for a lent GPU, in one call:
#   1. the sampling loop's GPU tests: no host-device sync inside the loop, fp16 images == diffusers' pipeline,
#      the compiled loop == the eager one (tests/test_sample_gpu.py, tiny demo models);
#   2. bench_sample on the real SD-1.5 architecture (random weights, 512 px): DPM-Solver++ 25 CFG 7.5 and LCM 4 steps
#      at batch 1 and 16, plain diffusers (peft adapter unfused, then fused) vs lcmtool eager and compiled
#      (torch.compile mode reduce-overhead = CUDA graphs), every row with outputs_match;
#   3. the same on SDXL (1024 px), LCM 4 steps at batch 1;
#   4. bench --distill (our LCD step vs the plain reference loop, samples/s and peak memory);
#   5. if time is left: SD-1.5 LCM at batch 1 with the other compile mode (max-autotune-no-cudagraphs), so that
#      the default mode is chosen by measurement.
# Each step has its own timeout and the whole script a budget (BUDGET seconds, default 500: it fits the device's
# 10-minute command limit with room, and a rerun of the steps that failed fits the session: ONLY="bench_sdxl ...").
# Rows go to $OUT/<step>.jsonl, logs to $OUT/<step>.txt. On the device image diffusers may be missing: run with
# `carry: [".whl"]` holding diffusers + importlib_metadata wheels.
set -u
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp} HF_HUB_OFFLINE=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$OUT/inductor-cache}
BUDGET=${BUDGET:-500}
ONLY=${ONLY:-}
T0=$SECONDS
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1

step() {  # step NAME TIMEOUT CMD...: run CMD if ONLY allows it and the budget has TIMEOUT (or at least 60 s) left
  local name=$1 limit=$2
  shift 2
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  local left=$((BUDGET - (SECONDS - T0)))
  if [ "$left" -lt 60 ]; then echo "== $name: skipped (budget spent)"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s, $((SECONDS - T0))s used)"
  timeout "$limit" "$@" > "$OUT/$name.jsonl" 2> "$OUT/$name.txt"
  echo "   exit $? after $((SECONDS - T0))s"
  { tail -n 4 "$OUT/$name.jsonl"; tail -n 14 "$OUT/$name.txt"; } | grep -v -i warn | cut -c1-400
}

step gpu_tests 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_sample_gpu.py
step bench_sd15 170 python3 -m lcmtool.bench.sample model=random:sd15 device=cuda batches=1,16 n=5 warm=1
step bench_sdxl 150 python3 -m lcmtool.bench.sample model=random:sdxl device=cuda batches=1 dpm_steps=0 n=3 warm=1
step bench_distill 110 python3 -m lcmtool bench --distill --device cuda --json
step bench_sd15_mode2 90 env LCMTOOL_COMPILE_MODE=max-autotune-no-cudagraphs python3 -m lcmtool.bench.sample \
  model=random:sd15 device=cuda batches=1 dpm_steps=0 n=5 warm=1
echo "== done in $((SECONDS - T0))s; rows in $OUT/*.jsonl"
