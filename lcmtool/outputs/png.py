"""Images out: PNGs that carry their parameters (grids: outputs/grid.py).

Every PNG gets an A1111-style `parameters` text chunk (what WebUI, ComfyUI and civitai read) and a JSON
chunk `lcmtool` with the full record. Files are written atomically.
"""
from __future__ import annotations

import functools
import io
import json
from pathlib import Path

from PIL import Image, PngImagePlugin

from lcmtool.fileio import atomic_write_bytes
from lcmtool.outputs.grid import grid  # noqa: F401 - grids are drawn in outputs/grid.py; png.grid stays for callers

# A1111's "Schedule type" (modules/sd_schedulers.py) closest to each schedule: diffusers' "leading" spacing (t = 1,
# 1 + k, ...) is A1111's DDIM schedule, "trailing" (999, 999 - k, ...) its Simple, "linspace" its Normal; LCM and
# TCD step down the 50-step skipping grid from 999, as Simple does.
SCHEDULE_TYPES = {"leading": "DDIM", "trailing": "Simple", "linspace": "Normal"}


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _hashes(stamp: tuple) -> tuple[str, str]:
    """(sha256 of the file, sha256 of its bytes after the safetensors header), computed once per file version."""
    from lcmtool.fileio import sha256_file
    from lcmtool.lora.stfile import data_sha256

    path = stamp[0]
    return sha256_file(path), (data_sha256(path) if path.endswith(".safetensors") else "")


def addnet_hash(path: str | Path) -> str:
    """A1111's LoRA hash: sha256 of the bytes after the safetensors header (kohya's `sshs_model_hash`)."""
    return _hashes(_stamp(Path(path)))[1]


def model_hash(path: str | Path) -> str:
    """A1111's checkpoint hash: sha256 of the whole file (its infotext shows the first 10 hex digits)."""
    return _hashes(_stamp(Path(path)))[0]


def _name(spec: str) -> str:
    """A model or LoRA as written metadata names it: a local path by its file name, other specs as given."""
    p = Path(str(spec)).expanduser()
    return p.name if p.exists() else str(spec)


def png_record(meta: dict) -> dict:
    """The record a PNG carries: local files by name, each LoRA with its A1111 hash, a single-file model with its
    A1111 model hash; the prompt exactly as sampled."""
    rec = dict(meta)
    if rec.get("loras"):
        rec["loras"] = [dict(lo, path=_name(lo["path"]), addnet_hash=lo.get("addnet_hash") or (
            addnet_hash(lo["path"]) if Path(lo["path"]).is_file() else "")) for lo in rec["loras"]]
    model = rec.get("model")
    if model and not rec.get("model_hash") and Path(model).expanduser().is_file():
        rec["model_hash"] = model_hash(Path(model).expanduser())
    if model:
        rec["model"] = _name(model)
    return rec


def _model_label(model: str) -> str:
    """A1111's `Model`: a checkpoint's file name without the extension; other specs as given."""
    p = Path(_name(model))
    return p.stem if p.suffix in (".safetensors", ".ckpt", ".pt", ".bin") else str(p)


def _schedule_type(meta: dict) -> str:
    if meta.get("scheduler") in ("lcm", "tcd"):
        return "Simple"
    spacing = (meta.get("scheduler_config") or {}).get("timestep_spacing", "leading")
    return SCHEDULE_TYPES.get(spacing, "Automatic")


def a1111_parameters(meta: dict) -> str:
    """The `parameters` text as A1111 writes it: prompt (with a `<lora:name:weight>` tag per LoRA, so a paste into
    A1111 applies them again), 'Negative prompt: ...', then 'Key: value, ...'."""
    loras = meta.get("loras") or []
    lines = [meta["prompt"] + "".join(f" <lora:{Path(lo['path']).stem}:{lo['weight']:g}>" for lo in loras)]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    fields = [("Steps", meta["steps"]), ("Sampler", meta["sampler"]), ("CFG scale", meta["guidance"]),
              ("Seed", meta["seed"]), ("Size", f"{meta['width']}x{meta['height']}")]
    if meta.get("model_hash"):
        fields.append(("Model hash", meta["model_hash"][:10]))
    fields += [("Model", _model_label(meta["model"])), ("Schedule type", _schedule_type(meta))]  # any order parses
    if loras:
        hashes = ", ".join(f"{Path(lo['path']).stem}: {(lo.get('addnet_hash') or lo['sha256'])[:12]}" for lo in loras)
        fields.append(("Lora hashes", f'"{hashes}"'))
        fields.append(("Lora weights", f'"{", ".join(str(lo["weight"]) for lo in loras)}"'))
    if meta.get("timesteps"):
        fields.append(("Timesteps", f'"{",".join(map(str, meta["timesteps"]))}"'))
    fields.append(("Version", f"lcmtool {meta['version']}"))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


def png_bytes(image: Image.Image, meta: dict | None = None, a1111: bool = True) -> bytes:
    """PNG with the `lcmtool` JSON chunk (and the A1111 `parameters` chunk unless a1111=False, e.g. grids)."""
    info = PngImagePlugin.PngInfo()
    if meta is not None:
        meta = png_record(meta)
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
