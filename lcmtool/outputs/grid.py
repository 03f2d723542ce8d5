"""Labelled comparison grids: rows x columns of images with a label strip over each column (and each cell)."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def grid(cells: list[list[Image.Image]], col_labels: list[str], row_labels: list[str] | None = None,
         cell_labels: list[list[str]] | None = None, min_cell: int = 192) -> Image.Image:
    """Rows x columns of images with a label strip over each column (and each cell), like the paper's Fig. 3.

    Small images are scaled up (nearest) to `min_cell` pixels so that labels stay legible.
    """
    rows, cols = len(cells), len(cells[0])
    w0, h0 = cells[0][0].size
    scale = max(1, -(-min_cell // max(w0, h0)))
    cw, ch = w0 * scale, h0 * scale
    fs = max(12, cw // 14)
    font = _font(fs)
    pad, head = 4, fs + 8
    cell_head = (fs + 6) if cell_labels else 0
    cell_font = _font(max(10, fs - 2)) if cell_labels else None
    left = 0
    if row_labels:
        left = min(260, max(int(font.getlength(r)) for r in row_labels) + 2 * pad)
    slot = max(cw, max(int(font.getlength(c)) for c in col_labels) + 2 * pad)  # labels never overlap
    W = left + cols * (slot + pad) + pad
    H = head + rows * (ch + cell_head + pad) + pad
    out = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for j, label in enumerate(col_labels):
        draw.text((left + pad + j * (slot + pad), 4), label, fill=(0, 0, 0), font=font)
    for i, row in enumerate(cells):
        y = head + i * (ch + cell_head + pad)
        if row_labels:
            draw.text((pad, y + cell_head + ch // 2 - fs // 2), row_labels[i][:40], fill=(0, 0, 0), font=font)
        for j, im in enumerate(row):
            x = left + pad + j * (slot + pad)
            if cell_labels:
                draw.text((x, y + 2), cell_labels[i][j], fill=(90, 90, 90), font=cell_font)
            out.paste(im.convert("RGB").resize((cw, ch), Image.NEAREST), (x, y + cell_head))
    return out
