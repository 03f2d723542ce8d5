"""SGM (Stability's generative-models / LDM) UNet block names <-> diffusers module paths.

kohya-ss trains SDXL on the SGM UNet, so its SDXL LoRAs name modules `input_blocks.4.1.proj_in` where diffusers
says `down_blocks.1.attentions.0.proj_in`. The map is derived from a UNet2DConditionModel config (block types and
layers_per_block), following the layout of ldm/modules/diffusionmodules/openaimodel.py:
input_blocks[0] = conv_in; then per down block `layers_per_block` entries [ResBlock, (SpatialTransformer)] and,
except for the last block, one [Downsample]; middle_block = [ResBlock, SpatialTransformer, ResBlock]; per up block
`layers_per_block + 1` entries [ResBlock, (SpatialTransformer), (Upsample)].
"""
from __future__ import annotations

# Key prefixes of the single-file layout. SD-1.5 keeps CLIP ViT-L in the transformers layout; SDXL keeps CLIP ViT-L
# the same way and OpenCLIP ViT-bigG in OpenCLIP's own layout (fused qkv, resblocks, transposed text_projection).
UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_SD15 = "cond_stage_model.transformer."
CLIP_L_XL = "conditioner.embedders.0.transformer."
CLIP_G_XL = "conditioner.embedders.1.model."

# Inside a ResBlock the SGM layers have other names than diffusers' ResnetBlock2D.
_RESNET_SGM_TO_DIFFUSERS = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
                            "skip_connection": "conv_shortcut", "in_layers.0": "norm1", "out_layers.0": "norm2"}
_RESNET_DIFFUSERS_TO_SGM = {v: k for k, v in _RESNET_SGM_TO_DIFFUSERS.items()}
# Modules outside the three block lists.
_TOP_SGM_TO_DIFFUSERS = {"input_blocks.0.0": "conv_in", "out.2": "conv_out", "out.0": "conv_norm_out",
                         "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
                         "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}
_TOP_DIFFUSERS_TO_SGM = {v: k for k, v in _TOP_SGM_TO_DIFFUSERS.items()}

SGM_PATTERNS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out.")


def block_map(config: dict) -> dict[str, str]:
    """SGM block prefix -> diffusers block prefix, e.g. 'input_blocks.4.1' -> 'down_blocks.1.attentions.0'."""
    lpb = config.get("layers_per_block", 2)
    down, up = config["down_block_types"], config["up_block_types"]
    n = len(down)
    lpb_down = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * n
    lpb_up = list(reversed(lpb_down))
    out: dict[str, str] = {}
    i = 1
    for b, kind in enumerate(down):
        for j in range(lpb_down[b]):
            out[f"input_blocks.{i}.0"] = f"down_blocks.{b}.resnets.{j}"
            if "CrossAttn" in kind:
                out[f"input_blocks.{i}.1"] = f"down_blocks.{b}.attentions.{j}"
            i += 1
        if b < n - 1:
            out[f"input_blocks.{i}.0"] = f"down_blocks.{b}.downsamplers.0"
            i += 1
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid is not None:
        out["middle_block.0"] = "mid_block.resnets.0"
        if "CrossAttn" in mid:
            out["middle_block.1"] = "mid_block.attentions.0"
            out["middle_block.2"] = "mid_block.resnets.1"
        else:
            out["middle_block.1"] = "mid_block.resnets.1"
    i = 0
    for b, kind in enumerate(up):
        for j in range(lpb_up[b] + 1):
            out[f"output_blocks.{i}.0"] = f"up_blocks.{b}.resnets.{j}"
            k = 1
            if "CrossAttn" in kind:
                out[f"output_blocks.{i}.1"] = f"up_blocks.{b}.attentions.{j}"
                k = 2
            if j == lpb_up[b] and b < n - 1:
                out[f"output_blocks.{i}.{k}"] = f"up_blocks.{b}.upsamplers.0"
            i += 1
    return out


def _split_block(name: str, prefixes) -> tuple[str, str] | None:
    """Longest prefix of dotted `name` found in `prefixes` -> (prefix, rest)."""
    parts = name.split(".")
    for n in range(min(len(parts), 5), 0, -1):
        head = ".".join(parts[:n])
        if head in prefixes:
            return head, ".".join(parts[n:])
    return None


_MAPS: dict[str, tuple[dict[str, str], dict[str, str]]] = {}


def _maps(config: dict) -> tuple[dict[str, str], dict[str, str]]:
    """(block_map(config), its inverse), built once per UNet config (callers convert one module at a time)."""
    key = repr(sorted(config.items()))
    if key not in _MAPS:
        bmap = block_map(config)
        _MAPS[key] = (bmap, {v: k for k, v in bmap.items()})
    return _MAPS[key]


def _translate(name: str, top: dict, blocks: dict, resnet: dict, down_conv: tuple[str, str], diffusers_side: int
               ) -> str:
    """Rename `name` through `top` (modules outside the blocks), else its longest block prefix in `blocks` plus the
    layer inside: ResBlock layers through `resnet`, the downsampler's conv as `down_conv` (old -> new). The block
    kind is read from the diffusers-side name (the target when diffusers_side is 1, the source when 0)."""
    if name in top:
        return top[name]
    hit = _split_block(name, blocks)
    if hit is None:
        raise KeyError(name)
    head, rest = hit
    target = blocks[head]
    kind = (head, target)[diffusers_side]
    if ".resnets." in kind:
        hit = _split_block(rest, resnet)
        if hit is not None:
            rest = resnet[hit[0]] + (f".{hit[1]}" if hit[1] else "")
    elif kind.endswith("downsamplers.0"):
        rest = down_conv[1] if rest == down_conv[0] else rest
    return f"{target}.{rest}" if rest else target


def sgm_to_diffusers(name: str, config: dict) -> str:
    """'input_blocks.4.0.in_layers.2' -> 'down_blocks.1.resnets.0.conv1'; raises KeyError if not in this UNet."""
    return _translate(name, _TOP_SGM_TO_DIFFUSERS, _maps(config)[0], _RESNET_SGM_TO_DIFFUSERS, ("op", "conv"), 1)


def diffusers_to_sgm(name: str, config: dict) -> str:
    """Inverse of sgm_to_diffusers."""
    return _translate(name, _TOP_DIFFUSERS_TO_SGM, _maps(config)[1], _RESNET_DIFFUSERS_TO_SGM, ("conv", "op"), 0)


def is_sgm_name(name: str) -> bool:
    return name.startswith(("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb."))
