"""Engines behind `lcmtool inspect` (describe a LoRA) and `lcmtool convert` (rewrite its keys in another format)."""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch

from lcmtool import __version__
from lcmtool.config import published_with
from lcmtool.errors import LcmError
from lcmtool.fileio import json_safe, sha256_file
from lcmtool.lora.io import LoraFile, LoraModule, base_metadata, layout, load_lora, save_lora
from lcmtool.lora.metadata import portable
from lcmtool.lora.stfile import HASH_KEYS
from lcmtool.models.load import torch_dtype
from lcmtool.options import ConvertConfig, InspectConfig


def summarize(lf: LoraFile) -> dict:
    ranks = Counter(m.rank for m in lf.modules.values())
    alphas = Counter(m.alpha for m in lf.modules.values())
    return {"path": lf.path, "format": lf.format, "family": lf.family, "modules": len(lf.modules),
            "rank": {str(k): v for k, v in sorted(ranks.items())},
            "alpha": {f"{k:g}": v for k, v in sorted(alphas.items())}, "dtype": str(lf.dtype).replace("torch.", "")}


def _frob(m: LoraModule) -> float:
    """||scale * B @ A||_F without forming the product: sqrt(trace((B^T B)(A A^T)))."""
    b = m.B.float().reshape(m.B.shape[0], m.rank)
    a = m.A.float().reshape(m.rank, -1)
    return abs(m.scale) * math.sqrt(max(0.0, float(((b.T @ b) * (a @ a.T)).sum())))


def _nonfinite(m: LoraModule) -> int:
    return int((~torch.isfinite(m.A)).sum()) + int((~torch.isfinite(m.B)).sum())


def run_inspect(cfg: InspectConfig) -> dict:
    """Describe a LoRA; a damaged one is described too: modules holding inf/NaN are counted and named, and
    their blocks' norms are null."""
    lf = load_lora(cfg.file, family=cfg.family, check=False)
    norms: dict[str, float] = {}
    bad: dict[str, int] = {}
    for p, m in lf.modules.items():
        key = re.match(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block|text_encoder_2|text_encoder)", p)
        k = key.group(1) if key else "other"
        n = _nonfinite(m)
        if n:
            bad[p] = n
            norms[k] = math.nan
        elif not math.isnan(norms.get(k, 0.0)):
            norms[k] = norms.get(k, 0.0) + _frob(m) ** 2
    rep = summarize(lf)
    rep["block_norms"] = {k: math.sqrt(v) for k, v in sorted(norms.items())}
    rep["non_finite"] = {"modules": len(bad), "values": sum(bad.values()), "first_module": next(iter(bad), None)}
    rep["metadata"] = {k: (v if len(v) <= 300 else v[:300] + "...") for k, v in sorted(lf.metadata.items())}
    return json_safe(rep)


def run_convert(cfg: ConvertConfig) -> dict:
    if not cfg.file or not cfg.out:
        raise LcmError("convert needs FILE and --out")
    out = Path(cfg.out)
    if out.is_dir():
        raise LcmError(f"--out {out} is a folder; convert writes one .safetensors file")
    if Path(cfg.file).resolve() == out.resolve():
        raise LcmError("--out must differ from the input file")
    lf = load_lora(cfg.file)
    dtype = lf.dtype if cfg.dtype == "auto" else torch_dtype(cfg.dtype)
    md = {k: v for k, v in lf.metadata.items() if k != "lora_adapter_metadata" and k not in HASH_KEYS}
    md["lcmtool"] = json.dumps({"version": __version__, "command": "convert", "from_format": lf.format,
                                "input": {"path": portable(cfg.file), "sha256": sha256_file(cfg.file)}})
    md.update({k: v for k, v in base_metadata(lf.family, out.stem).items() if k not in md})
    with published_with(cfg, out):  # the LoRA and its resolved config: both or neither
        save_lora(lf.modules, out, format=cfg.format, family=lf.family, metadata=md, dtype=dtype)
    return {"out": cfg.out, "from_format": lf.format, "format": layout(lf.modules, cfg.format, lf.family),
            "family": lf.family, "modules": len(lf.modules), "dtype": str(dtype).replace("torch.", "")}
