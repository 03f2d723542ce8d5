"""Load any supported LoRA file into the canonical form and write the canonical form in any format.

Canonical: `LoraFile.modules[path] = LoraModule(A, B, alpha)` with delta = (alpha / r) * B @ A, where r = A.shape[0].
On write, kohya files keep each module's alpha (every loader, diffusers / ComfyUI / A1111, reads the scale per
module as alpha / lora_down.shape[0]); diffusers and peft files have no alpha key, so the scale is baked into B.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch

from lcmtool.errors import LcmError
from lcmtool.fileio import atomic_write_json
from lcmtool.lora import formats
from lcmtool.lora import metadata as md_
from lcmtool.lora.metadata import base_metadata  # noqa: F401 - the engines' entry point
from lcmtool.lora.stfile import SafetensorsReader, write_safetensors
from lcmtool.presets import PRESETS

FAMILIES = ("sd15", "sdxl", "ssd1b")


@dataclasses.dataclass
class LoraModule:
    """One LoRA'd module: delta = (alpha / r) * B @ A. A: [r, in] or [r, in, kh, kw]; B: [out, r] or [out, r, 1, 1]."""

    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    # lazy modules (load_lora(lazy=True)): A and B are meta tensors (shape and dtype only) and the factors are read
    # from (reader, down key, up key, module path, check finite) when the math needs them, so a merge never holds
    # every input in memory
    source: tuple | None = dataclasses.field(default=None, repr=False, compare=False)

    def loaded(self) -> LoraModule:
        """This module with real factors (itself when it is not lazy); LcmError for inf/NaN factors."""
        if self.source is None:
            return self
        reader, down, up, name, check = self.source
        m = LoraModule(A=reader.get(down), B=reader.get(up), alpha=self.alpha)
        if check:
            check_finite(m, name, reader.path)
        return m

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def out_shape(self) -> tuple:
        """Shape of the base weight this module modifies."""
        return (self.B.shape[0], *self.A.shape[1:])

    def delta(self) -> torch.Tensor:
        """(alpha / r) * B @ A in the base weight's shape, fp32; conv factors are flattened to matrices first."""
        m = self.loaded()
        a = m.A.float().reshape(self.rank, -1)
        b = m.B.float().reshape(m.B.shape[0], self.rank)
        return (self.scale * (b @ a)).reshape(self.out_shape)


@dataclasses.dataclass
class LoraFile:
    modules: dict[str, LoraModule]
    format: str = "kohya"
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    family: str | None = None
    dtype: torch.dtype = torch.float32
    path: str | None = None


