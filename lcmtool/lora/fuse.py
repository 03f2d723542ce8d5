"""Adding LoRA deltas into a model's weights in place: W += sum_i w_i * dW_i, fp32 math.

Canonical module paths (lora/formats.py) name UNet modules as diffusers does and text-encoder modules as
`text_encoder.text_model.<...>` / `text_encoder_2.text_model.<...>`, the layout kohya and diffusers files use.
transformers 5 dropped the `text_model` level from `CLIPTextModel` (not from `CLIPTextModelWithProjection`), so a
text-encoder path is looked up with and without that level: both layouts are fused (transformers 4.46 .. 5.x).
A LoRA that does not fit the model is an LcmError naming the first module.
"""
from __future__ import annotations

import torch

from lcmtool.errors import LcmError
from lcmtool.lora import math as M
from lcmtool.lora.io import LoraFile, all_finite

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_TEXT_MODEL = "text_model."


def find_submodule(root: torch.nn.Module, sub: str) -> torch.nn.Module | None:
    """`root.get_submodule(sub)`, trying a text encoder's path also without / with its `text_model.` level."""
    cands = [sub]
    if sub.startswith(_TEXT_MODEL):
        cands.append(sub[len(_TEXT_MODEL):])
    else:
        cands.append(_TEXT_MODEL + sub)
    for c in cands:
        try:
            return root.get_submodule(c)
        except AttributeError:
            continue
    return None


def fuse_terms(root: torch.nn.Module, terms: dict[str, list[M.Term]], prefix: str = "") -> int:
    """Fuse the modules of `terms` whose path starts with `prefix` (stripped) into `root`; -> modules changed.

    With no prefix (a UNet) text-encoder modules are skipped. The new weight is checked finite before it is kept.
    """
    n = 0
    for path, ts in terms.items():
        if prefix and not path.startswith(prefix):
            continue
        if not prefix and path.split(".", 1)[0] in TEXT_ENCODERS:
            continue
        mod = find_submodule(root, path[len(prefix):])
        if mod is None:
            raise LcmError(f"LoRA module '{path}' does not exist in this model")
        weight = getattr(mod, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise LcmError(f"LoRA module '{path}' has no weight to change in this model")
        try:
            d = M.weighted_delta(path, ts)
        except ValueError as e:
            raise LcmError(str(e)) from None
        if d is None:
            continue
        if d.numel() != weight.numel() or (d.shape[:2] != weight.shape[:2]):
            raise LcmError(f"LoRA module '{path}' changes a {list(d.shape)} weight but the model's is "
                           f"{list(weight.shape)}")
        new = weight.float() + d.reshape(weight.shape).to(weight.device)
        if not all_finite(new):
            raise LcmError(f"fusing LoRA module '{path}' gives inf/NaN weights")
        with torch.no_grad():
            weight.copy_(new.to(weight.dtype))
        n += 1
    return n


def fuse_into_module(root: torch.nn.Module, loras: list[tuple[LoraFile, float]], prefix: str = "") -> int:
    """W += sum_i w_i * dW_i for every module path starting with `prefix` (prefix stripped), in place; -> count."""
    return fuse_terms(root, M.group_terms(loras), prefix)


def fuse_into_unet(unet: torch.nn.Module, loras: list[tuple[LoraFile, float]]) -> None:
    """Add weight * delta of every UNet module of every LoRA to `unet` in place (text-encoder modules skipped)."""
    fuse_terms(unet, M.group_terms(loras))


def fuse_into_pipeline(pipe, loras: list[tuple[LoraFile, float]]) -> int:
    """Fuse every module of every LoRA into `pipe`: the UNet and each text encoder the LoRAs change; -> count.

    LcmError when the LoRAs change a text encoder the pipeline lacks, or a module it does not have.
    """
    terms = M.group_terms(loras)
    n = fuse_terms(pipe.unet, terms)
    for te in TEXT_ENCODERS:
        if any(p.startswith(te + ".") for p in terms):
            model = getattr(pipe, te, None)
            if model is None:
                raise LcmError(f"the LoRA changes {te}, which this model does not have")
            n += fuse_terms(model, terms, prefix=te + ".")
    return n


def nonfinite_module(pipe, paths) -> str | None:
    """The first of the module `paths` whose weight in `pipe` holds inf/NaN (e.g. after a cast to fp16)."""
    for path in paths:
        head, _, rest = path.partition(".")
        root, sub = (getattr(pipe, head, None), rest) if head in TEXT_ENCODERS else (pipe.unet, path)
        mod = find_submodule(root, sub) if root is not None else None
        weight = getattr(mod, "weight", None)
        if isinstance(weight, torch.Tensor) and not all_finite(weight):
            return path
    return None
