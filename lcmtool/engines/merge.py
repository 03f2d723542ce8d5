"""Engine behind `lcmtool merge` (task arithmetic, eq. 3, and fuse); `inspect` and `convert` live in
engines/lora_tools.py and are re-exported here. Config dataclass in, report dict out."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch

from lcmtool import __version__
from lcmtool.config import published_with
from lcmtool.engines.lora_tools import run_convert, run_inspect, summarize  # noqa: F401 - re-exported
from lcmtool.errors import LcmError
from lcmtool.fileio import sha256_file
from lcmtool.lora import formats
from lcmtool.lora import math as M
from lcmtool.lora.io import LoraFile, LoraModule, base_metadata, layout, load_lora, save_lora
from lcmtool.lora.metadata import portable
from lcmtool.lora.parallel import merge_modules
from lcmtool.models.load import torch_dtype
from lcmtool.options import ConvertConfig, InspectConfig, MergeConfig  # noqa: F401 - declared in lcmtool/options.py


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


def _parse_add(item: str) -> tuple[str, float]:
    if ":" not in item:
        raise LcmError(f"--add takes PATH:WEIGHT, got {item!r}")
    path, w = item.rsplit(":", 1)
    return path, _number(w, f"weight of {path}")


def _out_dtype(cfg_dtype: str, inputs: list[LoraFile]) -> torch.dtype:
    if cfg_dtype != "auto":
        return torch_dtype(cfg_dtype)
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
    from lcmtool.models.load import resolve_model

    ref = resolve_model(model) if model else None
    if ref is not None and ref.lcm_lora and Path(ref.lcm_lora).is_file():
        return ref.lcm_lora
    raise LcmError("--lcm is required" + (f" (lcmtool ships no LCM-LoRA for model '{model}')" if model else ""))


def run_merge(cfg: MergeConfig) -> dict:
    """tau'_LCM = lambda1 * tau_style + lambda2 * tau_LCM (+ sum w_i tau_i), written as one LoRA file (concat /
    svd) or baked into the base model's weights (fuse)."""
    from concurrent.futures import ThreadPoolExecutor

    # 1. validate the request before reading anything big
    fmt, specs, lams = _check_request(cfg)
    out = Path(cfg.out)
    # 2. read every input into the canonical form; families must agree; every module must be one of the model's
    inputs = [load_lora(p, lazy=True) for _, p, _, _ in specs]
    family = _family(inputs)
    dropped = _check_modules(cfg, inputs, family)
    summaries = [summarize(lf) for lf in inputs]
    seen = Counter(p for lf in inputs for p in lf.modules)
    only = {lf.path: sum(1 for p in lf.modules if seen[p] == 1) for lf in inputs}
    # 3. per-module terms (module path -> [(module, lambda)]), per-block lambdas applied; from here the terms hold
    #    the only references to the input factors, so each module's inputs are freed once it is merged
    terms: dict[str, list[M.Term]] = {}
    for (_, _, w, blocks), lf in zip(specs, inputs, strict=True):
        for p, m in lf.modules.items():
            terms.setdefault(p, []).append((m, _lambda_for(p, w, blocks) if blocks else w))
        lf.modules = {}
    n_terms = len(terms)
    # 4. merge each module (fp32 math, stored in the output dtype; fuse keeps fp32 for the weights), hashing the
    #    inputs for the record in a background thread meanwhile
    dtype = _out_dtype(cfg.dtype, inputs) if cfg.method != "fuse" else None
    with ThreadPoolExecutor(1) as ex:
        hashes = ex.submit(lambda: [sha256_file(p) for _, p, _, _ in specs])
        try:
            merged, errs = merge_modules(terms, "svd" if cfg.method == "svd" else "concat", cfg.rank, dtype)
        except ValueError as e:  # the math's word for inputs that do not agree
            raise LcmError(str(e)) from None
        sha = hashes.result()
    # 5. write with metadata saying how it was made (input files by name and hash, never their folders)
    record = dict(lams, version=__version__, command="merge", method=cfg.method, rank=cfg.rank,
                  inputs=[{"role": role, "path": portable(p), "sha256": h, "weight": w}
                          for (role, p, w, _), h in zip(specs, sha, strict=True)])
    inputs_rep = [dict(sm, role=role, weight=w) for (role, _, w, _), sm in zip(specs, summaries, strict=True)]
    common = dict(inputs=inputs_rep, only_in_one_input=only, dropped_zero_weight=n_terms - len(merged),
                  dropped_unknown=dropped)
    if cfg.method == "fuse":
        record["model"] = _model_name(cfg.model)
        with published_with(cfg, cfg.out):  # the model and its resolved config: both or neither
            rep = _fuse(cfg, fmt, merged, family, record)
        return dict(rep, **common)
    md = base_metadata(family, title=out.stem, extra={"modelspec.merged_from": ", ".join(
        portable(p) for _, p, _, _ in specs), "lcmtool": record, **_resolution(inputs)})
    with published_with(cfg, out):  # the LoRA and its resolved config: both or neither
        save_lora(merged, out, format=fmt, family=family, metadata=md, dtype=dtype)
    return _merge_report(cfg, out, layout(merged, fmt, family), family, dtype, merged, errs, common)


