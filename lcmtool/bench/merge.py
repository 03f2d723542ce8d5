"""`lcmtool bench --merge`: merge two SDXL-size LoRAs (rank 64, real SDXL module set, random values).

Targets (issue 5, 2-core machine): concat under 10 s, svd --rank 64 under 60 s, peak memory under 3x the inputs.
Each merge runs in a fresh Python process, so its peak RSS (the child's VmHWM, plus psutil sampling) is the
merge's own and not what writing the synthetic inputs left behind; an import-only child gives the baseline
(Python + torch + lcmtool) that every run pays. The load average is reported beside the figures: on a shared
2-core machine the timings move with it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

_CHILD = r"""
import json, sys, time
from lcmtool.engines.merge import MergeConfig, run_merge
args = json.loads(sys.argv[1])
t = time.perf_counter()
rep = run_merge(MergeConfig(**args)) if args else {}
secs = time.perf_counter() - t
# VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss across exec, so a child would inherit the parent's peak
hwm = [int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0] / 1024
print(json.dumps({"s": secs, "maxrss_MiB": hwm, "svd_rel_error": rep.get("svd_rel_error")}))
"""


def _run_child(args: dict) -> dict:
    """Run one merge in a fresh interpreter; returns its time, peak RSS (getrusage and psutil samples)."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        try:
            p = psutil.Process(proc.pid)
            while proc.poll() is None:
                peak[0] = max(peak[0], p.memory_info().rss)
                time.sleep(0.02)
        except psutil.Error:
            pass

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"bench child failed ({proc.returncode}): {err.strip()[-2000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    res["sampled_rss_MiB"] = peak[0] / 2**20
    return res


def bench_merge(rank: int = 64, family: str = "sdxl", dtype: torch.dtype = torch.float16, svd_rank: int = 64,
                workdir: str | None = None, echo=print) -> dict:
    """Time `run_merge` concat and svd on two synthetic LoRAs written to disk; returns and prints the figures."""
    from lcmtool.lora import fit, synth
    from lcmtool.lora.io import save_lora

    shapes = synth.target_shapes(synth.meta_unet(family))
    fit.family_shapes(family)  # the family's module table, built once and kept on disk: not what a merge costs
    res: dict = {"family": family, "rank": rank, "dtype": str(dtype).replace("torch.", ""), "modules": len(shapes),
                 "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        d = Path(d)
        for i, name in enumerate(("style", "lcm")):
            lf = synth.synth_lora(shapes, rank=rank, alpha=rank / 2, seed=i, dtype=dtype, family=family)
            save_lora(lf, d / f"{name}.safetensors", family=family)
            res["params_per_input_M"] = round(sum(m.A.numel() + m.B.numel() for m in lf.modules.values()) / 1e6, 1)
            del lf
        in_mib = sum((d / f"{n}.safetensors").stat().st_size for n in ("style", "lcm")) / 2**20
        res["input_MiB"] = round(in_mib, 1)
        base = _run_child({})
        res["baseline_rss_MiB"] = round(max(base["maxrss_MiB"], base["sampled_rss_MiB"]), 1)
        for method, r in (("concat", None), ("svd", svd_rank)):
            res[f"{method}_load_before"] = round(os.getloadavg()[0], 2)
            c = _run_child(dict(style=str(d / "style.safetensors"), lcm=str(d / "lcm.safetensors"), method=method,
                                rank=r, out=str(d / f"out_{method}.safetensors")))
            peak = max(c["maxrss_MiB"], c["sampled_rss_MiB"])
            res[f"{method}_s"] = round(c["s"], 2)
            res[f"{method}_load_after"] = round(os.getloadavg()[0], 2)
            res[f"{method}_peak_rss_MiB"] = round(peak, 1)
            res[f"{method}_peak_minus_baseline_MiB"] = round(peak - res["baseline_rss_MiB"], 1)
            res[f"{method}_peak_over_inputs"] = round(peak / in_mib, 2)
            res[f"{method}_out_MiB"] = round((d / f"out_{method}.safetensors").stat().st_size / 2**20, 1)
            if method == "svd":
                res["svd_rel_error_max"] = c["svd_rel_error"]["max"]
                res["svd_rel_error_mean"] = c["svd_rel_error"]["mean"]
    for k, v in res.items():
        echo(f"{k:>24}: {v}")
    return res


if __name__ == "__main__":
    bench_merge(echo=lambda s: print(s, file=sys.stderr))
