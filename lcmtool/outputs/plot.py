"""Tiny PIL line charts (matplotlib is not a dependency): loss curves saved as PNG next to the weights."""
from __future__ import annotations

import math
from pathlib import Path

from lcmtool.fileio import atomic_path


def smooth(values: list[float], k: int = 25) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def line_chart(series: dict[str, list[float]], path: str | Path, title: str = "", log_y: bool = True,
               size: tuple[int, int] = (640, 400), x: list[float] | None = None) -> None:
    """Draw each series as a polyline with axes, min/max labels and a legend; y values are at x = 0..n-1, or at
    the shared x values `x` (e.g. training steps) when given."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 60, 15, 30, 35
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    f = (lambda v: math.log10(max(v, 1e-12))) if log_y else (lambda v: v)
    ys = [f(v) for s in series.values() for v in s if math.isfinite(v)]
    if not ys:
        ys = [0.0, 1.0]
    lo, hi = min(ys), max(ys)
    hi = hi if hi > lo else lo + 1
    n = max((len(s) for s in series.values()), default=1)
    xs = list(x) if x is not None else list(range(n))
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0, 1)
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]
    for i, (name, s) in enumerate(series.items()):
        px = lambda j: left + (w - left - right) * (xs[j] - x_lo) / max(x_hi - x_lo, 1e-12)
        y = lambda v: h - bottom - (h - top - bottom) * (f(v) - lo) / (hi - lo)
        pts = [(px(j), y(v)) for j, v in enumerate(s) if math.isfinite(v)]
        if len(pts) > 1:
            d.line(pts, fill=colours[i % len(colours)], width=2)
        d.text((left + 8, top + 6 + 14 * i), name, fill=colours[i % len(colours)])
    fmt = (lambda v: f"{10 ** v:.3g}") if log_y else (lambda v: f"{v:.3g}")
    d.text((4, top - 4), fmt(hi), fill="black")
    d.text((4, h - bottom - 8), fmt(lo), fill="black")
    d.text((left, h - bottom + 6), f"{x_lo:g}", fill="black")
    d.text((w - right - 80, h - bottom + 6), f"{x_hi:g} steps", fill="black")
    d.text((left, 8), title, fill="black")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def heatmap(values: list[list[float]], path: str | Path, row_values: list[float], col_values: list[float],
            title: str = "", row_name: str = "", col_name: str = "", mark: tuple[int, int] | None = None,
            higher_is_better: bool = True, cell: int = 56) -> None:
    """A matrix as coloured cells (white = worst, blue = best) with each value printed; `mark` (row, column)
    outlines one cell (e.g. the best pair of a sweep). NaN cells stay grey."""
    from PIL import Image, ImageDraw

    finite = [v for r in values for v in r if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    left, top = 50, 40
    w, h = max(left + cell * len(col_values) + 15, 420), top + cell * len(row_values) + 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            x0, y0 = left + j * cell, top + i * cell
            if math.isfinite(v):
                q = (v - lo) / (hi - lo) if hi > lo else 1.0
                q = q if higher_is_better else 1 - q
                fill = (int(255 - 200 * q), int(255 - 140 * q), 255)
            else:
                fill = (200, 200, 200)
            d.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=fill, outline="white")
            d.text((x0 + 6, y0 + cell // 2 - 6), f"{v:.3g}" if math.isfinite(v) else "n/a", fill="black")
    if mark is not None:
        x0, y0 = left + mark[1] * cell, top + mark[0] * cell
        d.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], outline="#d62728", width=3)
    for j, c in enumerate(col_values):
        d.text((left + j * cell + cell // 2 - 8, top - 14), f"{c:g}", fill="black")
    for i, r in enumerate(row_values):
        d.text((left - 30, top + i * cell + cell // 2 - 6), f"{r:g}", fill="black")
    d.text((4, h - 30), f"rows: {row_name}; columns: {col_name}", fill="black")
    d.text((4, 6), title, fill="black")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
