"""`lcmtool bench`: lcmtool's path against the plain-diffusers path, measured in the same run (sample, merge,
distill, startup). Each bench returns rows (dicts) of figures and ratios; the CLI prints them or emits them as JSON."""
from __future__ import annotations

from collections.abc import Callable

from lcmtool.options import BenchConfig


def run_bench(cfg: BenchConfig, log: Callable = print) -> list[dict]:
    """The benches `cfg` names (the sample bench when it names none), in the order sample, merge, startup,
    distill."""
    from lcmtool import startup

    startup.settle()  # benches run long: the collector is on (their own start-up is not what they time)
    rows: list[dict] = []
    if cfg.sample or not (cfg.merge or cfg.distill or cfg.startup):
        from lcmtool.bench.sample import bench_sample

        rows.extend({"bench": "sample", **row} for row in bench_sample(model=cfg.model, device=cfg.device, log=log))
    if cfg.merge:
        from lcmtool.bench.merge import bench_merge

        rows.append({"bench": "merge", **bench_merge(echo=log)})
    if cfg.startup:
        from lcmtool.bench.startup import bench_startup
        from lcmtool.models.load import resolve_device

        rows.extend({"bench": "startup", **row} for row in bench_startup(
            model=cfg.model, rounds=cfg.rounds, device=resolve_device(cfg.device), log=log))
    if cfg.distill:
        from lcmtool.bench.distill import bench_distill

        device = None if cfg.device == "auto" else cfg.device
        rows.extend({"bench": "distill", **row} for row in bench_distill(device=device, log=log))
    return rows
