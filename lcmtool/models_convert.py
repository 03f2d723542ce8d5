"""The original single-file layout (LDM / SGM, as A1111 and ComfyUI keep SD checkpoints) and diffusers.

Two directions, both pure functions over `dict[str, Tensor]` (meta tensors work: only names and shapes are read):

- `to_single_file(...)`: diffusers UNet / VAE / CLIP state dicts -> one LDM/SGM-named state dict. The inverse of
  diffusers' `loaders/single_file_utils.py` conversion (tests build single-file fixtures with it; it is also an
  export path).
- `derive_configs(shapes, family, base)`: the architecture a single file implies, read from its key names and
  tensor shapes, on top of a base config folder (the shipped presets or the user's) that supplies what weights
  cannot tell: attention heads, norm groups, activations, VAE scaling factor, scheduler.
"""
from __future__ import annotations

import re

from lcmtool.errors import LcmError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
# text encoders per family: SD-1.5 keeps CLIP ViT-L in the transformers layout; SDXL keeps CLIP ViT-L the same
# way and OpenCLIP ViT-bigG in OpenCLIP's own layout (fused qkv, resblocks, transposed text_projection)
CLIP_SD15 = "cond_stage_model.transformer."
CLIP_L_XL = "conditioner.embedders.0.transformer."
CLIP_G_XL = "conditioner.embedders.1.model."

_RESNET_TO_LDM = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                  ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
_UNET_FLAT = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


# ---- diffusers -> single file ----

def _resnet(rest: str, table=_RESNET_TO_LDM) -> str:
    head, _, tail = rest.partition(".")
    return dict(table).get(head, head) + "." + tail


def unet_to_ldm(sd: dict, layers_per_block: int) -> dict:
    """diffusers UNet2DConditionModel keys -> `model.diffusion_model.*` (input/middle/output_blocks)."""
    per = layers_per_block + 1  # LDM: a down level is L (resnet[, attention]) blocks + 1 downsampler; an up level L+1
    out = {}
    for k, v in sd.items():
        stem, _, param = k.rpartition(".")
        if stem in _UNET_FLAT:
            new = f"{_UNET_FLAT[stem]}.{param}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = 1 + i * per + j
            new = f"input_blocks.{idx}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
            new = f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", k):
            new = (f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}" if m[1] == "resnets"
                   else f"middle_block.{1 + 2 * int(m[2])}.{m[3]}")
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = i * per + j
            new = f"output_blocks.{idx}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k):
            i = int(m[1])
            last = i * per + layers_per_block
            has_attn = any(x.startswith(f"up_blocks.{i}.attentions.") for x in sd)
            new = f"output_blocks.{last}.{2 if has_attn else 1}.conv.{m[2]}"
        else:
            raise ValueError(f"no single-file name for UNet key {k!r}")
        out[UNET + new] = v
    return out


_VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]
_VAE_RESNET = [("conv_shortcut", "nin_shortcut")]


def vae_to_ldm(sd: dict, n_levels: int) -> dict:
    """diffusers AutoencoderKL keys -> `first_stage_model.*` (encoder.down.i.block.j, decoder.up reversed)."""
    out = {}
    for k, v in sd.items():
        k2 = k
        if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", k):
            k2 = f"{m[1]}.norm_out.{m[2]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            k2 = f"encoder.down.{m[1]}.block.{m[2]}.{_resnet(m[3], _VAE_RESNET)}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
            k2 = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            k2 = f"decoder.up.{n_levels - 1 - int(m[1])}.block.{m[2]}.{_resnet(m[3], _VAE_RESNET)}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k):
            k2 = f"decoder.up.{n_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", k):
            k2 = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet(m[3], _VAE_RESNET)}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", k):
            name = dict(_VAE_ATTN).get(m[2])
            if name is None:
                raise ValueError(f"no single-file name for VAE key {k!r}")
            k2 = f"{m[1]}.mid.attn_1.{name}.{m[3]}"
            if m[3] == "weight" and name != "norm" and v.dim() == 2:
                v = v.reshape(*v.shape, 1, 1)  # LDM's AttnBlock uses 1x1 convolutions
        out[VAE + k2] = v
    return out


def clip_to_ldm(sd: dict, prefix: str) -> dict:
    """transformers CLIPTextModel keys -> `prefix + text_model.*` (transformers' layout, as SD-1.5 files keep it)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("position_ids") or k.startswith("text_projection"):
            continue
        out[prefix + (k if k.startswith("text_model.") else "text_model." + k)] = v
    return out


def open_clip_to_ldm(sd: dict, prefix: str = CLIP_G_XL) -> dict:
    """transformers CLIPTextModelWithProjection keys -> OpenCLIP's layout (SDXL's second text encoder)."""
    import torch

    sd = {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in sd.items()}
    flat = {"embeddings.token_embedding.weight": "token_embedding.weight",
            "embeddings.position_embedding.weight": "positional_embedding",
            "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    inner = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
             ("self_attn.out_proj", "attn.out_proj")]
    out = {}
    for k, v in sd.items():
        if k in flat:
            out[prefix + flat[k]] = v
        elif k == "text_projection.weight":
            out[prefix + "text_projection"] = v.T  # OpenCLIP: x @ text_projection, [hidden, projection]
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", k):
            i, p = m[1], m[2]
            qkv = [sd[f"encoder.layers.{i}.self_attn.{x}_proj.{p}"] for x in "qkv"]
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{p}"] = torch.cat(qkv, 0)
        elif re.fullmatch(r"encoder\.layers\.\d+\.self_attn\.[kv]_proj\.\w+", k) or k.endswith("position_ids"):
            continue
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", k):
            rest = m[2]
            for a, b in inner:
                rest = rest.replace(a, b)
            out[f"{prefix}transformer.resblocks.{m[1]}.{rest}"] = v
        else:
            raise ValueError(f"no single-file name for OpenCLIP key {k!r}")
    return out


def to_single_file(unet, vae, text_encoder, text_encoder_2=None) -> dict:
    """Pipeline components (modules, possibly on the meta device) -> one single-file state dict (SD-1.5 or SDXL)."""
    sd = unet_to_ldm(unet.state_dict(), unet.config.layers_per_block)
    sd.update(vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)))
    if text_encoder_2 is None:
        sd.update(clip_to_ldm(text_encoder.state_dict(), CLIP_SD15))
    else:
        sd.update(clip_to_ldm(text_encoder.state_dict(), CLIP_L_XL))
        sd.update(open_clip_to_ldm(text_encoder_2.state_dict()))
    return sd


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
