"""Engines behind `lcmtool merge`, `inspect` and `convert`: config dataclass in, report dict out."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Literal, Optional

import torch

from lcmtool import __version__
from lcmtool.errors import LcmError
from lcmtool.fileio import sha256_file
from lcmtool.lora import merge as M
from lcmtool.lora.io import LoraFile, LoraModule, base_metadata, load_lora, save_lora

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass
class MergeConfig:
    style: Optional[str] = None  # tau_style: the style LoRA (paper's tau')
    lcm: Optional[str] = None  # tau_LCM: the acceleration vector
    lambda1: float = 0.8  # weight of tau_style (paper eq. 3 uses 0.8)
    lambda2: float = 1.0  # weight of tau_LCM (paper eq. 3 uses 1.0)
    add: list[str] = dataclasses.field(default_factory=list)  # more vectors, "PATH:WEIGHT"
    method: Literal["concat", "svd", "fuse"] = "concat"  # concat is exact; svd truncates to `rank`
    rank: Optional[int] = None  # svd output rank
    model: Optional[str] = "demo:sd"  # base model (family for the LCM-LoRA default; fuse target)
    format: Literal["kohya", "kohya-sgm", "diffusers", "peft"] = "kohya"  # output key format
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto = the inputs' dtype
    lambda1_blocks: dict = dataclasses.field(default_factory=dict)  # e.g. {up: 0.8}: per-block lambda1
    lambda2_blocks: dict = dataclasses.field(default_factory=dict)  # e.g. {down: 1.0, mid: 1.0, up: 0.8}
    out: Optional[str] = None  # output .safetensors


@dataclasses.dataclass
class InspectConfig:
    file: str = ""
    family: Optional[str] = None  # override the family guess (needed only for SGM names of non-SDXL)


@dataclasses.dataclass
class ConvertConfig:
    file: str = ""
    format: Literal["kohya", "kohya-sgm", "diffusers", "peft"] = "kohya"
    out: str = ""
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"


def block_of(path: str) -> str:
    """'down' / 'mid' / 'up' / 'te' / 'other' - the coarse block used by per-block lambdas and norms."""
    if path.startswith("down_blocks."):
        return "down"
    if path.startswith("mid_block."):
        return "mid"
    if path.startswith("up_blocks."):
        return "up"
    if path.startswith("text_encoder"):
        return "te"
    return "other"


def _number(value, what: str) -> float:
    if isinstance(value, bool):
        raise LcmError(f"{what} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise LcmError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise LcmError(f"{what} must be finite, got {value!r}")
    return v


def block_lambdas(spec: dict | str, what: str) -> dict[str, float]:
    """{'down': 1.0, 'up_blocks.1': 0.5} (or 'down=1.0,up=0.8'); keys: down/mid/up/te/other or a module prefix."""
    if isinstance(spec, str):
        items = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            if "=" not in part:
                raise LcmError(f"{what} takes block=value pairs, got {part!r}")
            k, v = part.split("=", 1)
            items[k.strip()] = v.strip()
        spec = items
    return {str(k): _number(v, f"{what}[{k}]") for k, v in spec.items()}


def _lambda_for(path: str, base: float, blocks: dict[str, float]) -> float:
    """The most specific matching key wins: module-path prefix (longest) > coarse block > global lambda."""
    best = None
    for k in blocks:
        if k not in ("down", "mid", "up", "te", "other") and (path == k or path.startswith(k + ".")):
            if best is None or len(k) > len(best):
                best = k
    if best is not None:
        return blocks[best]
    return blocks.get(block_of(path), base)


def summarize(lf: LoraFile) -> dict:
    ranks = Counter(m.rank for m in lf.modules.values())
    alphas = Counter(m.alpha for m in lf.modules.values())
    return {"path": lf.path, "format": lf.format, "family": lf.family, "modules": len(lf.modules),
            "rank": {str(k): v for k, v in sorted(ranks.items())},
            "alpha": {f"{k:g}": v for k, v in sorted(alphas.items())}, "dtype": str(lf.dtype).replace("torch.", "")}


def _parse_add(item: str) -> tuple[str, float]:
    if ":" not in item:
        raise LcmError(f"--add takes PATH:WEIGHT, got {item!r}")
    path, w = item.rsplit(":", 1)
    return path, _number(w, f"weight of {path}")


def _out_dtype(cfg_dtype: str, inputs: list[LoraFile]) -> torch.dtype:
    if cfg_dtype != "auto":
        return _DTYPES[cfg_dtype]
    dts = {lf.dtype for lf in inputs}
    return dts.pop() if len(dts) == 1 else torch.float32


def _family(inputs: list[LoraFile]) -> str | None:
    fams = {lf.family for lf in inputs if lf.family}
    if len(fams) > 1:
        # SSD-1B is an SDXL with fewer layers: a module-set subset of SDXL, so the two mix.
        if fams == {"sdxl", "ssd1b"}:
            return "sdxl"
        listing = ", ".join(f"{Path(lf.path).name}={lf.family}" for lf in inputs if lf.family)
        raise LcmError(f"LoRAs of different model families cannot be merged: {listing}")
    return fams.pop() if fams else None


def default_lcm(model: str | None) -> str:
    """The LCM-LoRA lcmtool ships for `model`; LcmError where there is none."""
    from lcmtool.models import ASSETS, DEMO_LCM_LORAS

    name = (model or "").removeprefix("demo:")
    if model and model.startswith("demo:") and name in DEMO_LCM_LORAS and (ASSETS / DEMO_LCM_LORAS[name]).is_file():
        return str(ASSETS / DEMO_LCM_LORAS[name])
    raise LcmError("--lcm is required" + (f" (lcmtool ships no LCM-LoRA for model '{model}')" if model else ""))


def run_merge(cfg: MergeConfig) -> dict:
    """tau'_LCM = lambda1 * tau_style + lambda2 * tau_LCM (+ sum w_i tau_i), written as one LoRA file."""
    # 1. validate the request before reading anything big
    if cfg.method == "fuse":
        raise LcmError("--method fuse is not built yet; merge to a LoRA file and fuse it when sampling")
    if not cfg.out:
        raise LcmError("--out is required")
    if cfg.method == "svd" and cfg.rank is None:
        raise LcmError("--method svd needs --rank R")
    lam1 = _number(cfg.lambda1, "--lambda1")
    lam2 = _number(cfg.lambda2, "--lambda2")
    b1, b2 = block_lambdas(cfg.lambda1_blocks, "lambda1_blocks"), block_lambdas(cfg.lambda2_blocks, "lambda2_blocks")
    specs: list[tuple[str, str, float, dict]] = []  # (role, path, weight, block overrides)
    if cfg.style:
        specs.append(("style", cfg.style, lam1, b1))
    if cfg.lcm or cfg.style:
        specs.append(("lcm", cfg.lcm or default_lcm(cfg.model), lam2, b2))
    for item in cfg.add:
        path, w = _parse_add(item)
        specs.append(("add", path, w, {}))
    if not specs:
        raise LcmError("nothing to merge: give --style (and --lcm) or --add PATH:WEIGHT")
    out = Path(cfg.out)
    if any(Path(p).resolve() == out.resolve() for _, p, _, _ in specs):
        raise LcmError(f"--out {out} is one of the inputs")
    # 2. read every input into the canonical form; families must agree
    inputs = [load_lora(p) for _, p, _, _ in specs]
    family = _family(inputs)
    # 3. per-module terms (module path -> [(module, lambda)]), per-block lambdas applied
    terms: dict[str, list[M.Term]] = {}
    for (_, _, w, blocks), lf in zip(specs, inputs, strict=True):
        for p, m in lf.modules.items():
            terms.setdefault(p, []).append((m, _lambda_for(p, w, blocks) if blocks else w))
    # 4. merge each module (fp32 math, stored in the output dtype)
    dtype = _out_dtype(cfg.dtype, inputs)
    merged: dict[str, LoraModule] = {}
    errs: dict[str, float] = {}
    for p, ts in terms.items():
        if cfg.method == "concat":
            m = M.concat(p, ts)
        elif cfg.method == "svd":
            m, errs[p] = M.svd(p, ts, cfg.rank)
        else:
            raise LcmError(f"unknown method {cfg.method}")
        if m is not None:  # cast now: holding every merged module in fp32 would double the peak memory
            merged[p] = LoraModule(A=m.A.to(dtype), B=m.B.to(dtype), alpha=m.alpha)
    # 5. write with metadata saying how it was made
    record = {"version": __version__, "command": "merge", "method": cfg.method, "rank": cfg.rank,
              "lambda1": lam1, "lambda2": lam2, "lambda1_blocks": b1, "lambda2_blocks": b2,
              "inputs": [{"role": role, "path": str(p), "sha256": sha256_file(p), "weight": w}
                         for role, p, w, _ in specs]}
    md = base_metadata(family, title=out.stem, extra={"modelspec.merged_from": ", ".join(
        Path(p).name for _, p, _, _ in specs), "lcmtool": record})
    save_lora(merged, out, format=cfg.format, family=family, metadata=md, dtype=dtype)
    # 6. report
    seen = Counter(p for lf in inputs for p in lf.modules)
    only = {lf.path: sum(1 for p in lf.modules if seen[p] == 1) for lf in inputs}
    ranks = [m.rank for m in merged.values()]
    rep = {"out": str(out), "format": cfg.format, "method": cfg.method, "family": family,
           "dtype": str(dtype).replace("torch.", ""), "modules": len(merged),
           "rank_min": min(ranks, default=0), "rank_max": max(ranks, default=0),
           "inputs": [dict(summarize(lf), role=role, weight=w)
                      for (role, _, w, _), lf in zip(specs, inputs, strict=True)],
           "only_in_one_input": only, "dropped_zero_weight": len(terms) - len(merged)}
    if cfg.method == "svd":
        vals = list(errs.values())
        worst = max(errs, key=errs.get) if errs else None
        rep["svd_rel_error"] = {"max": max(vals, default=0.0), "mean": sum(vals) / len(vals) if vals else 0.0,
                                "worst_module": worst}
    return rep


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
    dtype = lf.dtype if cfg.dtype == "auto" else _DTYPES[cfg.dtype]
    md = {k: v for k, v in lf.metadata.items() if k != "lora_adapter_metadata"}
    md["lcmtool"] = json.dumps({"version": __version__, "command": "convert", "from_format": lf.format,
                                "input": {"path": str(cfg.file), "sha256": sha256_file(cfg.file)}})
    md.setdefault("modelspec.sai_model_spec", "1.0.0")
    md.update({k: v for k, v in base_metadata(lf.family, Path(cfg.out).stem).items() if k not in md})
    save_lora(lf.modules, cfg.out, format=cfg.format, family=lf.family, metadata=md, dtype=dtype)
    return {"out": cfg.out, "from_format": lf.format, "format": cfg.format, "family": lf.family,
            "modules": len(lf.modules), "dtype": str(dtype).replace("torch.", "")}