def _reference(cfg: MergeConfig, family: str | None) -> tuple[dict, bool, str]:
    """The module set the inputs must fit -> (path -> weight shape, check shapes too, what it is): for fuse the
    --model folder's; else the family's when the LoRAs tell it; else (tiny or unusual UNets) the names of any
    SD-family preset or of --model."""
    from lcmtool.lora import fit
    from lcmtool.lora.io import FAMILIES
    from lcmtool.models.load import resolve_model

    ref = resolve_model(cfg.model) if cfg.model else None
    folder = ref.location if ref is not None and ref.kind == "folder" else None
    if folder and not (Path(folder) / "unet" / "config.json").is_file():
        folder = None
    if cfg.method == "fuse" and folder:
        return fit.folder_shapes(folder), True, f"--model {cfg.model}"
    if family:
        return fit.family_shapes(family), True, f"the {family} model family"
    names: dict = dict(fit.folder_shapes(folder)) if folder else {}
    for fam in FAMILIES:
        names.update(fit.family_shapes(fam))
    return names, False, f"--model {cfg.model} or any SD-1.5 / SDXL model"


def _check_modules(cfg: MergeConfig, inputs: list[LoraFile], family: str | None) -> dict[str, int]:
    """Refuse modules that two inputs give different shapes, modules the model does not have (or, with
    --drop-unknown, drop them: -> count per input) and modules whose weight shape is not the model's."""
    from lcmtool.lora import fit

    first: dict[str, tuple[LoraFile, tuple]] = {}
    for lf in inputs:  # two inputs that disagree on a module's shape, named by file
        for p, m in lf.modules.items():
            o, shape = first.setdefault(p, (lf, tuple(m.out_shape)))
            if M.comparable(shape) != M.comparable(tuple(m.out_shape)):
                raise LcmError(f"shape conflict in module '{p}': {list(shape)} in {o.path} vs "
                               f"{list(m.out_shape)} in {lf.path}")
    shapes, check_shapes, what = _reference(cfg, family)
    dropped: dict[str, int] = {}
    for lf in inputs:
        unknown, wrong = fit.misfits(lf.modules, shapes)
        if wrong and check_shapes:
            p = wrong[0]
            raise LcmError(f"{lf.path}: module '{p}' changes a {list(lf.modules[p].out_shape)} weight but in {what} "
                           f"it is {list(shapes[p])} (a LoRA for another model?)")
        if unknown and not cfg.drop_unknown:
            raise LcmError(f"{lf.path}: module '{unknown[0]}' does not exist in {what} ({len(unknown)} such "
                           "modules; --drop-unknown drops them)")
        for p in unknown:
            del lf.modules[p]
        dropped[portable(lf.path)] = len(unknown)
    return dropped


