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
    last = layers[-1] if isinstance(layers, (list, tuple)) and layers else layers
    last = last[0] if isinstance(last, (list, tuple)) else last  # per-layer lists of an asymmetric UNet
    if last == 4 and pipe.unet.config.block_out_channels[-1] == 1280:
        return "ssd1b"
    return "sdxl"


PRESETS = Path(__file__).resolve().parent / "presets"  # package data: installed and editable copies alike
# single-file family -> shipped diffusers config folder (lcmtool/presets/<family>/; README.md there says where
# each number comes from). CLIP's BPE merges ship once, gzipped, in clip-tokenizer/.
SINGLE_FILE_PRESETS = {"sd15": "sd15", "sdxl": "sdxl", "ssd1b": "ssd1b"}
CLIP_MERGES = PRESETS / "clip-tokenizer" / "merges.txt.gz"
# ComfyUI's SSD1B detection: transformer blocks per input-block attention, levels 0-2 ([0, 0, 2, 2, 4, 4])
SSD1B_INPUT_DEPTHS = [2, 2, 4, 4]


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


def load_checkpoint(path: Path) -> dict:
    """A single-file state dict: safetensors, or `.ckpt`/`.pt`/`.bin` through torch's weights_only unpickler only."""
    import pickle

    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types and OSError
            raise LcmError(f"{path} is not a readable safetensors file ({_first_line(e)})") from None
    try:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except pickle.UnpicklingError as e:
        raise LcmError(f"refusing to unpickle {path}: it holds more than tensors and lcmtool loads .ckpt files only "
                       f"with torch's weights_only=True ({_first_line(e)[:120]}); convert it to .safetensors") from None
    except Exception as e:  # noqa: BLE001 - zip/pickle/EOF errors of a damaged file
        raise LcmError(f"{path} is not a readable checkpoint ({_first_line(e)})") from None
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise LcmError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a single-file checkpoint; safetensors from the header alone."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # noqa: BLE001
            raise LcmError(f"{path} is not a readable safetensors file ({_first_line(e)})") from None
    return {k: tuple(v.shape) for k, v in load_checkpoint(path).items()}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def single_file_family(keys) -> str:
    """SD-1.5 vs SDXL vs SSD-1B from the original (LDM/SGM) key names."""
    import re

    keys = list(keys)
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        # SSD-1B is SDXL with the input-block attentions cut to [2, 2, 4, 4] transformer blocks (SDXL: [2, 2, 10, 10])
        rx = re.compile(r"model\.diffusion_model\.input_blocks\.(\d+)\.1\.transformer_blocks\.(\d+)\.")
        depth: dict[int, int] = {}
        for k in keys:
            if m := rx.match(k):
                depth[int(m[1])] = max(depth.get(int(m[1]), 0), int(m[2]) + 1)
        return "ssd1b" if [depth[i] for i in sorted(depth)] == SSD1B_INPUT_DEPTHS else "sdxl"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd15"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise LcmError("this checkpoint is SD-2.x (OpenCLIP text encoder); lcmtool supports SD-1.5, SDXL and SSD-1B")
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise LcmError("this checkpoint is the SDXL refiner; lcmtool supports SD-1.5, SDXL and SSD-1B base models")
    raise LcmError("not a Stable Diffusion single-file checkpoint (no cond_stage_model / conditioner keys)")


def write_clip_tokenizer(folder: Path) -> None:
    """CLIP's BPE tokenizer files (vocab.json, merges.txt: 49408 tokens) from the shipped merges.

    The vocabulary is CLIP's construction (openai/CLIP simple_tokenizer.py): 256 byte symbols, the same with
    '</w>', one token per merge in rank order, then <|startoftext|> and <|endoftext|>.
    """
    import gzip
    import json

    from lcmtool.demo.arch import _bytes_to_unicode

    merges = gzip.decompress(CLIP_MERGES.read_bytes()).decode("utf-8")
    pairs = [line.split() for line in merges.splitlines()[1:] if line]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text(merges)


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()


