"""Where a model comes from and how it loads: a diffusers folder, a single-file checkpoint, a hub id, or a name
that a plug-in registered (the embedded demo registers `demo:sd` and `demo:xl`, see lcmtool/demo/__init__.py).

`resolve_model(spec)` -> ModelRef (what and where, no weights loaded); `load_pipeline(spec, ...)` loads a
diffusers pipeline and tells its family ("sd15" | "sdxl" | "ssd1b"). The one dtype table is here.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lcmtool.errors import LcmError, first_line

# Modules that register named models and data sources when imported (the one shipped plug-in is the demo world).
PLUGINS = ("lcmtool.demo",)
DTYPE_NAMES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class ModelRef:
    spec: str                    # what the user typed
    kind: str                    # "folder" | "single-file" | "hub"
    location: str                # a path or a hub id
    lcm_lora: str | None = None  # an LCM-LoRA shipped for this model (applied by default with lcm/tcd)
    strict_family: bool = True   # False: tiny models whose LoRAs' family guess says nothing (the demo's)


_SCHEMES: dict[str, Callable[[str], ModelRef]] = {}
_loaded = False


def register_model_scheme(scheme: str, resolve: Callable[[str], ModelRef]) -> None:
    """`scheme:name` specs (e.g. `demo:sd`) resolve through `resolve(spec)`, which returns a ModelRef or raises."""
    _SCHEMES[scheme] = resolve


def load_plugins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for name in PLUGINS:
            importlib.import_module(name)


def torch_dtype(name: str):
    """'fp32' | 'fp16' | 'bf16' -> torch dtype (the one table; every command's --dtype goes through it)."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def resolve_model(spec: str) -> ModelRef:
    scheme, sep, _ = spec.partition(":")
    if sep and scheme.isidentifier() and len(scheme) > 1:  # "demo:sd"; not "C:\\..." or a path with a colon
        load_plugins()
        if scheme in _SCHEMES:
            return _SCHEMES[scheme](spec)
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise LcmError(f"{spec} is a folder but not a diffusers pipeline (no model_index.json)")
        return ModelRef(spec, "folder", str(p))
    if p.suffix in (".safetensors", ".ckpt", ".pt", ".bin") or p.exists():
        if not p.is_file():
            raise LcmError(f"model file not found: {spec}")
        return ModelRef(spec, "single-file", str(p))
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return ModelRef(spec, "hub", spec)
    known = ", ".join(f"{s}:..." for s in sorted(_SCHEMES))
    raise LcmError(f"model not found: {spec} (expected a diffusers folder, a .safetensors file, a hub id"
                   f"{' or ' + known if known else ''})")


def family_of_pipeline(pipe) -> str:
    """SD vs SDXL from the components (a second text encoder means SDXL); SSD-1B is the pruned SDXL UNet."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return "sd15"
    layers = pipe.unet.config.get("transformer_layers_per_block")
    last = layers[-1] if isinstance(layers, (list, tuple)) and layers else layers
    last = last[0] if isinstance(last, (list, tuple)) else last  # per-layer lists of an asymmetric UNet
    if last == 4 and pipe.unet.config.block_out_channels[-1] == 1280:
        return "ssd1b"
    return "sdxl"


def resolve_dtype(dtype: str | None, device: str):
    """'auto' -> fp16 on CUDA, fp32 on CPU; 'fp32'|'fp16'|'bf16' as named."""
    import torch

    if dtype in (None, "auto"):
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPE_NAMES:
        raise LcmError(f"unknown dtype {dtype!r} (expected auto, {', '.join(DTYPE_NAMES)})")
    return torch_dtype(dtype)


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LcmError(f"device {device} requested but torch sees no CUDA GPU")
    if device != "cpu" and not device.startswith("cuda"):
        raise LcmError(f"unknown device {device!r} (expected auto, cpu, cuda, cuda:N)")
    return device


def quiet_libraries() -> None:
    """diffusers / transformers: errors only, no progress bars (lcmtool reports progress itself, on stderr)."""
    from transformers.utils import logging as tlogging

    tlogging.set_verbosity_error()
    tlogging.disable_progress_bar()
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()


def pipeline_classes():
    """(StableDiffusionPipeline, StableDiffusionXLPipeline), the libraries quieted; the end of the command's
    heavy imports (their modules pull transformers' CLIP models and peft), so the start-up pause ends here,
    before any weights are read (lcmtool.startup)."""
    quiet_libraries()
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from lcmtool import startup

    startup.settle()
    return StableDiffusionPipeline, StableDiffusionXLPipeline


CLIP_TEXT = ("CLIPTextModel", "CLIPTextModelWithProjection")


def text_encoders(folder: str | Path, dtype=None) -> dict:
    """The CLIP text encoder(s) of a diffusers pipeline folder, built from their config and loaded straight from
    their one `model.safetensors` -> {"text_encoder": model, ...}, for `from_pretrained(..., **those)`.

    Why: transformers' from_pretrained builds its checkpoint-conversion table for every model type it knows (about
    1,100 regex renames) on a process's first model load, 0.5 s of a 4-step demo command on our CPU, and a CLIP
    checkpoint needs none of it. The result equals from_pretrained's (tested: weights, dtype, config, outputs).
    Any other case (sharded or .bin weights, another class, a key that does not match) is left out of the dict,
    and from_pretrained loads that part as before."""
    import json

    import torch
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    folder = Path(folder)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        return {}
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for name in ("text_encoder", "text_encoder_2"):
        lib, cls_name = (index.get(name) or [None, None])[:2]
        sub = folder / name
        if lib != "transformers" or cls_name not in CLIP_TEXT or not (sub / "model.safetensors").is_file():
            continue
        try:
            cls = getattr(transformers, cls_name)
            config = cls.config_class.from_pretrained(sub)
            with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (position_ids) real
                model = cls(config)
            state = load_file(sub / "model.safetensors")
            model.load_state_dict(state, strict=True, assign=True)
        except Exception:  # noqa: BLE001 - anything unusual: from_pretrained loads this part instead
            continue
        model.config._name_or_path = str(sub)  # as from_pretrained records them
        if dtype is not None:
            model.config.dtype = dtype
        out[name] = model.to(dtype if dtype is not None else torch.float32).eval()
    return out


def load_pipeline(spec: str, dtype=None, device: str = "cpu", config_dir: str | Path | None = None,
                  tokenizer: str | Path | None = None):
    """Load `spec` as a diffusers pipeline on `device` in `dtype` -> (pipe, family "sd15"|"sdxl"|"ssd1b").

    Single-file checkpoints load offline: `config_dir` (a diffusers pipeline folder of configs + tokenizers)
    or the shipped architecture presets give the configs, so diffusers never reaches for the hub; the
    checkpoint's own keys and shapes override the architecture numbers (see `single_file_config_dir`).
    `tokenizer`: a tokenizer folder for single files (default: the config folder's, else CLIP's shipped BPE).
    """
    import json

    StableDiffusionPipeline, StableDiffusionXLPipeline = pipeline_classes()
    from lcmtool.models.single_file import load_single_file

    ref = resolve_model(spec)
    kw = dict(dtype=dtype)
    try:
        if ref.kind == "folder":
            index = json.loads((Path(ref.location) / "model_index.json").read_text())
            cls = StableDiffusionXLPipeline if "text_encoder_2" in index else StableDiffusionPipeline
            if cls is StableDiffusionPipeline:
                kw.update(safety_checker=None, requires_safety_checker=False)
            pipe = cls.from_pretrained(ref.location, local_files_only=True, **kw, **text_encoders(ref.location, dtype))
        elif ref.kind == "single-file":
            pipe = load_single_file(Path(ref.location), config_dir, tokenizer, kw)
        else:
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(ref.location, **kw)
            if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
                raise LcmError(f"{spec} is a {type(pipe).__name__}; lcmtool samples SD-1.5 and SDXL pipelines")
    except LcmError:
        raise
    except Exception as e:  # noqa: BLE001 - a model that does not load is the user's input problem
        raise LcmError(f"cannot load model {spec}: {first_line(e)}") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, family_of_pipeline(pipe)


