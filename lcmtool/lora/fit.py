"""Which modules a model family (or a model folder) has: the reference a LoRA's module paths are checked against.

`family_shapes(family)` builds the family's UNet and text encoders from the shipped presets on the meta device
(no memory, exact names and weight shapes) and lists every Linear / Conv2d weight under its canonical path
(`down_blocks.0...`, `text_encoder.text_model.encoder...`); `folder_shapes(folder)` does the same from a diffusers
pipeline folder's configs. `misfits` says which LoRA modules are unknown there and which change a weight of
another shape. Built once per family (and kept on disk) or folder.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import torch

from lcmtool.errors import LcmError
from lcmtool.fileio import atomic_write_json
from lcmtool.lora import formats
from lcmtool.lora.io import FAMILIES, LoraModule
from lcmtool.lora.math import comparable
from lcmtool.presets import PRESETS

_TE_CLASSES = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}


def _weights(model: torch.nn.Module, prefix: str = "") -> dict[str, tuple]:
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            path = prefix + name
            out[formats.te_path(path) if prefix else path] = tuple(mod.weight.shape)
    return out


def _shapes(folder: Path) -> dict[str, tuple]:
    import transformers
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in json.loads((folder / "unet" / "config.json").read_text()).items()
           if not k.startswith("_")}
    with torch.device("meta"):
        out = _weights(UNet2DConditionModel(**cfg))
        for te, cls in _TE_CLASSES.items():
            path = folder / te / "config.json"
            if path.is_file():
                conf = transformers.CLIPTextConfig.from_pretrained(str(path.parent))
                out.update(_weights(getattr(transformers, cls)(conf), prefix=te + "."))
    return out


def _cache_file(family: str) -> Path:
    """Where the family's table is kept between runs: keyed by the preset configs and the diffusers and
    transformers versions that built it ($LCMTOOL_CACHE, else ~/.cache/lcmtool)."""
    from importlib.metadata import version

    h = hashlib.sha256(json.dumps([family, version("diffusers"), version("transformers")]).encode())
    for f in sorted((PRESETS / family).glob("*/config.json")):
        h.update(f.read_bytes())
    root = Path(os.environ.get("LCMTOOL_CACHE") or Path.home() / ".cache" / "lcmtool")
    return root / "modules" / f"{family}-{h.hexdigest()[:16]}.json"


@functools.lru_cache(maxsize=8)
def family_shapes(family: str) -> dict[str, tuple]:
    """canonical module path -> weight shape of every Linear / Conv2d of the family's UNet and text encoders.

    Building the meta models costs seconds (importing diffusers and transformers included), so the table is kept
    on disk once built; an unreadable or unwritable cache only means building it again."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family '{family}'")
    cache = _cache_file(family)
    try:
        return {k: tuple(v) for k, v in json.loads(cache.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        pass
    from lcmtool.models.load import quiet_libraries

    quiet_libraries()
    shapes = _shapes(PRESETS / family)
    try:
        atomic_write_json(cache, shapes)
    except (OSError, LcmError):  # fileio words environment errors (read-only home, full disk) as LcmError
        pass
    return shapes


@functools.lru_cache(maxsize=8)
def folder_shapes(folder: str) -> dict[str, tuple]:
    """The same for a diffusers pipeline folder (its unet/ and text_encoder*/ configs; no weights read)."""
    return _shapes(Path(folder))


def fits(m: LoraModule, shape: tuple) -> bool:
    """Does `m` change a weight of `shape` (a 1x1 conv and its linear twin count as one)?"""
    return comparable(tuple(m.out_shape)) == comparable(tuple(shape))


def misfits(modules: dict[str, LoraModule], shapes: dict[str, tuple]) -> tuple[list[str], list[str]]:
    """(paths not in `shapes`, paths whose weight shape differs), in the modules' order."""
    unknown = [p for p in modules if p not in shapes]
    wrong = [p for p in modules if p in shapes and not fits(modules[p], shapes[p])]
    return unknown, wrong
