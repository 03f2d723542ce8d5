#!/usr/bin/env bash
# The demo-models recipe on one GPU, stage by stage, teachers in parallel (the tiny UNets are launch-bound,
# so two processes share one GPU well). Usage: scripts/gpu_demo_models.sh OUT_ASSETS WORK PHASE
# PHASE 1: VAE, then both teachers.  PHASE 2: style LoRAs and LCM distillation for both families.
# With PACK=DIR set, results are packed as .tgz files into DIR.
set -uo pipefail
OUT=${1:?assets dir}; WORK=${2:?work dir}; PHASE=${3:-1}
mkdir -p "$OUT" "$WORK"
timed() { local s=$SECONDS; "$@"; local rc=$?; echo "wall $((SECONDS - s)) s (rc $rc): $*"; return $rc; }
T="python3 -m lcmtool.demo.train --out $OUT --work $WORK --device cuda"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "$PHASE" = 1 ]; then
  timed $T --stage vae --max-seconds 100 || exit 1
  timed $T --stage teacher-sd --max-seconds 270 > "$WORK/teacher-sd.log" 2>&1 &
  timed $T --stage teacher-xl --max-seconds 270 > "$WORK/teacher-xl.log" 2>&1 &
  wait
  tail -n 4 "$WORK"/teacher-*.log
else
  for s in style-sd lcm-sd lcm-xl; do
    timed timeout 250 $T --stage $s --max-seconds 120 > "$WORK/$s.log" 2>&1 &
  done
  wait
  tail -n 6 "$WORK"/style-*.log "$WORK"/lcm-*.log
fi
ls -la "$OUT"
# pack for the trip back (the device tool returns at most 8 files of 16 MiB)
if [ -n "${PACK:-}" ]; then
  for d in "$OUT"/demo-sd "$OUT"/demo-xl; do [ -d "$d" ] && [ "$PHASE" = 1 ] && tar czf "$PACK/$(basename "$d").tgz" -C "$OUT" "$(basename "$d")"; done
  [ "$PHASE" = 2 ] && tar czf "$PACK/phase2.tgz" -C "$OUT" $(cd "$OUT" && ls | grep -v '^demo-') -C "$WORK" --exclude=checkpoints $(cd "$WORK" && ls -d lcm-run-* 2>/dev/null)
  tar czf "$PACK/logs$PHASE.tgz" -C "$WORK" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' . 2>/dev/null
  ls -la "$PACK"
fi
