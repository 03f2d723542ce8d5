"""`lcmtool bench --merge`: merge two SDXL-size LoRAs (rank 64, real SDXL module set, random values).

Targets (issue 5, 2-core machine): concat under 10 s, svd --rank 64 under 60 s, peak memory under 3x the inputs.
"""
from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

import torch


def _rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_merge(rank: int = 64, family: str = "sdxl", dtype: torch.dtype = torch.float16, svd_rank: int = 64,
                workdir: str | None = None, echo=print) -> dict:
    """Time `run_merge` concat and svd on two synthetic LoRAs written to disk; returns and prints the figures."""
    from lcmtool.lora import synth
    from lcmtool.lora.engine import MergeConfig, run_merge
    from lcmtool.lora.io import save_lora

    shapes = synth.target_shapes(synth.meta_unet(family))
    res: dict = {"family": family, "rank": rank, "dtype": str(dtype).replace("torch.", ""), "modules": len(shapes),
                 "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        d = Path(d)
        for i, name in enumerate(("style", "lcm")):
            lf = synth.synth_lora(shapes, rank=rank, alpha=rank / 2, seed=i, dtype=dtype, family=family)
            save_lora(lf, d / f"{name}.safetensors", family=family)
            res["params_per_input_M"] = round(sum(m.A.numel() + m.B.numel() for m in lf.modules.values()) / 1e6, 1)
            del lf
        res["input_MiB"] = round(sum((d / f"{n}.safetensors").stat().st_size for n in ("style", "lcm")) / 2**20, 1)
        rss0 = _rss_mb()
        for method, r in (("concat", None), ("svd", svd_rank)):
            t = time.perf_counter()
            rep = run_merge(MergeConfig(style=str(d / "style.safetensors"), lcm=str(d / "lcm.safetensors"),
                                        method=method, rank=r, out=str(d / f"out_{method}.safetensors")))
            res[f"{method}_s"] = round(time.perf_counter() - t, 2)
            res[f"{method}_out_MiB"] = round((d / f"out_{method}.safetensors").stat().st_size / 2**20, 1)
            if method == "svd":
                res["svd_rel_error_max"] = rep["svd_rel_error"]["max"]
                res["svd_rel_error_mean"] = rep["svd_rel_error"]["mean"]
        res["rss_before_merges_MiB"] = round(rss0, 1)
        res["peak_rss_MiB"] = round(_rss_mb(), 1)
    for k, v in res.items():
        echo(f"{k:>24}: {v}")
    return res


if __name__ == "__main__":
    bench_merge(echo=lambda s: print(s, file=sys.stderr))