def _resolution(inputs: list[LoraFile]) -> dict:
    """The inputs' modelspec.resolution where they agree on one (else save_lora's family default)."""
    res = {lf.metadata.get("modelspec.resolution") for lf in inputs}
    return {"modelspec.resolution": res.pop()} if len(res) == 1 and None not in res else {}


def _model_name(model: str | None) -> str | None:
    """A model spec for the record: registered names and hub ids as given, local paths by file name."""
    return portable(model) if model and Path(model).expanduser().exists() else model


def _check_request(cfg: MergeConfig) -> tuple[str, list[tuple[str, str, float, dict]], dict]:
    """Every flag checked before anything is read -> (output format, input specs (role, path, weight, block
    overrides), the lambdas for the record)."""
    if cfg.method not in ("concat", "svd", "fuse"):
        raise LcmError(f"unknown --method '{cfg.method}' (concat | svd | fuse)")
    if not cfg.out:
        raise LcmError("--out is required")
    if cfg.method == "svd" and cfg.rank is None:
        raise LcmError("--method svd needs --rank R")
    if cfg.method == "svd" and cfg.rank < 1:
        raise LcmError(f"--rank must be at least 1, got {cfg.rank}")
    fmt = _output_format(cfg)
    if cfg.method == "fuse" and not cfg.model:
        raise LcmError("--method fuse needs --model (the base model to bake the LoRAs into)")
    if cfg.method == "fuse" and fmt == "diffusers":
        _check_folder_out(Path(cfg.out))
    lam1 = _number(cfg.lambda1, "--lambda1")
    lam2 = _number(cfg.lambda2, "--lambda2")
    b1, b2 = block_lambdas(cfg.lambda1_blocks, "lambda1_blocks"), block_lambdas(cfg.lambda2_blocks, "lambda2_blocks")
    specs: list[tuple[str, str, float, dict]] = []
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
    return fmt, specs, {"lambda1": lam1, "lambda2": lam2, "lambda1_blocks": b1, "lambda2_blocks": b2}


def _merge_report(cfg: MergeConfig, out: Path, fmt: str, family: str | None, dtype, merged: dict, errs: dict,
                  common: dict) -> dict:
    ranks = [m.rank for m in merged.values()]
    rep = {"out": str(out), "format": fmt, "method": cfg.method, "family": family,
           "dtype": str(dtype).replace("torch.", ""), "modules": len(merged),
           "rank_min": min(ranks, default=0), "rank_max": max(ranks, default=0), **common}
    if cfg.method == "svd":
        vals = list(errs.values())
        worst = max(errs, key=errs.get) if errs else None
        rep["svd_rel_error"] = {"max": max(vals, default=0.0), "mean": sum(vals) / len(vals) if vals else 0.0,
                                "worst_module": worst}
    return rep


def _output_format(cfg: MergeConfig) -> str:
    """`--format` resolved per method: LoRA key formats for concat / svd, diffusers folder / single file for fuse."""
    fmt = cfg.format
    if cfg.method == "fuse":
        fmt = "diffusers" if fmt in ("auto", None) else fmt
        if fmt not in ("diffusers", "single-file"):
            raise LcmError(f"--method fuse writes a model: --format diffusers (a folder) or single-file, not {fmt}")
        return fmt
    fmt = "kohya" if fmt in ("auto", None) else fmt
    if fmt not in formats.WRITE_FORMATS:
        raise LcmError(f"--format {fmt} is not a LoRA format (choose one of {', '.join(formats.WRITE_FORMATS)};"
                       " single-file is for --method fuse)")
    return fmt


