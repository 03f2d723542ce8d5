"""Load any supported LoRA file into the canonical form and write the canonical form in any format.

Canonical: `LoraFile.modules[path] = LoraModule(A, B, alpha)` with delta = (alpha / r) * B @ A, where r = A.shape[0].
On write, kohya files keep each module's alpha (every loader, diffusers / ComfyUI / A1111, reads the scale per
module as alpha / lora_down.shape[0]); diffusers and peft files have no alpha key, so the scale is baked into B.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch

from lcmtool.errors import LcmError
from lcmtool.fileio import atomic_path, atomic_write_json
from lcmtool.lora import formats
from lcmtool.presets import PRESETS

FAMILIES = ("sd15", "sdxl", "ssd1b")
# kohya ss_base_model_version and modelspec.architecture per family
_BASE_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0", "ssd1b": "sdxl_base_v1-0"}
_ARCH = {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora",
         "ssd1b": "stable-diffusion-xl-v1-base/lora"}


@dataclasses.dataclass
class LoraModule:
    """One LoRA'd module: delta = (alpha / r) * B @ A. A: [r, in] or [r, in, kh, kw]; B: [out, r] or [out, r, 1, 1]."""

    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    # lazy modules (load_lora(lazy=True)): A and B are meta tensors (shape and dtype only) and the factors are read
    # from (reader, down key, up key) when the math needs them, so a merge never holds every input in memory
    source: tuple | None = dataclasses.field(default=None, repr=False, compare=False)

    def loaded(self) -> LoraModule:
        """This module with real factors (itself when it is not lazy)."""
        if self.source is None:
            return self
        reader, down, up = self.source
        return LoraModule(A=reader.get(down), B=reader.get(up), alpha=self.alpha)

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


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class SafetensorsReader:
    """The tensors of one safetensors file, read on demand with pread straight into each tensor's own memory.

    safe_open validates the file (header, offsets, size); reading then needs no mmap (whose touched pages count
    in the resident set while the file is open) and no intermediate copy. Thread-safe: every read is a pread.
    """

    def __init__(self, path: str | os.PathLike):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise LcmError(f"LoRA file not found: {self.path}")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                self.metadata = dict(f.metadata() or {})
                keys = list(f.keys())
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise LcmError(f"{self.path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
        self._base = 8 + n
        self._entries = {k: header[k] for k in keys}

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple:
        return tuple(self._entries[key]["shape"])

    def meta(self, key: str) -> torch.Tensor:
        """A meta tensor of the stored shape and dtype (no data)."""
        e = self._entries[key]
        return torch.empty(e["shape"], dtype=_ST_DTYPES.get(e["dtype"], torch.float32), device="meta")

    def get(self, key: str) -> torch.Tensor:
        e = self._entries[key]
        dtype = _ST_DTYPES.get(e["dtype"])
        if dtype is None:  # fp8 and other rare dtypes: let safetensors decode them
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as f:
                return f.get_tensor(key)
        t = torch.empty(e["shape"], dtype=dtype)
        begin, end = e["data_offsets"]
        if t.numel():
            buf = memoryview(t.view(-1).view(torch.uint8).numpy())
            if len(buf) != end - begin:
                raise LcmError(f"{self.path}: tensor '{key}' has {end - begin} bytes for shape {e['shape']}")
            fd = os.open(self.path, os.O_RDONLY)
            try:
                got = 0
                while got < len(buf):
                    k = os.preadv(fd, [buf[got:]], self._base + begin + got)
                    if k <= 0:
                        raise LcmError(f"{self.path}: truncated while reading '{key}'")
                    got += k
            finally:
                os.close(fd)
        return t


def _json_object(text: str, what: str) -> dict:
    """A LoraConfig dict from JSON text; LcmError naming `what` when it is not a JSON object."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        raise LcmError(f"{what} is not JSON") from None
    if not isinstance(obj, dict):
        raise LcmError(f"{what} must be a JSON object (a peft LoraConfig), got {type(obj).__name__}")
    return obj


def _peft_alphas(cfg: dict, ranks: dict[str, int]) -> dict[str, float]:
    """Per-module alpha from a LoraConfig dict (lora_alpha, alpha_pattern, rank_pattern, use_rslora)."""
    out = {}
    for path, r in ranks.items():
        alpha = cfg.get("lora_alpha", r)
        for pat, v in (cfg.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pat.lstrip('^')})$", path):
                alpha = v
                break
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


def load_lora(path: str | os.PathLike, family: str | None = None, lazy: bool = False) -> LoraFile:
    """Read a LoRA safetensors file in any supported format into the canonical form.

    lazy: keep only shapes and dtypes now (meta tensors) and read each module's factors when the math asks for
    them (`LoraModule.loaded`, which `delta` and the merge functions call), so merging streams the inputs.
    """
    reader = SafetensorsReader(path)
    meta, keys = reader.metadata, reader.keys()
    if not keys:
        raise LcmError(f"{path}: empty safetensors file, not a LoRA")
    fmt = formats.detect(keys)
    groups = formats.split_keys(keys, fmt)
    if fmt == "kohya-sgm" and family is None:
        ctx = [reader.shape(g["down"])[1] for n, g in groups.items() if n.endswith("attn2_to_k")]
        family = "sd15" if ctx and ctx[0] == 768 else "sdxl"
    unet_config = unet_preset(family) if fmt == "kohya-sgm" else None
    modules: dict[str, LoraModule] = {}
    raw_alpha: dict[str, float | None] = {}
    for raw, g in groups.items():
        canon = formats.to_canonical(raw, fmt, unet_config)
        if canon in modules:
            raise LcmError(f"{path}: module '{canon}' appears twice (as '{raw}')")
        A, B = (reader.meta(g["down"]), reader.meta(g["up"])) if lazy else (reader.get(g["down"]), reader.get(g["up"]))
        if A.ndim not in (2, 4) or B.ndim != A.ndim or B.shape[1] != A.shape[0]:
            raise LcmError(f"{path}: module '{canon}' has factors of shapes {tuple(A.shape)} and {tuple(B.shape)}"
                           " that do not form a LoRA")
        if B.ndim == 4 and tuple(B.shape[2:]) != (1, 1):
            raise LcmError(f"{path}: module '{canon}' has a {tuple(B.shape[2:])} up kernel; only 1x1 is LoRA")
        raw_alpha[canon] = _alpha_value(reader.get(g["alpha"]), g["alpha"]) if "alpha" in g else None
        modules[canon] = LoraModule(A=A, B=B, alpha=float(A.shape[0]),
                                    source=(reader, g["down"], g["up"]) if lazy else None)
    # alphas: kohya and diffusers '.alpha' keys per module, missing = rank (scale 1, as kohya / ComfyUI / A1111)
    peft_cfg = None
    if fmt in ("diffusers", "peft") and not any(v is not None for v in raw_alpha.values()):
        side = Path(path).parent / "adapter_config.json"
        if "lora_adapter_metadata" in meta:
            peft_cfg = _json_object(meta["lora_adapter_metadata"], f"{path}: lora_adapter_metadata")
        elif fmt == "peft" and side.is_file():
            peft_cfg = _json_object(side.read_text(errors="replace"), str(side))
    if peft_cfg is not None:
        cfg_alpha = _peft_alphas(peft_cfg, {p: m.rank for p, m in modules.items()})
        for p, m in modules.items():
            m.alpha = cfg_alpha[p]
    else:
        for p, m in modules.items():
            if raw_alpha[p] is not None:
                m.alpha = raw_alpha[p]
    dtypes = Counter(m.A.dtype for m in modules.values())
    fam = family or guess_family(modules)
    return LoraFile(modules=modules, format=fmt, metadata=meta, family=fam, dtype=dtypes.most_common(1)[0][0],
                    path=str(path))


def kohya_metadata(modules: dict[str, LoraModule], family: str | None) -> dict[str, str]:
    ranks = Counter(m.rank for m in modules.values())
    alphas = Counter(m.alpha for m in modules.values())
    md = {"ss_network_module": "networks.lora",
          "ss_network_dim": str(ranks.most_common(1)[0][0]) if ranks else "0",
          "ss_network_alpha": f"{alphas.most_common(1)[0][0]:g}" if alphas else "0"}
    if family:
        md["ss_base_model_version"] = _BASE_VERSION[family]
    return md


def base_metadata(family: str | None, title: str, extra: dict | None = None) -> dict[str, str]:
    md = {"modelspec.sai_model_spec": "1.0.0", "modelspec.title": title,
          "modelspec.date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
          "modelspec.implementation": "https://github.com/huggingface/diffusers"}
    if family:
        md["modelspec.architecture"] = _ARCH[family]
    for k, v in (extra or {}).items():
        md[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return md


def _peft_config(modules: dict[str, LoraModule]) -> dict:
    ranks = Counter(m.rank for m in modules.values())
    r = ranks.most_common(1)[0][0]
    pattern = {f"^{p}": m.rank for p, m in modules.items() if m.rank != r}
    return {"peft_type": "LORA", "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(modules), "bias": "none", "use_rslora": False, "use_dora": False,
            "init_lora_weights": True}


def file_alpha(modules: dict[str, LoraModule]) -> float:
    """The one alpha a written kohya file gives every module: the most common nonzero alpha.

    diffusers reads a kohya file's per-module alphas into peft's alpha_pattern under names that never match the
    attention modules (`attn1.processor.to_q_lora.down.weight`), so those get the file's most common alpha
    whatever their own is. With one alpha per file every loader gets the same scale alpha / r per module.
    """
    alphas = Counter(m.alpha for m in modules.values() if m.alpha != 0)
    return float(alphas.most_common(1)[0][0]) if alphas else 1.0


def save_lora(lora: LoraFile | dict[str, LoraModule], path: str | os.PathLike, format: str = "kohya",
              family: str | None = None, metadata: dict[str, str] | None = None,
              dtype: torch.dtype | None = None) -> Path:
    """Write `lora` atomically in `format`; refuses inf/NaN. Metadata values are strings; kohya files get ss_*."""
    from safetensors.torch import save_file

    modules = lora.modules if isinstance(lora, LoraFile) else lora
    if isinstance(lora, LoraFile):
        family = family or lora.family
        dtype = dtype or lora.dtype
    dtype = dtype or torch.float32
    if format not in formats.WRITE_FORMATS:
        raise LcmError(f"cannot write format '{format}' (choose one of {', '.join(formats.WRITE_FORMATS)})")
    if not modules:
        raise LcmError("nothing to write: the LoRA has no modules")
    unet_config = None
    if format == "kohya-sgm":
        if family not in ("sdxl", "ssd1b"):
            raise LcmError(f"kohya-sgm names are for SDXL-family LoRAs; this one is {family or 'of unknown family'}")
        unet_config = unet_preset(family)
    down_s, up_s, alpha_s = formats.suffixes(format)
    alpha0 = file_alpha(modules) if alpha_s is not None else None
    sd: dict[str, torch.Tensor] = {}
    for p, m in modules.items():
        stem = formats.from_canonical(p, format, family, unet_config)
        m = m.loaded()
        a, b = m.A, m.B
        if alpha_s is None and m.scale != 1.0:  # no alpha key: bake the scale into B (fp32 then cast)
            b = b.float() * m.scale
        elif alpha_s is not None and m.alpha != alpha0:  # one alpha per file: bake alpha / alpha0 into A and B
            f = m.alpha / alpha0
            a, b = a.float() * (math.copysign(math.sqrt(abs(f)), f)), b.float() * math.sqrt(abs(f))
        a, b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        for name, t in (("A", a), ("B", b)):
            if not torch.isfinite(t).all():
                raise LcmError(f"refusing to write inf/NaN in module '{p}' ({name} factor, dtype {dtype})")
        if stem + down_s in sd:
            raise LcmError(f"two modules map to the same key '{stem}' in format {format}")
        sd[stem + down_s], sd[stem + up_s] = a, b
        if alpha_s is not None:
            sd[stem + alpha_s] = torch.tensor(float(alpha0), dtype=torch.float32)
    md = {k: str(v) for k, v in (metadata or {}).items() if k != "lora_adapter_metadata"}
    if format in ("kohya", "kohya-sgm"):
        md.update(kohya_metadata(modules, family))
    else:
        md = {k: v for k, v in md.items() if not k.startswith("ss_network")}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=md)
    if format == "peft" and path.name == "adapter_model.safetensors":
        atomic_write_json(path.parent / "adapter_config.json", _peft_config(modules))
    return path