def unet_preset(family: str) -> dict:
    """The UNet2DConditionModel config dict of an architecture preset (keys starting with '_' dropped)."""
    if family not in FAMILIES:
        raise LcmError(f"unknown model family '{family}' (known: {', '.join(FAMILIES)})")
    cfg = json.loads((PRESETS / f"{family}_unet.json").read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _alpha_value(t: torch.Tensor, key: str) -> float:
    if t.numel() != 1:
        raise LcmError(f"alpha '{key}' has {t.numel()} values, expected one")
    v = float(t.float().item())
    if not (v == v and abs(v) != float("inf")):
        raise LcmError(f"alpha '{key}' is {v}")
    return v


def all_finite(t: torch.Tensor) -> bool:
    """No inf or NaN in `t`. Fast path: one fp32 sum (any inf or NaN makes it non-finite); only a non-finite sum,
    which huge finite values can also give, is confirmed element by element (5x faster than isfinite on fp16)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def check_finite(m: LoraModule, name: str, path) -> None:
    """LcmError naming the module and the file when a factor holds inf or NaN (a damaged or diverged LoRA)."""
    for which, t in (("down", m.A), ("up", m.B)):
        if not all_finite(t):
            raise LcmError(f"{path}: module '{name}' has inf/NaN values in its {which} factor (a damaged or "
                           "diverged LoRA)")


def _check_module(path, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    """One line naming the module when its factors do not form a LoRA lcmtool can apply."""
    bad = re.search(r"(^|\.)(weight|bias)$", name) or not name or "" in name.split(".")
    if bad:
        raise LcmError(f"{path}: module path '{name}' is empty or names a parameter, not a module")
    for which, t in (("down", A), ("up", B)):
        if not t.dtype.is_floating_point:
            raise LcmError(f"{path}: module '{name}' has a {str(t.dtype).replace('torch.', '')} {which} factor; "
                           "LoRA factors are floating point")
    if A.ndim not in (2, 4) or B.ndim != A.ndim or B.shape[1] != A.shape[0]:
        raise LcmError(f"{path}: module '{name}' has factors of shapes {tuple(A.shape)} and {tuple(B.shape)}"
                       " that do not form a LoRA")
    if A.shape[0] == 0 or A.numel() == 0 or B.numel() == 0:
        raise LcmError(f"{path}: module '{name}' has empty factors (rank {A.shape[0]}, shapes {tuple(A.shape)} and "
                       f"{tuple(B.shape)})")
    if B.ndim == 4 and tuple(B.shape[2:]) != (1, 1):
        raise LcmError(f"{path}: module '{name}' has a {tuple(B.shape[2:])} up kernel; only 1x1 is LoRA")


def _json_object(text: str, what: str) -> dict:
    """A LoraConfig dict from JSON text; LcmError naming `what` when it is not a JSON object."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        raise LcmError(f"{what} is not JSON") from None
    if not isinstance(obj, dict):
        raise LcmError(f"{what} must be a JSON object (a peft LoraConfig), got {type(obj).__name__}")
    return obj


def _peft_number(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise LcmError(f"{what} must be a finite number, got {v!r}")
    return float(v)


def _peft_alphas(cfg: dict, ranks: dict[str, int], what: str) -> dict[str, float]:
    """Per-module alpha from a LoraConfig dict (lora_alpha, alpha_pattern, rank_pattern, use_rslora)."""
    base = cfg.get("lora_alpha")
    base = None if base is None else _peft_number(base, f"{what}: lora_alpha")
    patterns = cfg.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise LcmError(f"{what}: alpha_pattern must be a mapping of module patterns to numbers")
    compiled = []
    for pat, v in patterns.items():
        try:
            compiled.append((re.compile(rf"(.*\.)?({str(pat).lstrip('^')})$"), _peft_number(v, f"{what}: "
                                                                                           f"alpha_pattern[{pat}]")))
        except re.error as e:
            raise LcmError(f"{what}: alpha_pattern key {pat!r} is not a regular expression ({e})") from None
    out = {}
    for path, r in ranks.items():
        alpha = next((v for rx, v in compiled if rx.match(path)), r if base is None else base)
        if cfg.get("use_rslora"):  # peft scales by alpha / sqrt(r); express it as an alpha over r
            alpha = alpha * (r ** 0.5)
        out[path] = float(alpha)
    return out


def guess_family(modules: dict[str, LoraModule]) -> str | None:
    """sd15 / sdxl / ssd1b from the cross-attention width (768 vs 2048) and the depth of down_blocks.2."""
    ctx = None
    for path, m in modules.items():
        if path.endswith("attn2.to_k") and not path.startswith("text_encoder"):
            ctx = m.A.shape[1]
            break
    if ctx == 768:
        return "sd15"
    if ctx == 2048:
        depth = [int(x) for x in re.findall(r"^down_blocks\.2\.attentions\.\d+\.transformer_blocks\.(\d+)\.",
                                            "\n".join(modules), flags=re.M)]
        return "ssd1b" if depth and max(depth) < 9 else "sdxl"
    names = "\n".join(modules)
    if "text_encoder_2." in names or "down_blocks.2.attentions.0.transformer_blocks.9." in names:
        return "sdxl"
    if "down_blocks.3." in names or "up_blocks.3." in names:
        return "sd15"
    return None


def load_lora(path: str | os.PathLike, family: str | None = None, lazy: bool = False,
              check: bool = True) -> LoraFile:
    """Read a LoRA safetensors file in any supported format into the canonical form.

    Every defect is an LcmError naming the file (and the first bad module): not safetensors, duplicate header
    keys, not a LoRA, empty or parameter module paths, non-float or empty factors, bad alphas, and (check=True)
    inf/NaN factors. lazy: keep only shapes and dtypes now (meta tensors) and read each module's factors when the
    math asks for them (`LoraModule.loaded`, which `delta` and the merge functions call), so merging streams the
    inputs; the inf/NaN check then runs as each module is read.
    """
    reader = SafetensorsReader(path)
    meta, keys = reader.metadata, reader.keys()
    if not keys:
        raise LcmError(f"{path}: empty safetensors file, not a LoRA")
    try:
        fmt = formats.detect(keys)
        groups = formats.split_keys(keys, fmt)
        sgm_family = family  # the block layout that SGM names are read in (SDXL's unless the file says SD-1.5)
        if fmt == "kohya-sgm" and family is None:
            ctx = [reader.shape(g["down"])[1:2] for n, g in groups.items() if n.endswith("attn2_to_k")]
            sgm_family = "sd15" if ctx and ctx[0] == (768,) else "sdxl"
        unet_config = unet_preset(sgm_family) if fmt == "kohya-sgm" else None
        names = {raw: formats.to_canonical(raw, fmt, unet_config) for raw in groups}
    except LcmError as e:
        raise LcmError(f"{path}: {e}") from None
    modules: dict[str, LoraModule] = {}
    raw_alpha: dict[str, float | None] = {}
    for raw, g in groups.items():
        canon = names[raw]
        if canon in modules:
            raise LcmError(f"{path}: module '{canon}' appears twice (as '{raw}')")
        A, B = reader.meta(g["down"]), reader.meta(g["up"])
        _check_module(path, canon, A, B)
        if not lazy:
            A, B = reader.get(g["down"]), reader.get(g["up"])
        raw_alpha[canon] = _alpha_value(reader.get(g["alpha"]), g["alpha"]) if "alpha" in g else None
        modules[canon] = LoraModule(A=A, B=B, alpha=float(A.shape[0]),
                                    source=(reader, g["down"], g["up"], canon, check) if lazy else None)
        if check and not lazy:
            check_finite(modules[canon], canon, path)
    _set_alphas(path, fmt, meta, modules, raw_alpha)
    dtypes = Counter(m.A.dtype for m in modules.values())
    fam = family or guess_family(modules)
    return LoraFile(modules=modules, format=fmt, metadata=meta, family=fam, dtype=dtypes.most_common(1)[0][0],
                    path=str(path))


def _set_alphas(path, fmt: str, meta: dict, modules: dict[str, LoraModule], raw_alpha: dict) -> None:
    """kohya and diffusers '.alpha' keys per module, missing = rank (scale 1, as kohya / ComfyUI / A1111);
    diffusers / peft files without them: the peft LoraConfig in the metadata or beside the file."""
    peft_cfg, what = None, None
    if fmt in ("diffusers", "peft") and not any(v is not None for v in raw_alpha.values()):
        side = Path(path).parent / "adapter_config.json"
        if "lora_adapter_metadata" in meta:
            what = f"{path}: lora_adapter_metadata"
            peft_cfg = _json_object(meta["lora_adapter_metadata"], what)
        elif fmt == "peft" and side.is_file():
            what = str(side)
            peft_cfg = _json_object(side.read_text(errors="replace"), what)
    if peft_cfg is not None:
        cfg_alpha = _peft_alphas(peft_cfg, {p: m.rank for p, m in modules.items()}, what)
        for p, m in modules.items():
            m.alpha = cfg_alpha[p]
    else:
        for p, m in modules.items():
            if raw_alpha[p] is not None:
                m.alpha = raw_alpha[p]


def save_lora(lora: LoraFile | dict[str, LoraModule], path: str | os.PathLike, format: str = "kohya",
              family: str | None = None, metadata: dict[str, str] | None = None,
              dtype: torch.dtype | None = None) -> Path:
    """Write `lora` atomically in `format` (`kohya`: SGM block names for SDXL-family LoRAs, as kohya's SDXL
    tools, A1111 and civitai files have them; `kohya-diffusers`: diffusers block names); refuses inf/NaN.

    Metadata values are strings; every file gets ModelSpec 1.0.1 keys, lcmtool's rank record and its data hash
    (`sshs_model_hash`, `modelspec.hash_sha256`); kohya files get the ss_network_* keys.
    """
    modules = lora.modules if isinstance(lora, LoraFile) else lora
    if isinstance(lora, LoraFile):
        family = family or lora.family
        dtype = dtype or lora.dtype
    dtype = dtype or torch.float32
    if not dtype.is_floating_point:
        raise LcmError(f"cannot write {str(dtype).replace('torch.', '')} LoRA factors: choose fp32, fp16 or bf16")
    if not modules:
        raise LcmError("nothing to write: the LoRA has no modules")
    fmt = layout(modules, format, family)
    unet_config = None
    if fmt == "kohya-sgm":
        if family not in ("sdxl", "ssd1b"):
            raise LcmError(f"kohya-sgm names are for SDXL-family LoRAs; this one is {family or 'of unknown family'}")
        unet_config = unet_preset(family)
    sd = _state_dict(modules, fmt, family, unet_config, dtype)
    ranks = {p: m.rank for p, m in modules.items()}
    md = {k: str(v) for k, v in (metadata or {}).items()
          if k != "lora_adapter_metadata" and not k.startswith("ss_network")}
    md.update({k: v for k, v in md_.modelspec(family, Path(path).stem, fmt == "kohya-sgm").items()
               if k not in md or k in ("modelspec.sai_model_spec", "modelspec.implementation",
                                       "modelspec.implementation_version")})
    md["lcmtool.ranks"] = md_.rank_record(ranks)
    if fmt.startswith("kohya"):
        alpha0 = md_.file_alpha([m.alpha for m in modules.values()])
        md.update(md_.kohya_metadata(ranks, dict.fromkeys(ranks, alpha0), family))
    path = Path(path)
    write_safetensors(sd, path, md)
    if fmt == "peft" and path.name == "adapter_model.safetensors":
        atomic_write_json(path.parent / "adapter_config.json", md_.peft_config(ranks))
    return path


def layout(modules: dict[str, LoraModule], format: str, family: str | None) -> str:
    """The key layout `save_lora` writes for `format`: 'kohya' gives SGM names ('kohya-sgm') to an SDXL-family
    LoRA whose UNet modules all exist, shape for shape, in the family's UNet; any other (the demo's tiny SDXL)
    keeps diffusers block names, as SGM names would not be its layout."""
    from lcmtool.lora import fit

    fmt = formats.resolve_write_format(format, family)
    if fmt == "kohya-sgm" and format == "kohya":
        unet = {p: m for p, m in modules.items() if p.split(".", 1)[0] not in ("text_encoder", "text_encoder_2")}
        unknown, wrong = fit.misfits(unet, fit.family_shapes(family))
        fmt = "kohya" if unknown or wrong else fmt
    return fmt


def _state_dict(modules: dict[str, LoraModule], fmt: str, family: str | None, unet_config: dict | None,
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of the file: factors cast to `dtype` (kohya: one alpha per file, the rest baked in)."""
    down_s, up_s, alpha_s = formats.suffixes(fmt)
    alpha0 = md_.file_alpha([m.alpha for m in modules.values()]) if alpha_s is not None else None
    sd: dict[str, torch.Tensor] = {}
    for p, m in modules.items():
        stem = formats.from_canonical(p, fmt, family, unet_config)
        m = m.loaded()
        a, b = m.A, m.B
        if alpha_s is None and m.scale != 1.0:  # no alpha key: bake the scale into B (fp32 then cast)
            b = b.float() * m.scale
        elif alpha_s is not None and m.alpha != alpha0:  # one alpha per file: bake alpha / alpha0 into A and B
            f = m.alpha / alpha0
            a, b = a.float() * (math.copysign(math.sqrt(abs(f)), f)), b.float() * math.sqrt(abs(f))
        a, b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        for name, t in (("A", a), ("B", b)):
            if not all_finite(t):
                raise LcmError(f"refusing to write inf/NaN in module '{p}' ({name} factor, dtype {dtype})")
        if stem + down_s in sd:
            raise LcmError(f"two modules map to the same key '{stem}' in format {fmt}")
        sd[stem + down_s], sd[stem + up_s] = a, b
        if alpha_s is not None:
            sd[stem + alpha_s] = torch.tensor(float(alpha0), dtype=torch.float32)
    return sd
