"""What a distill run shows while it runs: the progress bar, the loss meter, TensorBoard, loss.png."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from lcmtool.errors import LcmError


def tensorboard_tracker(report_to: str) -> str | None:
    """accelerate's log_with for `report_to`: "tensorboard" when wanted and installed, else None."""
    from accelerate.utils import is_tensorboard_available

    if report_to == "none" or (report_to == "auto" and not is_tensorboard_available()):
        return None
    if not is_tensorboard_available():
        raise LcmError("report_to: tensorboard needs the tensorboard package (pip install tensorboard), "
                       "or set report_to: auto|none")
    return "tensorboard"


class Meter:
    """Loss and throughput over one log interval (t0: the start of the run)."""

    def __init__(self):
        self.t0 = self.t = time.time()
        self.total, self.n = 0.0, 0

    def add(self, lvals: list[float]) -> None:
        self.total += sum(lvals)
        self.n += len(lvals)

    def take(self) -> tuple[float, int, float]:
        """-> (mean loss, micro-steps, seconds) since the last take, and start a new interval."""
        now = time.time()
        out = (self.total / max(1, self.n), self.n, max(now - self.t, 1e-9))
        self.t, self.total, self.n = now, 0.0, 0
        return out


def _bar(columns: list, main: bool):
    """rich's Progress of `columns` on stderr: shown on the main process when stderr is a terminal or
    LCMTOOL_PROGRESS=1."""
    from rich.console import Console
    from rich.progress import Progress

    quiet = not sys.stderr.isatty() and os.environ.get("LCMTOOL_PROGRESS") != "1"
    return Progress(*columns, console=Console(stderr=True, highlight=False), disable=not main or quiet)


def make_progress(total: int, completed: int, main: bool):
    """The training bar (step, loss, samples/s); -> (progress, task)."""
    from rich.progress import BarColumn, TextColumn, TimeRemainingColumn

    progress = _bar([TextColumn("distill"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                     TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[sps]} samples/s"),
                     TimeRemainingColumn()], main)
    return progress, progress.add_task("distill", total=total, completed=completed, loss="-", sps="-")


def count_progress(label: str, main: bool):
    """A bar for a count of items (e.g. teacher samples; the total is set by the first update); -> (progress,
    task)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    progress = _bar([TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()], main)
    return progress, progress.add_task(label, total=None)


def loss_curve_png(points: list[tuple[int, float]], path: Path, title: str = "LCD loss",
                   evals: list[tuple[int, float]] | None = None, eval_name: str = "held-out score") -> None:
    """The logged loss against the step (log-scale y): raw and a running mean, drawn by lcmtool.outputs.plot;
    with `evals` (step, score) a second chart, of the held-out score, below it in the same PNG."""
    import tempfile

    from PIL import Image

    from lcmtool.fileio import atomic_path
    from lcmtool.outputs.plot import line_chart, smooth

    steps, ys = [s for s, _ in points], [v for _, v in points]
    loss = {"loss": ys, "running mean": smooth(ys, max(3, len(ys) // 15))}
    if not evals:
        line_chart(loss, path, title=title, x=steps)
        return
    with tempfile.TemporaryDirectory() as d:
        line_chart(loss, Path(d, "loss.png"), title=title, x=steps)
        line_chart({eval_name: [v for _, v in evals]}, Path(d, "eval.png"), title=eval_name, log_y=False,
                   x=[s for s, _ in evals])
        with Image.open(Path(d, "loss.png")) as top, Image.open(Path(d, "eval.png")) as bottom:
            both = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height), "white")
            both.paste(top, (0, 0))
            both.paste(bottom, (0, top.height))
    with atomic_path(path) as out:
        both.save(out, format="PNG")
