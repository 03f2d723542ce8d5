"""The original single-file layout (LDM / SGM, as A1111 and ComfyUI keep SD checkpoints) and diffusers.

Pure functions over `dict[str, Tensor]` (meta tensors work: only names and shapes are read):

- `to_single_file(...)`: diffusers UNet / VAE / CLIP state dicts -> one LDM/SGM-named state dict. The inverse of
  diffusers' `loaders/single_file_utils.py` conversion (tests build single-file fixtures with it; it is also an
  export path).
The other direction (a single file's keys and shapes -> the diffusers architecture) is `single_file.derive_*`.
"""
from __future__ import annotations

import re

from lcmtool.models import ldm_names
from lcmtool.models.ldm_names import CLIP_G_XL, CLIP_L_XL, CLIP_SD15, UNET, VAE

# ---- diffusers -> single file ----

def _resnet(rest: str, table) -> str:
    head, _, tail = rest.partition(".")
    return dict(table).get(head, head) + "." + tail


def unet_to_ldm(sd: dict, config: dict) -> dict:
    """diffusers UNet2DConditionModel keys -> `model.diffusion_model.*` (input/middle/output_blocks), through the
    one block map of `ldm_names` (built from the UNet's `config`)."""
    out, config = {}, dict(config)
    for k, v in sd.items():
        stem, _, param = k.rpartition(".")
        try:
            new = ldm_names.diffusers_to_sgm(stem, config)
        except KeyError:
            raise ValueError(f"no single-file name for UNet key {k!r}") from None
        out[f"{UNET}{new}.{param}"] = v
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
    sd = unet_to_ldm(unet.state_dict(), unet.config)
    sd.update(vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)))
    if text_encoder_2 is None:
        sd.update(clip_to_ldm(text_encoder.state_dict(), CLIP_SD15))
    else:
        sd.update(clip_to_ldm(text_encoder.state_dict(), CLIP_L_XL))
        sd.update(open_clip_to_ldm(text_encoder_2.state_dict()))
    return sd
