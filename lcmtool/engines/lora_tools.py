"""Engines behind `lcmtool inspect` (describe a LoRA) and `lcmtool convert` (rewrite its keys in another format)."""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

from lcmtool import __version__
from lcmtool.config import write_resolved
from lcmtool.errors import LcmError
from lcmtool.fileio import sha256_file
from lcmtool.lora.io import LoraFile, LoraModule, base_metadata, load_lora, save_lora
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


def run_inspect(cfg: InspectConfig) -> dict:
    lf = load_lora(cfg.file, family=cfg.family)
    norms: dict[str, float] = {}
    for p, m in lf.modules.items():
        key = re.match(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block|text_encoder_2|text_encoder)", p)
        k = key.group(1) if key else "other"
        norms[k] = norms.get(k, 0.0) + _frob(m) ** 2
    rep = summarize(lf)
    rep["block_norms"] = {k: math.sqrt(v) for k, v in sorted(norms.items())}
    rep["metadata"] = {k: (v if len(v) <= 300 else v[:300] + "...") for k, v in sorted(lf.metadata.items())}
    return rep


def run_convert(cfg: ConvertConfig) -> dict:
    if not cfg.file or not cfg.out:
        raise LcmError("convert needs FILE and --out")
    if Path(cfg.file).resolve() == Path(cfg.out).resolve():
        raise LcmError("--out must differ from the input file")
    lf = load_lora(cfg.file)
    dtype = lf.dtype if cfg.dtype == "auto" else torch_dtype(cfg.dtype)
    md = {k: v for k, v in lf.metadata.items() if k != "lora_adapter_metadata"}
    md["lcmtool"] = json.dumps({"version": __version__, "command": "convert", "from_format": lf.format,
                                "input": {"path": str(cfg.file), "sha256": sha256_file(cfg.file)}})
    md.setdefault("modelspec.sai_model_spec", "1.0.0")
    md.update({k: v for k, v in base_metadata(lf.family, Path(cfg.out).stem).items() if k not in md})
    save_lora(lf.modules, cfg.out, format=cfg.format, family=lf.family, metadata=md, dtype=dtype)
    write_resolved(cfg, Path(cfg.out).with_suffix(".yaml"))
    return {"out": cfg.out, "from_format": lf.format, "format": cfg.format, "family": lf.family,
            "modules": len(lf.modules), "dtype": str(dtype).replace("torch.", "")}
