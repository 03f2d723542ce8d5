#!/usr/bin/env bash
# `make demo-models` on a lent GPU, as one command: VAE -> both teachers (in parallel) -> style LoRAs and both
# LCM-LoRAs (in parallel), written into lcmtool/demo/assets of the device's copy of the tree; then, time allowing,
# the held-out check of the teachers (DPM-Solver++ 25 steps, CFG 7.5) and of LCM 4 steps. Results are packed
# into $OUT for the trip back (the device tool returns at most 8 files of 16 MiB).
# The device image has no .venv: run it with python3 and diffusers from carried wheels, e.g.
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   bash scripts/gpu_demo_models.sh
# The whole recipe needs ~20 minutes on an H200 (README), more than the lent device's 10-minute command limit: there,
# run the waves as chained calls on the warm machine (`--stage vae`, `teacher-sd` + `teacher-xl`, then the rest).
# LIMIT caps the recipe's wall time (s); TEACHER_S caps each teacher's training loop (the cosine schedule is fitted
# to the cap when the recipe's steps would not fit, and train.json records the steps done).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; A=lcmtool/demo/assets; W=/tmp/demo-train
LIMIT=${LIMIT:-500}; TEACHER_S=${TEACHER_S:-240}; EVAL_BY=${EVAL_BY:-470}
DEVICE=${DEVICE:-cuda}; EXTRA=${EXTRA:-}  # a CPU dry run in a scratch copy: DEVICE=cpu EXTRA="--quick --distill-steps 2 --parallel yes"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
s=$SECONDS
timeout "$LIMIT" python3 -m lcmtool.demo.train --stage all --out $A --work $W --device "$DEVICE" --max-seconds "$TEACHER_S" $EXTRA \
  > "$OUT/demo-models.log" 2>&1
rc=$?
grep -a "demo-train" "$OUT/demo-models.log" | grep -av "Loading\|Writing" | tail -n 25
echo "demo-models: wall $((SECONDS - s)) s, exit $rc"
for f in "$W"/*.log; do echo "== $f"; grep -a "demo-train\|step 1200\|samples/s elapsed" "$f" | tail -n 4; done
tar czf "$OUT/demo-sd.tgz" -C $A demo-sd
tar czf "$OUT/demo-xl.tgz" -C $A demo-xl
tar czf "$OUT/rest.tgz" -C $A $(cd $A && ls | grep -v '^demo-')
tar czf "$OUT/work.tgz" -C "$W" --exclude=checkpoints --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' .
[ "$rc" = 0 ] || exit "$rc"
# held-out check on the GPU (the CPU report, scripts/demo_report.sh, is the one the README quotes)
python3 -c "from lcmtool.demo.world import heldout_prompts; print('\n'.join(heldout_prompts()))" > /tmp/heldout.txt
for m in sd xl; do
  for run in "dpmpp --steps 25 --guidance 7.5" "lcm --steps 4"; do
    [ $SECONDS -lt "$EVAL_BY" ] || { echo "eval skipped (time)"; break 2; }
    d=/tmp/ev-$m-${run%% *}
    python3 -m lcmtool sample --model demo:$m --prompts /tmp/heldout.txt --num-images 2 --batch-size 80 --seed 0 \
      --out "$d" --scheduler $run --json > "$d.jsonl" 2>/dev/null
    python3 -m lcmtool eval "$d" --json 2>/dev/null | python3 -c "import json,sys; d=json.load(sys.stdin); \
print('$m $run', {k: round(v, 3) for k, v in d.items() if isinstance(v, float)})" | tee -a "$OUT/eval.txt"
  done
done
echo "all done at $SECONDS s"
