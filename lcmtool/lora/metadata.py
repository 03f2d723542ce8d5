"""The header metadata of the LoRA files lcmtool writes: kohya's `ss_*` keys, ModelSpec 1.0.1 (`modelspec.*`) and
lcmtool's own record, so that kohya's tools, A1111, ComfyUI, SwarmUI and civitai read what the file is.

Written metadata names no local folder: inputs are recorded by file name and sha256 (`portable`).
"""
from __future__ import annotations

import datetime
import json
from collections import Counter
from pathlib import Path

from lcmtool import __version__

SPEC_VERSION = "1.0.1"
# kohya ss_base_model_version and ModelSpec architecture / native resolution per family
BASE_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0", "ssd1b": "sdxl_base_v1-0"}
ARCH = {"sd15": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base", "ssd1b": "stable-diffusion-xl-v1-base"}
RESOLUTION = {"sd15": "512x512", "sdxl": "1024x1024", "ssd1b": "1024x1024"}
# ModelSpec: `implementation` is "the standard implementation codebase" whose variable names the tensor keys follow,
# static across files of one format (the values kohya's sd-scripts writes): SGM block names -> Stability's
# generative-models, diffusers module names -> diffusers. The tool that wrote the file goes in
# `implementation_version` (as sd-scripts writes "sd-scripts/<commit>") and in lcmtool's own `lcmtool` record.
IMPL_SGM = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"
WRITER = f"lcmtool/{__version__}"


def portable(path: str | Path) -> str:
    """What written metadata says about a local file: its name, never the folder it sits in."""
    return Path(str(path)).name


def portable_values(record: dict) -> dict:
    """`record` (a resolved config) with every local path reduced to its file name (issue 16: written metadata
    holds no absolute local paths); specs such as demo:sd or a hub id are kept."""
    def one(v):
        if isinstance(v, str) and (Path(v).is_absolute() or (("/" in v or "\\" in v) and Path(v).exists())):
            return portable(v)
        if isinstance(v, dict):
            return {k: one(x) for k, x in v.items()}
        if isinstance(v, list):
            return [one(x) for x in v]
        return v

    return one(record)


def modelspec(family: str | None, title: str, sgm_names: bool, lora: bool = True,
              resolution: str | None = None) -> dict[str, str]:
    """The ModelSpec keys of a file lcmtool writes (MUST: sai_model_spec, architecture, implementation, title,
    resolution; SHOULD: date). architecture and resolution only where the family is known."""
    md = {"modelspec.sai_model_spec": SPEC_VERSION, "modelspec.title": title,
          "modelspec.implementation": IMPL_SGM if sgm_names else IMPL_DIFFUSERS,
          "modelspec.implementation_version": WRITER,
          "modelspec.date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if family in ARCH:
        md["modelspec.architecture"] = ARCH[family] + ("/lora" if lora else "")
    if resolution or family in RESOLUTION:
        md["modelspec.resolution"] = resolution or RESOLUTION[family]
    return md


def base_metadata(family: str | None, title: str, extra: dict | None = None) -> dict[str, str]:
    """Title, date and architecture of a LoRA plus `extra` (non-strings as JSON); `save_lora` completes the
    ModelSpec keys that depend on the key names it writes."""
    md = {k: v for k, v in modelspec(family, title, sgm_names=False).items()
          if k not in ("modelspec.implementation", "modelspec.implementation_version")}
    for k, v in (extra or {}).items():
        md[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return md


def _one_or_dynamic(values: Counter, fmt=str) -> str:
    """kohya's convention: the value when every module shares it, else "Dynamic" (as resize_lora.py writes)."""
    if not values:
        return "0"
    return fmt(next(iter(values))) if len(values) == 1 else "Dynamic"


def kohya_metadata(ranks: dict[str, int], alphas: dict[str, float], family: str | None) -> dict[str, str]:
    """ss_network_* of a kohya file whose modules have `ranks` and `alphas` (as written)."""
    md = {"ss_network_module": "networks.lora",
          "ss_network_dim": _one_or_dynamic(Counter(ranks.values())),
          "ss_network_alpha": _one_or_dynamic(Counter(alphas.values()), lambda a: f"{a:g}")}
    if family in BASE_VERSION:
        md["ss_base_model_version"] = BASE_VERSION[family]
    return md


def rank_record(ranks: dict[str, int]) -> str:
    """lcmtool's own rank record (JSON): max and min, and the rank of every module when they differ."""
    rec: dict = {"max": max(ranks.values(), default=0), "min": min(ranks.values(), default=0)}
    if len(set(ranks.values())) > 1:
        rec["modules"] = ranks
    return json.dumps(rec, sort_keys=True)


def file_alpha(alphas: list[float]) -> float:
    """The one alpha a written kohya file gives every module: the most common nonzero alpha.

    diffusers reads a kohya file's per-module alphas into peft's alpha_pattern under names that never match the
    attention modules (`attn1.processor.to_q_lora.down.weight`), so those get the file's most common alpha
    whatever their own is. With one alpha per file every loader gets the same scale alpha / r per module.
    """
    counts = Counter(a for a in alphas if a != 0)
    return float(counts.most_common(1)[0][0]) if counts else 1.0


def peft_config(ranks: dict[str, int]) -> dict:
    """adapter_config.json of a peft file (scales are baked into B, so alpha = r for every module)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {f"^{p}": k for p, k in ranks.items() if k != r}
    return {"peft_type": "LORA", "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(ranks), "bias": "none", "use_rslora": False, "use_dora": False,
            "init_lora_weights": True}
