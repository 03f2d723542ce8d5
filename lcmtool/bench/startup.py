"""`bench_startup()`: the wall time of a one-image `lcmtool sample` command against a bare
`from diffusers import StableDiffusionPipeline` in a fresh interpreter (issue 14's start-up target: <= 1.1x).

All run as child processes of the same Python, in alternation, `rounds` times after one warm-up round each (the
OS file cache is then warm for all); the rows give the median wall seconds and each one's ratio to the bare
import. The import is most of a short command's time on a CPU machine (diffusers pulls torch, transformers and
peft); what lcmtool adds is its own imports (typer, rich, pydantic), loading the model, reading and fusing the
LoRA, the sampling and the PNG. The many-prompts path (`--prompts FILE` or `-`) pays that once per process.

The command imports those libraries with the garbage collector paused (lcmtool.startup), which a plain
`python -c` import does not. So that the figure says what that buys and what lcmtool itself costs, two more
rows time the bare import with the same pause (`bare_import_gc_paused`: the command's ratio to it is lcmtool's
own share) and the command without it (`LCMTOOL_GC_PAUSE=0`).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lcmtool.errors import LcmError

PROMPT = "a large red circle on the left"
BARE = "from diffusers import StableDiffusionPipeline"
BARE_PAUSED = f"import gc; gc.disable(); {BARE}; gc.freeze(); gc.enable()"  # what lcmtool.startup does


def _wall(argv: list[str], env: dict | None = None) -> float:
    t = time.perf_counter()
    res = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=None if env is None else {**os.environ, **env})
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise LcmError(f"bench --startup: {' '.join(argv[1:4])} ... exited {res.returncode}: {tail}")
    return time.perf_counter() - t


def bench_startup(model: str = "demo:sd", rounds: int = 3, device: str = "cpu", log=print) -> list[dict]:
    """Rows for the bare import and the one-image command: median wall seconds over `rounds` alternating runs."""
    from lcmtool.models.load import resolve_model

    if rounds < 1:
        raise LcmError(f"--rounds must be >= 1, got {rounds}")
    resolve_model(model)  # a missing model is told before any process starts
    with tempfile.TemporaryDirectory(prefix="lcmtool-startup-") as tmp:
        def command(i: int) -> list[str]:
            return [sys.executable, "-m", "lcmtool", "sample", "--model", model, "--prompt", PROMPT,
                    "--num-images", "1", "--device", device, "--out", str(Path(tmp) / f"r{i}"), "--json"]

        fns = {"bare_import": lambda i: _wall([sys.executable, "-c", BARE]),
               "bare_import_gc_paused": lambda i: _wall([sys.executable, "-c", BARE_PAUSED]),
               "lcmtool_sample_one_image": lambda i: _wall(command(i)),
               "lcmtool_sample_one_image_no_gc_pause": lambda i: _wall(command(-1 - i), {"LCMTOOL_GC_PAUSE": "0"})}
        for fn in fns.values():  # warm-up: file cache, first-run caches of either
            fn(0)
        walls: dict[str, list[float]] = {k: [] for k in fns}
        for i in range(rounds):
            for name, fn in fns.items():
                walls[name].append(fn(i + 1))
    bare = statistics.median(walls["bare_import"])
    paused = statistics.median(walls["bare_import_gc_paused"])
    rows = []
    for name, ws in walls.items():
        med = statistics.median(ws)
        rows.append({"case": "one_image_command", "path": name, "model": model, "device": device,
                     "rounds": rounds, "wall_s": round(med, 3), "wall_s_all": [round(w, 3) for w in ws],
                     "ratio_vs_bare_import": round(med / bare, 3),
                     "ratio_vs_bare_import_gc_paused": round(med / paused, 3), "target_ratio": 1.1})
        log(f"{'one-image command':>18}  {name:<37} {med:7.2f} s (median of {rounds})  x{med / bare:.3f} "
            f"the bare import, x{med / paused:.3f} the paused one")
    return rows
