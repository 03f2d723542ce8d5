"""LoRA key formats <-> canonical module paths.

Canonical: the diffusers module path inside the UNet ('down_blocks.0.attentions.0.proj_in'); text-encoder modules
carry the prefix 'text_encoder.' / 'text_encoder_2.'. Formats read:
  kohya         lora_unet_<path with _>.lora_down.weight / .lora_up.weight / .alpha  (diffusers block names)
  kohya-sgm     the same with SGM block names (input_blocks / middle_block / output_blocks), kohya's SDXL files
Written: `kohya` means kohya's own naming per family (diffusers block names for SD-1.5, SGM names for SDXL and
SSD-1B: what kohya's SDXL tools, A1111 and civitai files use); `kohya-diffusers` forces diffusers block names.
  diffusers     unet.<path>.lora_A.weight / .lora_B.weight (what `save_lora_weights` writes today)
  diffusers-old unet.<path>.lora.down.weight, and attention processors <attn>.processor.to_q_lora.down.weight
  peft          base_model.model.<path>.lora_A.weight (get_peft_model_state_dict of a wrapped UNet)
Every function here is about names; tensors and alphas are io.py's job.
"""
from __future__ import annotations

import re

from lcmtool.errors import LcmError
from lcmtool.models import ldm_names as sgm

# The 14 module kinds the released LCM-LoRAs (SD-1.5, SDXL, SSD-1B) train.
LCM_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
               "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
# The UNet's Linear / Conv2d layers outside those kinds that every loader maps: input and output convs and the
# timestep-embedding MLP (diffusers' kohya loader reads conv_in / input_blocks_0_0, time_embedding_linear_1 /
# time_embed_0, ...). SDXL's added-conditioning MLP is left out: diffusers mangles its diffusers-named kohya key
# (lora_unet_add_embedding_linear_1 -> add.embedding.linear). The demo-sd LCM-LoRA, an SVD extract of full LCD,
# covers these (configs/distill/demo-sd-ceiling.yaml).
EMBED_TARGETS = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")

FORMATS = ("kohya", "kohya-sgm", "diffusers", "diffusers-old", "peft")
WRITE_FORMATS = ("kohya", "kohya-sgm", "kohya-diffusers", "diffusers", "peft")
SGM_FAMILIES = ("sdxl", "ssd1b")

