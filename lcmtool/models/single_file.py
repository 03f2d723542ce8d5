"""Single-file checkpoints (the LDM / SGM layout A1111 and ComfyUI keep): read them safely, tell their family,
and derive the diffusers architecture they imply, offline.

Reading: safetensors, or `.ckpt`/`.pt`/`.bin` through torch's weights_only unpickler only. Architecture: the
shipped presets (lcmtool/presets/<family>/) or a user's config folder supply what weights cannot tell (attention
heads, norm groups, scheduler); the checkpoint's key names and tensor shapes replace every other number.
"""
from __future__ import annotations

import re
from pathlib import Path

from lcmtool.errors import LcmError, first_line
from lcmtool.models.ldm_names import CLIP_G_XL, CLIP_L_XL, CLIP_SD15, UNET, VAE
from lcmtool.presets import PRESETS

# single-file family -> shipped diffusers config folder (lcmtool/presets/<family>/; README.md there says where
# each number comes from). CLIP's BPE merges ship once, gzipped, in clip-tokenizer/.
SINGLE_FILE_PRESETS = {"sd15": "sd15", "sdxl": "sdxl", "ssd1b": "ssd1b"}
CLIP_MERGES = PRESETS / "clip-tokenizer" / "merges.txt.gz"
# ComfyUI's SSD1B detection: transformer blocks per input-block attention, levels 0-2 ([0, 0, 2, 2, 4, 4])
SSD1B_INPUT_DEPTHS = [2, 2, 4, 4]




def load_checkpoint(path: Path) -> dict:
    """A single-file state dict: safetensors, or `.ckpt`/`.pt`/`.bin` through torch's weights_only unpickler only."""
    import pickle

    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types and OSError
            raise LcmError(f"{path} is not a readable safetensors file ({first_line(e)})") from None
    try:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except pickle.UnpicklingError as e:
        raise LcmError(f"refusing to unpickle {path}: it holds more than tensors and lcmtool loads .ckpt files only "
                       f"with torch's weights_only=True ({first_line(e)[:120]}); convert it to .safetensors") from None
    except Exception as e:  # noqa: BLE001 - zip/pickle/EOF errors of a damaged file
        raise LcmError(f"{path} is not a readable checkpoint ({first_line(e)})") from None
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
            raise LcmError(f"{path} is not a readable safetensors file ({first_line(e)})") from None
    return {k: tuple(v.shape) for k, v in load_checkpoint(path).items()}




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

    merges = gzip.decompress(CLIP_MERGES.read_bytes()).decode("utf-8")
    pairs = [line.split() for line in merges.splitlines()[1:] if line]
    symbols = list(bytes_to_unicode().values())
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
        rewrite("unet", lambda c: derive_unet(shapes, c, family))
        rewrite("vae", lambda c: derive_vae(shapes, c))
        if xl:
            rewrite("text_encoder", lambda c: derive_clip(shapes, CLIP_L_XL, c))
            rewrite("text_encoder_2", lambda c: derive_clip(shapes, CLIP_G_XL, c, open_clip=True))
        else:
            rewrite("text_encoder", lambda c: derive_clip(shapes, CLIP_SD15, c))

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


def load_single_file(path: Path, config_dir, tokenizer, kw: dict):
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


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# ---- single file -> architecture ----

