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
