"""Images out: PNGs that carry their parameters (grids: outputs/grid.py).

Every PNG gets an A1111-style `parameters` text chunk (what WebUI, ComfyUI and civitai read) and a JSON
chunk `lcmtool` with the full record. Files are written atomically.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, PngImagePlugin

from lcmtool.fileio import atomic_write_bytes
from lcmtool.outputs.grid import grid  # noqa: F401 - grids are drawn in outputs/grid.py; png.grid stays for callers


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
