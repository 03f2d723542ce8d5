"""Synthetic LoRAs on a UNet's real module set (tests and `bench --merge`), and meta-device preset UNets."""
from __future__ import annotations

import re

import torch

from lcmtool.lora.formats import LCM_TARGETS
from lcmtool.lora.io import LoraFile, LoraModule, unet_preset

_TARGET_RE = re.compile(r"(^|\.)(" + "|".join(re.escape(t) for t in LCM_TARGETS) + r")$")


def meta_unet(family: str):
    """The family's UNet2DConditionModel built on the meta device (no memory, exact module names and shapes)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**unet_preset(family))


def target_shapes(unet: torch.nn.Module, targets=LCM_TARGETS) -> dict[str, tuple]:
    """module path -> weight shape for every Linear / Conv2d whose name ends with one of `targets`."""
    pat = _TARGET_RE if targets is LCM_TARGETS else re.compile(
        r"(^|\.)(" + "|".join(re.escape(t) for t in targets) + r")$")
    out = {}
    for name, mod in unet.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and pat.search(name):
            out[name] = tuple(mod.weight.shape)
    return out


def synth_lora(shapes: dict[str, tuple], rank=4, alpha=None, seed=0, dtype=torch.float32, std=None,
               family: str | None = None) -> LoraFile:
    """Random LoRA on `shapes`; rank / alpha may be ints or callables (path -> value) for per-module variety."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for p, shape in shapes.items():
        r = rank(p) if callable(rank) else rank
        a = alpha(p) if callable(alpha) else (alpha if alpha is not None else r)
        s = std if std is not None else 1.0 / max(1, int(torch.tensor(shape[1:]).prod())) ** 0.5
        A = torch.randn((r, *shape[1:]), generator=g) * s
        B = torch.randn((shape[0], r, *([1, 1] if len(shape) == 4 else [])), generator=g) * 0.5
        mods[p] = LoraModule(A=A.to(dtype), B=B.to(dtype), alpha=float(a))
    return LoraFile(modules=mods, format="kohya", family=family, dtype=dtype)
