"""Tiny SD-1.5-family and SDXL-family architectures for the demo world, and their tokenizer.

Everything here builds standard diffusers / transformers objects, so the saved folders load with plain
`StableDiffusionPipeline.from_pretrained` / `StableDiffusionXLPipeline.from_pretrained`.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from lcmtool.demo.world import VOCAB_WORDS
from lcmtool.models.single_file import bytes_to_unicode

MAX_TOKENS = 24  # longest demo caption is 22 tokens with BOS/EOS
# SD-1.5's scheduler_config.json (PNDMScheduler; scaled_linear, 0.00085 -> 0.012, 1000 steps)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", set_alpha_to_one=False, steps_offset=1, clip_sample=False,
                      skip_prk_steps=True, timestep_spacing="leading")
# SDXL base 1.0's scheduler_config.json (EulerDiscreteScheduler)
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
                      interpolation_type="linear", use_karras_sigmas=False, sample_max_value=1.0)

VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
                  block_out_channels=[32, 64, 64, 64], norm_num_groups=16,
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)

SD_UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=[64, 96, 128], norm_num_groups=16, cross_attention_dim=64, attention_head_dim=8,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
# SDXL family: first level without attention, text_time added conditioning (pooled text + 6 time ids)
XL_TE1_DIM, XL_TE2_DIM, XL_POOLED_DIM, XL_TIME_DIM = 32, 64, 32, 16
XL_UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=[64, 96, 128], norm_num_groups=16, cross_attention_dim=XL_TE1_DIM + XL_TE2_DIM,
    attention_head_dim=[4, 8, 8], transformer_layers_per_block=[1, 1, 1], use_linear_projection=True,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    addition_embed_type="text_time", addition_time_embed_dim=XL_TIME_DIM,
    projection_class_embeddings_input_dim=XL_POOLED_DIM + 6 * XL_TIME_DIM,
)


def text_config(hidden: int, layers: int, vocab: int, projection_dim: int | None = None) -> dict:
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=projection_dim or hidden,
                hidden_act="quick_gelu", bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)


def build_tokenizer(folder: str | Path | None = None):
    """A CLIPTokenizer whose BPE vocabulary covers the demo language (every demo word is one token).

    Layout as CLIP's: 256 byte symbols, the same with '</w>', merged tokens, then <|startoftext|> and
    <|endoftext|> last (ids vocab-2 and vocab-1). Words outside the demo language still tokenize (as bytes).
    """
    from transformers import CLIPTokenizer

    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    # BPE training on the demo words: merge the most frequent pair until every word is one token; applying
    # the merges in rank order (what CLIPTokenizer does) then reproduces exactly these segmentations.
    words = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in VOCAB_WORDS]
    merges: list[tuple[str, str]] = []
    while any(len(w) > 1 for w in words):
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = max(counts, key=lambda p: (counts[p], p))
        merges.append(best)
        vocab.append(best[0] + best[1])
        new_words = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i < len(w) - 1 and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words.append(tuple(out))
        words = new_words
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory(prefix="lcmtool-tok-") as tmp:  # CLIPTokenizer reads its files at init
        folder = Path(folder or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
        return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS,
                             pad_token="<|endoftext|>")


def build_pipeline(family: str, seed: int = 0):
    """A randomly initialised demo pipeline ('sd' or 'xl'): the starting point of training, and a test fixture."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = build_tokenizer()
    v = len(tok)
    vae = AutoencoderKL(**VAE_CONFIG)
    if family == "sd":
        te = CLIPTextModel(CLIPTextConfig(**text_config(64, 2, v)))
        unet = UNet2DConditionModel(**SD_UNET_CONFIG)
        return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                       scheduler=PNDMScheduler.from_config(SD15_SCHEDULER), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    if family == "xl":
        te1 = CLIPTextModel(CLIPTextConfig(**text_config(XL_TE1_DIM, 2, v)))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config(XL_TE2_DIM, 2, v, XL_POOLED_DIM)))
        unet = UNet2DConditionModel(**XL_UNET_CONFIG)
        return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                         tokenizer_2=tok, unet=unet,
                                         scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
                                         force_zeros_for_empty_prompt=True, add_watermarker=False)
    raise ValueError(f"unknown demo family {family!r} (expected 'sd' or 'xl')")
