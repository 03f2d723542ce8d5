#!/usr/bin/env bash
# Device checks (issues 4 and 6), one script for a lent GPU: the sample engine's GPU tests (no host sync in the
# denoising loop), bench_sample on the real SD-1.5 / SDXL architectures (random weights), then bench_distill
# (our LCD step vs the plain reference loop, samples/s and peak memory). About 6-8 minutes on an H200.
# On the device image diffusers is missing: run with `carry: [".whl"]` holding diffusers + importlib_metadata.
set -u
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp}
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_sample_gpu.py 2>&1 | tail -15
for m in random:sd15 random:sdxl; do  # ~1-2 min each on an H200
  timeout 150 python3 -m lcmtool.bench.sample model=$m n=3 warm=1 2>&1 | tail -8 | tee -a "$OUT/bench_sample.txt"
done
timeout 240 python3 -m lcmtool bench --distill --device cuda --json 2>&1 | tail -8 | tee -a "$OUT/bench_distill.txt"