def _stored_dtype(model: str) -> torch.dtype:
    """The dtype the base model's UNet weights are stored in (fp32 when that cannot be read cheaply)."""
    from safetensors import safe_open

    from lcmtool.models.load import resolve_model

    ref = resolve_model(model)
    if ref.kind == "folder":
        files = sorted((Path(ref.location) / "unet").glob("*.safetensors"))
    elif ref.kind == "single-file" and ref.location.endswith(".safetensors"):
        files = [Path(ref.location)]
    else:
        files = []
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                if "diffusion_model" in k or ref.kind != "single-file":
                    dt = h.get_slice(k).get_dtype()
                    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(dt, torch.float32)
    return torch.float32


def _fuse(cfg: MergeConfig, fmt: str, merged: dict[str, LoraModule], family: str | None, record: dict) -> dict:
    """theta = theta_pre + tau'_LCM: load the base in fp32, add every merged delta, write a diffusers folder or
    a single-file checkpoint (atomically) in the base's stored dtype unless --dtype says otherwise."""
    from lcmtool.lora.fuse import fuse_into_pipeline, nonfinite_module
    from lcmtool.models.load import load_pipeline

    dtype = _stored_dtype(cfg.model) if cfg.dtype == "auto" else torch_dtype(cfg.dtype)
    pipe, model_family = load_pipeline(cfg.model, dtype=torch.float32, device="cpu")
    if family and family != model_family and {family, model_family} != {"sdxl", "ssd1b"}:
        raise LcmError(f"the LoRAs are for {family} but --model {cfg.model} is {model_family}")
    with torch.no_grad():
        n = fuse_into_pipeline(pipe, [(LoraFile(modules=merged, family=family), 1.0)])
    pipe.to(dtype)
    bad = nonfinite_module(pipe, merged)
    if bad:
        raise LcmError(f"the fused weight of module '{bad}' overflows {str(dtype).replace('torch.', '')} (inf/NaN); "
                       "choose --dtype fp32 or bf16")
    out = Path(cfg.out)
    if fmt == "diffusers":
        _save_folder_atomic(pipe, out, record)
    else:
        _save_single_file(pipe, out, family or model_family, record)
    return {"out": str(out), "format": fmt, "method": "fuse", "model": _model_name(cfg.model), "family": model_family,
            "dtype": str(dtype).replace("torch.", ""), "modules": n}


def _save_folder_atomic(pipe, out: Path, record: dict) -> None:
    """save_pretrained into a temp folder of ours beside `out`, then rename it into place (an old pipeline folder
    at `out` is swapped out and removed only after the new one is in place: fileio.atomic_dir)."""
    from lcmtool.fileio import atomic_dir, atomic_write_json

    _check_folder_out(out)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        _scrub_configs(tmp)
        atomic_write_json(tmp / "lcmtool_merge.json", record)


def _scrub_configs(folder: Path) -> None:
    """diffusers writes the folder a model was loaded from as `_name_or_path` (model_index.json and each
    component's config.json): no local folder leaves with it."""
    for f in [folder / "model_index.json", *folder.glob("*/config.json")]:
        cfg = json.loads(f.read_text())
        if "_name_or_path" in cfg and Path(str(cfg["_name_or_path"])).expanduser().is_absolute():
            del cfg["_name_or_path"]
            f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _check_folder_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and ((out / "model_index.json").is_file() or not any(out.iterdir()))):
        raise LcmError(f"--out {out} exists and is not a diffusers pipeline folder; not overwriting it")


def _save_single_file(pipe, out: Path, family: str, record: dict) -> None:
    """One LDM / SGM-named checkpoint (what A1111 and ComfyUI load), through lcmtool.models.export, written by
    lcmtool's own safetensors writer (one temp file, removed on failure; data hash in the header)."""
    from lcmtool.lora.metadata import modelspec
    from lcmtool.lora.stfile import write_safetensors
    from lcmtool.models.export import to_single_file

    sd = to_single_file(pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    md = modelspec(family, out.stem, sgm_names=True, lora=False, resolution=f"{size}x{size}")
    md["lcmtool"] = json.dumps(record, sort_keys=True)
    write_safetensors(sd, out, md)