def _indices(shapes: dict, pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` (one group) over the key names."""
    rx = re.compile(pattern)
    return sorted({int(m[1]) for k in shapes if (m := rx.match(k))})


def _depth(shapes: dict, stem: str) -> int:
    """Transformer blocks in the attention at `stem` (0: no attention there)."""
    return len(_indices(shapes, re.escape(stem) + r"\.transformer_blocks\.(\d+)\."))


def _heads(base_heads: int, ch: int, base_ch: int, family: str) -> int:
    """Heads for a level of `ch` channels: the base's when the width is the base's; else the original configs' rule
    (SD-1.5 v1-inference.yaml: num_heads 8; SDXL sd_xl_base.yaml: num_head_channels 64)."""
    if ch == base_ch:
        return base_heads
    heads = base_heads if family == "sd15" else ch // 64
    if heads < 1 or ch % heads:
        raise LcmError(f"cannot tell the attention heads of a {ch}-channel UNet level from the weights; "
                       "give a config folder for this checkpoint (--set model_config=DIR)")
    return heads


def derive_unet(shapes: dict, base: dict, family: str) -> dict:
    """UNet2DConditionModel config from `model.diffusion_model.*` names and shapes, on top of `base`."""
    s = {k[len(UNET):]: v for k, v in shapes.items() if k.startswith(UNET)}
    if "input_blocks.0.0.weight" not in s:
        raise LcmError("the checkpoint has no UNet (model.diffusion_model.input_blocks.0.0.weight is missing)")
    n_in = len(_indices(s, r"input_blocks\.(\d+)\."))
    ops = _indices(s, r"input_blocks\.(\d+)\.0\.op\.weight")
    per = ops[0] if ops else n_in  # a down level: L layers + its downsampler (the last level has none)
    L, n = per - 1, n_in // per
    if L < 1 or n_in != n * per or ops != [(i + 1) * per for i in range(n - 1)]:
        raise LcmError(f"unsupported UNet layout: {n_in} input blocks do not form levels of equal depth")
    ch = [s[f"input_blocks.{1 + i * per}.0.out_layers.3.weight"][0] for i in range(n)]
    down = [[_depth(s, f"input_blocks.{1 + i * per + j}.1") for j in range(L)] for i in range(n)]
    up = [[_depth(s, f"output_blocks.{i * per + j}.1") for j in range(L + 1)] for i in range(n)]
    mid = _depth(s, "middle_block.1")
    if any(min(d) == 0 < max(d) for d in down + up) or not mid:
        raise LcmError("unsupported UNet layout: a level mixes layers with and without attention, or the middle "
                       "block has none")
    attn_k = [k for k in s if k.endswith("attn2.to_k.weight")]
    proj_in = [k for k in s if k.endswith(".proj_in.weight")]

    cfg = dict(base)
    cfg.update(
        in_channels=s["input_blocks.0.0.weight"][1], out_channels=s["out.2.weight"][0], layers_per_block=L,
        block_out_channels=ch, cross_attention_dim=s[attn_k[0]][1], use_linear_projection=len(s[proj_in[0]]) == 2,
        down_block_types=["CrossAttnDownBlock2D" if d[0] else "DownBlock2D" for d in down],
        up_block_types=["CrossAttnUpBlock2D" if u[0] else "UpBlock2D" for u in up],
    )
    # transformer blocks per attention: an int per level where the level is uniform, else a list per layer;
    # levels without attention carry 1 (unused). Up levels need their own list when they are not the mirror image.
    tl = [(d[0] or 1) if len(set(d)) == 1 else d for d in down]
    rtl = [(u[0] or 1) if len(set(u)) == 1 else u for u in up]
    if rtl == tl[::-1] and all(isinstance(x, int) for x in tl):
        cfg.update(transformer_layers_per_block=tl, reverse_transformer_layers_per_block=None)
    else:
        cfg.update(transformer_layers_per_block=[x if isinstance(x, list) else [x] * L for x in tl],
                   reverse_transformer_layers_per_block=[x if isinstance(x, list) else [x] * (L + 1) for x in rtl])
    built_mid = tl[-1] if isinstance(tl[-1], int) else tl[-1][0]
    if mid != built_mid:
        raise LcmError(f"unsupported UNet layout: the middle block has {mid} transformer blocks, diffusers builds "
                       f"{built_mid} (the last down level's)")
    # heads are not in the weights: diffusers' `attention_head_dim` holds head counts in SD configs
    key = "num_attention_heads" if base.get("num_attention_heads") else "attention_head_dim"
    heads = base.get(key, 8)
    heads = heads if isinstance(heads, list) and len(heads) == n else [heads if isinstance(heads, int) else 8] * n
    base_ch = base.get("block_out_channels")
    base_ch = base_ch if base_ch and len(base_ch) == n else [None] * n
    attn = [bool(down[i][0] or up[n - 1 - i][0]) for i in range(n)]  # heads of levels without attention are unused
    cfg[key] = [_heads(h, c, b, family) if a else (h if c == b or family == "sd15" else max(1, c // 64))
                for a, h, c, b in zip(attn, heads, ch, base_ch, strict=True)]
    if family == "sd15" and len(set(cfg[key])) == 1:
        cfg[key] = cfg[key][0]
    groups = cfg.get("norm_num_groups", 32)
    if any(c % groups for c in ch):
        raise LcmError(f"UNet widths {ch} are not divisible by {groups} norm groups; give a config folder for this "
                       "checkpoint (--set model_config=DIR)")
    if "label_emb.0.0.weight" in s:  # SDXL: text_time added conditioning (pooled text + 6 size/crop embeddings)
        cfg["projection_class_embeddings_input_dim"] = s["label_emb.0.0.weight"][1]
        pooled = shapes.get(CLIP_G_XL + "text_projection")
        if pooled is not None:
            cfg["addition_time_embed_dim"] = (s["label_emb.0.0.weight"][1] - pooled[1]) // 6
    return cfg


def derive_vae(shapes: dict, base: dict) -> dict:
    """AutoencoderKL config from `first_stage_model.*` names and shapes, on top of `base`."""
    s = {k[len(VAE):]: v for k, v in shapes.items() if k.startswith(VAE)}
    if "encoder.conv_in.weight" not in s:
        raise LcmError("the checkpoint has no VAE (first_stage_model.* weights are missing)")
    levels = _indices(s, r"encoder\.down\.(\d+)\.")
    ch = [s[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in levels]
    cfg = dict(base)
    cfg.update(in_channels=s["encoder.conv_in.weight"][1], out_channels=s["decoder.conv_out.weight"][0],
               latent_channels=s["post_quant_conv.weight"][0] if "post_quant_conv.weight" in s
               else s["decoder.conv_in.weight"][1],
               block_out_channels=ch, layers_per_block=len(_indices(s, r"encoder\.down\.0\.block\.(\d+)\.")),
               down_block_types=["DownEncoderBlock2D"] * len(ch), up_block_types=["UpDecoderBlock2D"] * len(ch),
               use_quant_conv="quant_conv.weight" in s, use_post_quant_conv="post_quant_conv.weight" in s)
    groups = cfg.get("norm_num_groups", 32)
    if any(c % groups for c in ch):
        raise LcmError(f"VAE widths {ch} are not divisible by {groups} norm groups; give a config folder for this "
                       "checkpoint (--set model_config=DIR)")
    return cfg


def derive_clip(shapes: dict, prefix: str, base: dict, open_clip: bool = False) -> dict:
    """CLIPTextConfig fields from a text encoder's names and shapes (transformers or OpenCLIP layout)."""
    s = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    if open_clip:
        tok, pos = s.get("token_embedding.weight"), s.get("positional_embedding")
        layers = _indices(s, r"transformer\.resblocks\.(\d+)\.")
        fc1 = s.get("transformer.resblocks.0.mlp.c_fc.weight")
    else:
        s = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in s.items()}
        tok, pos = s.get("embeddings.token_embedding.weight"), s.get("embeddings.position_embedding.weight")
        layers = _indices(s, r"encoder\.layers\.(\d+)\.")
        fc1 = s.get("encoder.layers.0.mlp.fc1.weight")
    if tok is None or pos is None or fc1 is None:
        raise LcmError(f"the checkpoint's text encoder under {prefix} is incomplete")
    hidden = tok[1]
    cfg = dict(base)
    heads = base.get("num_attention_heads", 12) if hidden == base.get("hidden_size") else hidden // 64
    if heads < 1 or hidden % heads:
        raise LcmError(f"cannot tell the attention heads of a {hidden}-wide text encoder from the weights; give a "
                       "config folder for this checkpoint (--set model_config=DIR)")
    cfg.update(vocab_size=tok[0], hidden_size=hidden, max_position_embeddings=pos[0], num_hidden_layers=len(layers),
               intermediate_size=fc1[0], num_attention_heads=heads)
    if open_clip and "text_projection" in s:
        cfg["projection_dim"] = s["text_projection"][1]
    return cfg