def single_file_config_dir(family: str, tokenizer: str | Path | None = None, shapes: dict | None = None,
                           config_dir: str | Path | None = None, dst: Path | None = None) -> Path:
    """A complete diffusers config folder for `from_single_file(config=...)`, written to `dst` (a temp dir).

    Base: `config_dir` (a diffusers pipeline folder; weights not needed) or the shipped preset of `family`.
    On top, whatever the checkpoint's keys and shapes tell (`shapes`) replaces the base's numbers, so the
    architecture always fits the weights. Tokenizers: `tokenizer` (a folder; one with tokenizer/ and tokenizer_2/
    subfolders for SDXL) > the base folder's > CLIP's BPE shipped in lcmtool/presets/clip-tokenizer/.
    """
    import json
    import shutil
    import tempfile

    from lcmtool import models_convert as mc

    src = Path(config_dir).expanduser() if config_dir else PRESETS / SINGLE_FILE_PRESETS[family]
    if not (src / "model_index.json").is_file():
        what = f"config folder {config_dir}" if config_dir else f"architecture preset for {family} under {PRESETS}"
        raise LcmError(f"{what} is missing or has no model_index.json")
    dst = Path(dst or tempfile.mkdtemp(prefix=f"lcmtool-{family}-"))
    names = ["model_index.json", "scheduler", "unet", "vae", "text_encoder", "tokenizer", "text_encoder_2",
             "tokenizer_2"]
    for name in names:  # configs only: weights in a user's folder are not copied
        p = src / name
        if p.is_file():
            shutil.copy(p, dst / name)
        elif p.is_dir():
            shutil.copytree(p, dst / name, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.ckpt"),
                            dirs_exist_ok=True)
    index = json.loads((dst / "model_index.json").read_text())
    xl = family != "sd15"
    if xl != ("text_encoder_2" in index):
        raise LcmError(f"config folder {src} is for the other family than this {family} checkpoint")

    def rewrite(name: str, derive) -> None:
        path = dst / name / "config.json"
        if not path.is_file():
            raise LcmError(f"config folder {src} has no {name}/config.json")
        path.write_text(json.dumps(derive(json.loads(path.read_text())), indent=2))

    if shapes is not None:
        rewrite("unet", lambda c: mc.derive_unet(shapes, c, family))
        rewrite("vae", lambda c: mc.derive_vae(shapes, c))
        if xl:
            rewrite("text_encoder", lambda c: mc.derive_clip(shapes, mc.CLIP_L_XL, c))
            rewrite("text_encoder_2", lambda c: mc.derive_clip(shapes, mc.CLIP_G_XL, c, open_clip=True))
        else:
            rewrite("text_encoder", lambda c: mc.derive_clip(shapes, mc.CLIP_SD15, c))

    for name in ["tokenizer", "tokenizer_2"] if xl else ["tokenizer"]:
        out = dst / name
        if tokenizer:
            given = Path(tokenizer).expanduser()
            given = given / name if (given / name).is_dir() else given
            if not _has_tokenizer(given):
                raise LcmError(f"no tokenizer in {given} (expected vocab.json + merges.txt or tokenizer.json)")
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(given, out)
        elif not _has_tokenizer(out):
            if not CLIP_MERGES.is_file():
                raise LcmError(f"no CLIP tokenizer: {CLIP_MERGES} is missing and no --tokenizer / config folder "
                               "with tokenizer files was given")
            write_clip_tokenizer(out)
    return dst


def quiet_libraries() -> None:
    """diffusers / transformers: errors only, no progress bars (lcmtool reports progress itself, on stderr)."""
    from transformers.utils import logging as tlogging

    tlogging.set_verbosity_error()
    tlogging.disable_progress_bar()
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()


def load_pipeline(spec: str, dtype=None, device: str = "cpu", config_dir: str | Path | None = None,
                  tokenizer: str | Path | None = None):
    """Load `spec` as a diffusers pipeline on `device` in `dtype` -> (pipe, family "sd15"|"sdxl"|"ssd1b").

    Single-file checkpoints load offline: `config_dir` (a diffusers pipeline folder of configs + tokenizers)
    or the shipped architecture presets give the configs, so diffusers never reaches for the hub; the
    checkpoint's own keys and shapes override the architecture numbers (see `single_file_config_dir`).
    `tokenizer`: a tokenizer folder for single files (default: the config folder's, else CLIP's shipped BPE).
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
            pipe = _load_single_file(Path(ref.location), config_dir, tokenizer, kw)
        else:
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(ref.location, **kw)
            if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
                raise LcmError(f"{spec} is a {type(pipe).__name__}; lcmtool samples SD-1.5 and SDXL pipelines")
    except LcmError:
        raise
    except Exception as e:  # noqa: BLE001 - a model that does not load is the user's input problem
        raise LcmError(f"cannot load model {spec}: {_first_line(e)}") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, family_of_pipeline(pipe)


def _load_single_file(path: Path, config_dir, tokenizer, kw: dict):
    """A single-file checkpoint -> pipeline, offline: family from the keys, configs from presets + keys."""
    import tempfile

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    shapes = checkpoint_shapes(path)
    family = single_file_family(shapes)
    cls = StableDiffusionPipeline if family == "sd15" else StableDiffusionXLPipeline
    if cls is StableDiffusionPipeline:
        kw = dict(kw, safety_checker=None, requires_safety_checker=False)
    with tempfile.TemporaryDirectory(prefix=f"lcmtool-{family}-") as tmp:
        cfg = single_file_config_dir(family, tokenizer, shapes, config_dir, Path(tmp))
        pipe = cls.from_single_file(str(path), config=str(cfg), local_files_only=True, **kw)
    for tok, te in ((pipe.tokenizer, pipe.text_encoder), (getattr(pipe, "tokenizer_2", None),
                                                          getattr(pipe, "text_encoder_2", None))):
        if tok is not None and len(tok) > te.config.vocab_size:
            raise LcmError(f"the tokenizer has {len(tok)} tokens but {path.name}'s text encoder only "
                           f"{te.config.vocab_size}: give its tokenizer (--set tokenizer=DIR) or a config folder "
                           "(--set model_config=DIR)")
    return pipe
