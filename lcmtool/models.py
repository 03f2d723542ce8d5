"""Where a model comes from: the embedded demo, a diffusers folder, a single-file checkpoint, a hub id.

`resolve_model(spec)` -> ModelRef (what and where, no weights loaded); `load_pipeline(spec, ...)` loads a
diffusers pipeline and tells its family ("sd15" | "sdxl" | "ssd1b").
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lcmtool.errors import LcmError

ASSETS = Path(__file__).parent / "demo" / "assets"
DEMO_MODELS = {"sd": "demo-sd", "xl": "demo-xl"}
# The shipped demo LCM-LoRAs (applied by default with the lcm/tcd schedulers on demo models)
DEMO_LCM_LORAS = {"sd": "lcm-lora-demo-sd.safetensors", "xl": "lcm-lora-demo-xl.safetensors"}


@dataclass(frozen=True)
class ModelRef:
    spec: str          # what the user typed
    kind: str          # "demo" | "folder" | "single-file" | "hub"
    location: str      # a path or a hub id
    demo: str | None = None  # "sd" | "xl" for the shipped demo models


def resolve_model(spec: str) -> ModelRef:
    if spec.startswith("demo:"):
        name = spec.split(":", 1)[1]
        if name not in DEMO_MODELS:
            raise LcmError(f"unknown demo model {spec!r} (known: demo:sd, demo:xl)")
        path = ASSETS / DEMO_MODELS[name]
        if not (path / "model_index.json").is_file():
            raise LcmError(f"demo model {spec} is not built at {path} (run `make demo-models`)")
        return ModelRef(spec, "demo", str(path), name)
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
    raise LcmError(f"model not found: {spec} (expected demo:sd, demo:xl, a diffusers folder, a .safetensors file "
                   "or a hub id)")


def family_of_pipeline(pipe) -> str:
    """SD vs SDXL from the components (a second text encoder means SDXL); SSD-1B is the pruned SDXL UNet."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return "sd15"
    layers = pipe.unet.config.get("transformer_layers_per_block")
    if (isinstance(layers, (list, tuple)) and list(layers)[-1:] == [4]
            and pipe.unet.config.block_out_channels[-1] == 1280):
        return "ssd1b"
    return "sdxl"


PRESETS = Path(__file__).resolve().parent.parent / "configs" / "presets"
# single-file family -> (pipeline preset folder, UNet config written by the presets owner)
SINGLE_FILE_PRESETS = {"sd15": ("sd15", "sd15_unet.json"), "sdxl": ("sdxl", "sdxl_unet.json"),
                       "ssd1b": ("sdxl", "ssd1b_unet.json")}


def resolve_dtype(dtype: str | None, device: str):
    """'auto' -> fp16 on CUDA, fp32 on CPU; 'fp32'|'fp16'|'bf16' as named."""
    import torch

    if dtype in (None, "auto"):
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise LcmError(f"unknown dtype {dtype!r} (expected auto, fp32, fp16, bf16)")
    return table[dtype]


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LcmError(f"device {device} requested but torch sees no CUDA GPU")
    if device != "cpu" and not device.startswith("cuda"):
        raise LcmError(f"unknown device {device!r} (expected auto, cpu, cuda, cuda:N)")
    return device


def _checkpoint_keys(path: Path) -> list[str]:
    """Tensor names of a single-file checkpoint without loading it (.ckpt through torch weights_only)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    import torch

    sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    return list(sd.get("state_dict", sd).keys())


def single_file_family(keys: list[str]) -> str:
    """SD-1.5 vs SDXL vs SSD-1B from the original (LDM/SGM) key names."""
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        # SDXL's input_blocks.7.1 holds 10 transformer blocks; SSD-1B prunes it to 4
        stem = "model.diffusion_model.input_blocks.7.1.transformer_blocks."
        depth = {k.split(".")[6] for k in keys if k.startswith(stem)}
        return "sdxl" if len(depth) >= 10 else "ssd1b"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd15"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise LcmError("this checkpoint is SD-2.x (OpenCLIP text encoder); lcmtool supports SD-1.5, SDXL and SSD-1B")
    raise LcmError("not a Stable Diffusion single-file checkpoint (no cond_stage_model / conditioner keys)")


def single_file_config_dir(family: str, tokenizer: str | None = None) -> Path:
    """A diffusers config folder for `from_single_file(config=...)` assembled from the shipped presets."""
    import shutil
    import tempfile

    folder, unet_json = SINGLE_FILE_PRESETS[family]
    src = PRESETS / folder
    unet_cfg = PRESETS / unet_json
    if not (src / "model_index.json").is_file() or not unet_cfg.is_file():
        raise LcmError(f"architecture preset for {family} missing under {PRESETS} (need {folder}/ and {unet_json})")
    dst = Path(tempfile.mkdtemp(prefix=f"lcmtool-{family}-"))
    shutil.copytree(src, dst, dirs_exist_ok=True)
    (dst / "unet").mkdir(exist_ok=True)
    shutil.copy(unet_cfg, dst / "unet" / "config.json")
    return dst


def quiet_libraries() -> None:
    """diffusers / transformers: errors only, no progress bars (lcmtool reports progress itself, on stderr)."""
    from transformers.utils import logging as tlogging

    tlogging.set_verbosity_error()
    tlogging.disable_progress_bar()
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()


def load_pipeline(spec: str, dtype=None, device: str = "cpu", config_dir: str | Path | None = None):
    """Load `spec` as a diffusers pipeline on `device` in `dtype` -> (pipe, family "sd15"|"sdxl"|"ssd1b").

    Single-file checkpoints load offline: `config_dir` (a diffusers pipeline folder of configs + tokenizers)
    or the shipped architecture presets give the configs, so diffusers never reaches for the hub.
    """
    import json

    quiet_libraries()
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    ref = resolve_model(spec)
    kw = dict(dtype=dtype)
    try:
        if ref.kind in ("demo", "folder"):
            index = json.loads((Path(ref.location) / "model_index.json").read_text())
            cls = StableDiffusionXLPipeline if "text_encoder_2" in index else StableDiffusionPipeline
            if cls is StableDiffusionPipeline:
                kw.update(safety_checker=None, requires_safety_checker=False)
            pipe = cls.from_pretrained(ref.location, local_files_only=True, **kw)
        elif ref.kind == "single-file":
            family = single_file_family(_checkpoint_keys(Path(ref.location)))
            cfg = Path(config_dir) if config_dir else single_file_config_dir(family)
            cls = StableDiffusionPipeline if family == "sd15" else StableDiffusionXLPipeline
            if cls is StableDiffusionPipeline:
                kw.update(safety_checker=None, requires_safety_checker=False)
            pipe = cls.from_single_file(ref.location, config=str(cfg), local_files_only=True, **kw)
        else:
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(ref.location, **kw)
            if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
                raise LcmError(f"{spec} is a {type(pipe).__name__}; lcmtool samples SD-1.5 and SDXL pipelines")
    except LcmError:
        raise
    except Exception as e:  # noqa: BLE001 - a model that does not load is the user's input problem
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LcmError(f"cannot load model {spec}: {first}") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, family_of_pipeline(pipe)
