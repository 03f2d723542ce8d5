#!/usr/bin/env bash
# Regenerates the README's figures in docs/: `make demo`'s four images as one strip, the Figure-3-style compare grids
# for both demo teachers, and the style-merge montage from the outputs of scripts/demo_report.sh (run that first).
# CPU, about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
L=${LCMTOOL:-.venv/bin/lcmtool}
PY=${PYTHON:-.venv/bin/python}
# make demo's command (Makefile), its 4 images side by side with 8 px gaps
rm -rf outputs/demo
$L sample --steps 4 --prompt "a large red circle on the left" --num-images 4 --out outputs/demo > /dev/null
$PY - <<'PY'
from pathlib import Path
from PIL import Image
ims = [Image.open(p).convert("RGB").resize((128, 128)) for p in sorted(Path("outputs/demo").glob("*.png"))]
strip = Image.new("RGB", (len(ims) * 136 - 8, 128), "white")
for i, im in enumerate(ims):
    strip.paste(im, (i * 136, 0))
strip.save("docs/make-demo.png")
print("docs/make-demo.png:", len(ims), "images")
PY
for m in sd xl; do
  $L compare --model demo:$m --prompts docs/compare-prompts.txt --num-images 1 \
    --out docs/compare-demo-$m.png > /dev/null
done
$PY - <<'PY'
# rows: 6 held-out outline prompts, 2 seeds each; columns: teacher + tau_style (DPM-Solver++ 25, CFG 7.5),
# 0.8 tau_style + tau_LCM merged (LCM 4, guidance 1), tau_LCM alone (LCM 4)
import json
from PIL import Image, ImageDraw
R = "outputs/report"
cols = [("sd-style-dpmpp25-cfg7.5", "teacher + tau_style, DPM++ 25, w=7.5"),
        ("sd-merged-lcm4", "0.8 tau_style + tau_LCM, LCM 4, w=1"), ("sd-lcm4-nostyle", "tau_LCM only, LCM 4, w=1")]
recs = {name: [json.loads(x) for x in open(f"{R}/{name}.samples.jsonl")] for name, _ in cols}
prompts = list(dict.fromkeys(r["prompt"] for r in recs[cols[0][0]]))
rows = prompts[::max(1, len(prompts) // 6)][:6]
s, gap, head = 96, 8, 20
img = Image.new("RGB", (len(cols) * (2 * s + gap), head + len(rows) * (s + gap)), "white")
d = ImageDraw.Draw(img)
for c, (name, label) in enumerate(cols):
    x0 = c * (2 * s + gap)
    d.text((x0 + 2, 4), label, fill="black")
    for r, p in enumerate(rows):
        for k, rec in enumerate([x for x in recs[name] if x["prompt"] == p][:2]):
            img.paste(Image.open(rec["path"]).convert("RGB").resize((s, s)), (x0 + k * s, head + r * (s + gap)))
img.save("docs/style-merge-demo-sd.png")
print("docs/style-merge-demo-sd.png:", rows)
PY
