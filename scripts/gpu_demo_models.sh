#!/usr/bin/env bash
# `make demo-models` on a lent GPU: VAE -> both teachers (in parallel) -> style LoRAs and both LCM-LoRAs (in
# parallel), written into lcmtool/demo/assets of the device's copy of the tree, and packed into $OUT for the trip
# back (the device tool returns at most 8 files of 16 MiB).
# The lent device allows 10 minutes per command and the recipe needs ~9 on an H200, so it runs as two calls on the
# warm machine: PART=1 (waves 1-2: VAE, teachers; ~5 min) then PART=2 (wave 3: style + LCM LoRAs; ~4.5 min).
# PART=all runs the three waves as one command. Intermediates live in runs/demo-train (git-ignored, so they stay
# on a warm machine between calls); PART=2 on a fresh machine restores PART=1's results from a carried .demo-models/
# (the tgz files PART=1 wrote to $OUT).
# The device image has no .venv: start with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# A CPU dry run in a scratch copy: DEV=cpu EXTRA="--quick --distill-steps 2" PART=all bash scripts/gpu_demo_models.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
A=lcmtool/demo/assets; W=runs/demo-train; OUT=${OUT:-/tmp/out}; PART=${PART:-all}
DEV=${DEV:-cuda}; EXTRA=${EXTRA:-}
mkdir -p "$OUT" "$W"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
s=$SECONDS
waves() {  # waves LIMIT_S LIST
  timeout "$1" python3 tools/demo_models.py --stage all --waves "$2" --out $A --work $W --device "$DEV" $EXTRA \
    > "$OUT/waves-${2//,/}.log" 2>&1
  local rc=$?
  echo "waves $2: exit $rc at $((SECONDS - s)) s"
  grep -a "demo-train" "$OUT/waves-${2//,/}.log" | grep -av "Loading\|Writing" | tail -n 6
  for f in "$W"/*.log; do [ -f "$f" ] && grep -aq "demo-train\|samples/s" "$f" && { echo "== $f"; grep -a "done\|ms/step\|step 1200" "$f" | tail -n 3; }; done
  return $rc
}
case "$PART" in
  1) waves 450 1,2; rc=$?
     tar czf "$OUT/demo-sd.tgz" -C $A demo-sd; tar czf "$OUT/demo-xl.tgz" -C $A demo-xl
     tar czf "$OUT/work12.tgz" -C $W vae timings.json $(cd $W && ls *.log 2>/dev/null)
     exit $rc ;;
  2) if [ ! -f $W/vae/config.json ]; then  # a fresh machine: PART=1's results come from the carried .demo-models/
       echo "restoring waves 1-2 from .demo-models/"
       tar xzf .demo-models/demo-sd.tgz -C $A && tar xzf .demo-models/demo-xl.tgz -C $A \
         && tar xzf .demo-models/work12.tgz -C $W || exit 1
     fi
     waves 540 3; rc=$? ;;
  all) waves 1500 1,2,3; rc=$?
     tar czf "$OUT/demo-sd.tgz" -C $A demo-sd; tar czf "$OUT/demo-xl.tgz" -C $A demo-xl ;;
  *) echo "PART must be 1, 2 or all" >&2; exit 2 ;;
esac
tar czf "$OUT/rest.tgz" -C $A $(cd $A && ls | grep -v '^demo-')
tar czf "$OUT/work.tgz" -C $W --exclude=checkpoints --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' .
exit $rc
