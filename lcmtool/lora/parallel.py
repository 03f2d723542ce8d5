"""`merge_modules`: the merge math of lora/math.py over every module of a merge, spread over threads.

Kept beside the math rather than in the merge engine: it is mechanism (how the per-module math is scheduled and
how the inputs' memory is released), not policy, and `bench --merge` and the tests drive it directly. Errors
are the math's ValueError; the engine words them for the user.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from lcmtool.lora import math as M
from lcmtool.lora.io import LoraModule


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def merge_modules(terms: dict[str, list[M.Term]], method: str, rank: int | None = None,
                  dtype: torch.dtype | None = None, workers: int | None = None
                  ) -> tuple[dict[str, LoraModule], dict[str, float]]:
    """`concat` or `svd` of every module of `terms` -> (merged modules in `terms` order, svd errors per module).

    Consumes `terms` (entries are popped as they are handed out), so an input module's factors are freed as soon
    as its merge is done when `terms` holds the only reference. Each merged module is cast to `dtype` (None keeps
    fp32) right away: holding every merged module in fp32 would double the peak memory.

    Speed: the modules are spread over `workers` threads (default: the usable cores), each running torch with one
    intra-op thread. The per-module ops (QR of ~1k-20k x 128 factors, a 128 x 128 SVD) are too small for two
    OpenMP threads to share well, and on a machine shared with other jobs every OpenMP barrier waits for a
    descheduled thread; independent single-threaded modules keep both cores busy with no barriers. The math is
    exactly `concat` / `svd` per module.
    """
    if method not in ("concat", "svd"):
        raise ValueError(f"unknown merge method '{method}' (concat | svd)")
    if method == "svd" and (rank is None or rank < 1):
        raise ValueError(f"the svd rank must be at least 1, got {rank}")
    workers = workers or cpu_count()

    def one(name: str, ts: list[M.Term]) -> tuple[LoraModule | None, float]:
        if method == "concat":
            m, err = M.concat(name, ts), 0.0
        else:
            m, err = M.svd(name, ts, rank)
        if m is not None and dtype is not None:
            m = LoraModule(A=m.A.to(dtype), B=m.B.to(dtype), alpha=m.alpha)
        return m, err

    order = list(terms)
    results: dict[str, tuple[LoraModule | None, float]] = {}
    if workers <= 1:
        for p in order:
            results[p] = one(p, terms.pop(p))
    else:
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            ex = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,))
            try:
                futs = {p: ex.submit(one, p, terms.pop(p)) for p in order}
                for p in order:  # in order, so an error names the first bad module as the serial loop would
                    results[p] = futs.pop(p).result()
            finally:  # on an error, drop the queued modules instead of merging them for nothing
                ex.shutdown(wait=True, cancel_futures=True)
        finally:
            torch.set_num_threads(prev)
    merged = {p: m for p, (m, _) in results.items() if m is not None}
    errs = {p: e for p, (_, e) in results.items()} if method == "svd" else {}
    return merged, errs
