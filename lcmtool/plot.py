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
               size: tuple[int, int] = (640, 400)) -> None:
    """Draw each series (y values at x = 0..n-1) as a polyline with axes, min/max labels and a legend."""
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
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]
    for i, (name, s) in enumerate(series.items()):
        x = lambda j: left + (w - left - right) * j / max(n - 1, 1)
        y = lambda v: h - bottom - (h - top - bottom) * (f(v) - lo) / (hi - lo)
        pts = [(x(j), y(v)) for j, v in enumerate(s) if math.isfinite(v)]
        if len(pts) > 1:
            d.line(pts, fill=colours[i % len(colours)], width=2)
        d.text((left + 8, top + 6 + 14 * i), name, fill=colours[i % len(colours)])
    fmt = (lambda v: f"{10 ** v:.3g}") if log_y else (lambda v: f"{v:.3g}")
    d.text((4, top - 4), fmt(hi), fill="black")
    d.text((4, h - bottom - 8), fmt(lo), fill="black")
    d.text((left, h - bottom + 6), "0", fill="black")
    d.text((w - right - 50, h - bottom + 6), f"{n - 1} steps", fill="black")
    d.text((left, 8), title, fill="black")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