# Multi-word attribute names; kohya flattens '.' to '_' so these must be re-joined when reading.
_VOCAB = {
    "down_blocks", "mid_block", "up_blocks", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in",
    "proj_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
    "linear_1", "linear_2", "add_embedding", "add_k_proj", "add_v_proj", "add_q_proj", "to_add_out",
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers", "skip_connection",
    "time_embed", "label_emb", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
    "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding", "position_embedding", "text_projection",
    "encoder_hid_proj", "class_embedding",
}
_MAX_WORDS = max(len(v.split("_")) for v in _VOCAB)
_REFUSED = {"hada_w1_a": "LoHa", "hada_w2_a": "LoHa", "lokr_w1": "LoKr", "lokr_w2": "LoKr",
            "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "oft_blocks": "OFT", ".diff": "full-diff"}
_KOHYA_TE = {"lora_te_": "text_encoder.", "lora_te1_": "text_encoder.", "lora_te2_": "text_encoder_2."}


def resolve_write_format(fmt: str, family: str | None) -> str:
    """A format name users write -> the key layout written: 'kohya' (diffusers names) or 'kohya-sgm', etc."""
    if fmt not in WRITE_FORMATS:
        raise LcmError(f"cannot write format '{fmt}' (choose one of {', '.join(WRITE_FORMATS)})")
    if fmt == "kohya":
        return "kohya-sgm" if family in SGM_FAMILIES else "kohya"
    return "kohya" if fmt == "kohya-diffusers" else fmt


def te_path(path: str) -> str:
    """Text-encoder paths in one layout: `text_encoder[_2].text_model.<...>` (kohya's, and transformers 4's);
    files written against transformers 5's CLIPTextModel lack the `text_model` level."""
    head, _, rest = path.partition(".")
    if head in ("text_encoder", "text_encoder_2") and rest and not rest.startswith(("text_model.", "text_projection")):
        return f"{head}.text_model.{rest}"
    return path


def kohya_name_to_path(flat: str) -> str:
    """'down_blocks_0_attentions_0_proj_in' -> 'down_blocks.0.attentions.0.proj_in' (greedy over _VOCAB)."""
    words, out, i = flat.split("_"), [], 0
    while i < len(words):
        for n in range(min(_MAX_WORDS, len(words) - i), 1, -1):
            cand = "_".join(words[i:i + n])
            if cand in _VOCAB:
                out.append(cand)
                i += n
                break
        else:
            out.append(words[i])
            i += 1
    return ".".join(out)


def detect(keys) -> str:
    """Format name from the state-dict keys; LcmError for LoRA variants we refuse and for non-LoRA files."""
    keys = list(keys)
    for k in keys:
        for marker, kind in _REFUSED.items():
            if marker in k and (marker != ".diff" or k.endswith(".diff")):
                raise LcmError(f"{kind} weights ('{k}') are not supported: lcmtool merges plain LoRA only")
    if any(k.startswith(("lora_unet_", "lora_te")) and k.endswith("lora_down.weight") for k in keys):
        unet = [k for k in keys if k.startswith("lora_unet_")]
        if any(k.startswith(("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks"))
               for k in unet):
            return "kohya-sgm"
        return "kohya"
    if any(k.endswith(".lora_A.weight") for k in keys):
        return "peft" if any(k.startswith("base_model.model.") for k in keys) else "diffusers"
    if any(k.endswith((".lora.down.weight", "_lora.down.weight", ".lora_linear_layer.down.weight")) for k in keys):
        return "diffusers-old"
    raise LcmError("not a LoRA file: no lora_down / lora_A / lora.down weights found")


def split_keys(keys, fmt: str) -> dict[str, dict[str, str]]:
    """Group raw keys by module: {raw_module_name: {'down': key, 'up': key, 'alpha': key}}.

    The raw module name is still in the file's naming; `to_canonical` turns it into a module path. Keys that
    belong to no LoRA factor raise LcmError (so nothing is silently dropped).
    """
    groups: dict[str, dict[str, str]] = {}
    if fmt in ("kohya", "kohya-sgm"):
        pats = [(".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha")]
    elif fmt in ("diffusers", "peft"):
        pats = [(".lora_A.weight", "down"), (".lora_B.weight", "up"), (".alpha", "alpha")]
    elif fmt == "diffusers-old":
        pats = [(".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
                (".lora.down.weight", "down"), (".lora.up.weight", "up"),
                ("_lora.down.weight", "down"), ("_lora.up.weight", "up"), (".alpha", "alpha")]
    else:
        raise ValueError(f"unknown format {fmt}")
    for k in keys:
        for suffix, role in pats:
            if k.endswith(suffix):
                groups.setdefault(k[: -len(suffix)], {})[role] = k
                break
        else:
            raise LcmError(f"unexpected key '{k}' in a {fmt} LoRA file")
    for name, g in groups.items():
        if "down" not in g or "up" not in g:
            missing = "up" if "down" in g else "down"
            raise LcmError(f"module '{name}' has no {missing} weight (truncated or corrupt LoRA file)")
    return groups


def to_canonical(raw: str, fmt: str, unet_config: dict | None = None) -> str:
    """Raw module name in format `fmt` -> canonical module path."""
    if fmt in ("kohya", "kohya-sgm"):
        if raw.startswith("lora_unet_"):
            path = kohya_name_to_path(raw[len("lora_unet_"):])
            if sgm.is_sgm_name(path) or path.startswith("out."):
                if unet_config is None:
                    raise LcmError(f"SGM-named module '{raw}' needs a UNet family to map its blocks")
                try:
                    return sgm.sgm_to_diffusers(path, unet_config)
                except KeyError:
                    raise LcmError(f"module '{raw}' does not exist in this UNet family's block layout") from None
            return path
        for prefix, te in _KOHYA_TE.items():
            if raw.startswith(prefix):
                return te_path(te + kohya_name_to_path(raw[len(prefix):]))
        raise LcmError(f"unknown kohya module '{raw}' (expected lora_unet_ / lora_te_ / lora_te1_ / lora_te2_)")
    if fmt == "peft":
        return raw.removeprefix("base_model.model.")
    if fmt == "diffusers":
        return te_path(raw.removeprefix("unet."))
    if fmt == "diffusers-old":
        path = raw.removeprefix("unet.")
        # attention processors: '...attn1.processor.to_q' -> '...attn1.to_q', 'to_out' -> 'to_out.0'
        path = re.sub(r"\.processor\.(to_q|to_k|to_v|to_out)$", r".\1", path)
        path = re.sub(r"\.(to_q|to_k|to_v|to_out)$", lambda m: "." + m.group(1) + (".0" if m.group(1) == "to_out"
                                                                                  else ""), path)
        if path.startswith(("text_encoder.", "text_encoder_2.")):  # old te names: to_q -> q_proj
            path = re.sub(r"self_attn\.to_(q|k|v)$", r"self_attn.\1_proj", path)
            path = re.sub(r"self_attn\.to_out\.0$", "self_attn.out_proj", path)
        return te_path(path)
    raise ValueError(f"unknown format {fmt}")


def from_canonical(path: str, fmt: str, family: str | None = None, unet_config: dict | None = None) -> str:
    """Canonical module path -> the key stem in format `fmt` (append the factor suffix yourself)."""
    te = path.startswith(("text_encoder.", "text_encoder_2."))
    if fmt in ("kohya", "kohya-sgm"):
        if te:
            head, rest = path.split(".", 1)
            if head == "text_encoder_2":
                prefix = "lora_te2_"
            else:
                prefix = "lora_te1_" if family in ("sdxl", "ssd1b") else "lora_te_"
            return prefix + rest.replace(".", "_")
        if fmt == "kohya-sgm":
            if unet_config is None:
                raise LcmError("kohya-sgm output needs a UNet family (sdxl / ssd1b)")
            try:
                path = sgm.diffusers_to_sgm(path, unet_config)
            except KeyError:
                raise LcmError(f"module '{path}' has no SGM name in this UNet family") from None
        return "lora_unet_" + path.replace(".", "_")
    if fmt == "diffusers":
        return path if te else "unet." + path
    if fmt == "peft":
        if te:
            raise LcmError("peft format holds the UNet only; this LoRA has text-encoder modules (use kohya)")
        return "base_model.model." + path
    raise LcmError(f"cannot write format '{fmt}' (choose one of {', '.join(WRITE_FORMATS)})")


def suffixes(fmt: str) -> tuple[str, str, str | None]:
    """(down, up, alpha) key suffixes used when writing `fmt`; alpha None = not stored (scale baked into B)."""
    if fmt in ("kohya", "kohya-sgm"):
        return ".lora_down.weight", ".lora_up.weight", ".alpha"
    if fmt in ("diffusers", "peft"):
        return ".lora_A.weight", ".lora_B.weight", None
    raise LcmError(f"cannot write format '{fmt}' (choose one of {', '.join(WRITE_FORMATS)})")
