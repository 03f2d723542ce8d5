"""Images out: PNGs that carry their parameters, and labelled comparison grids.

Every PNG gets an A1111-style `parameters` text chunk (what WebUI, ComfyUI and civitai read) and a JSON
chunk `lcmtool` with the full record. Files are written atomically.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from lcmtool.fileio import atomic_write_bytes


def a1111_parameters(meta: dict) -> str:
    """The `parameters` text as A1111 writes it: prompt, 'Negative prompt: ...', then 'Key: value, ...'."""
    lines = [meta["prompt"]]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    fields = [("Steps", meta["steps"]), ("Sampler", meta["sampler"]), ("CFG scale", meta["guidance"]),
              ("Seed", meta["seed"]), ("Size", f"{meta['width']}x{meta['height']}"),
              ("Model", meta["model"])]
    if meta.get("model_hash"):
        fields.append(("Model hash", meta["model_hash"][:10]))
    if meta.get("loras"):
        hashes = ", ".join(f"{Path(lo['path']).stem}: {lo['sha256'][:12]}" for lo in meta["loras"])
        fields.append(("Lora hashes", f'"{hashes}"'))
        fields.append(("Lora weights", f'"{", ".join(str(lo["weight"]) for lo in meta["loras"])}"'))
    if meta.get("timesteps"):
        fields.append(("Timesteps", f'"{",".join(map(str, meta["timesteps"]))}"'))
    fields.append(("Version", f"lcmtool {meta['version']}"))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


def png_bytes(image: Image.Image, meta: dict | None = None, a1111: bool = True) -> bytes:
    """PNG with the `lcmtool` JSON chunk (and the A1111 `parameters` chunk unless a1111=False, e.g. grids)."""
    info = PngImagePlugin.PngInfo()
    if meta is not None:
        if a1111:
            info.add_text("parameters", a1111_parameters(meta))
        info.add_text("lcmtool", json.dumps(meta, sort_keys=True, default=str))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(image: Image.Image, path: str | Path, meta: dict | None = None, a1111: bool = True) -> Path:
    atomic_write_bytes(path, png_bytes(image, meta, a1111))
    return Path(path)


def read_png_meta(path: str | Path) -> dict:
    """-> {"parameters": str, "lcmtool": dict} from a PNG this module wrote."""
    with Image.open(path) as im:
        text = dict(im.text)
    return {"parameters": text.get("parameters"), "lcmtool": json.loads(text["lcmtool"]) if "lcmtool" in text else None}


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
