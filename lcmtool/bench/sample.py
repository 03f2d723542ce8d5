"""`bench_sample()`: plain diffusers (as its docs show) vs lcmtool's sample path, same run, same device.

Plain diffusers: LCMScheduler.from_config, the LoRA as a peft adapter via `load_lora_weights` (unfused),
then `fuse_lora()`; DPM-Solver++ 25 steps CFG 7.5 on the teacher. lcmtool: pinned no-sync schedulers,
LoRA fused on load, per-image device generators. Model specs: anything `load_pipeline` takes, plus
`random:sd15` / `random:sdxl` (the real architectures with random weights, as in ANCHORS.md; compute does
not depend on the values).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

PROMPT = "a large red circle on the left"
# SD's VAE (4 levels, 2 resnets each) and CLIP ViT-L/14's text tower, as in SD-1.5's shipped configs
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, max_position_embeddings=77)


def random_pipeline(family: str, device: str, dtype):
    """The real SD-1.5 / SDXL architecture with random weights (SDXL with one-layer text encoders, as the anchors
    use tiny ones: the text encoders are a few % of the FLOPs)."""
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

    from lcmtool.demo.arch import SD15_SCHEDULER, SDXL_SCHEDULER, build_tokenizer
    from lcmtool.lora.io import unet_preset

    tok = build_tokenizer()
    tok.model_max_length = 77
    v = 49408
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_preset(family)).to(dtype)
        vae = AutoencoderKL(**SD_VAE, sample_size=unet.config.sample_size * 8).to(dtype)
        if family == "sd15":
            te = CLIPTextModel(CLIPTextConfig(vocab_size=v, **CLIP_L)).to(dtype)
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                           scheduler=PNDMScheduler.from_config(SD15_SCHEDULER), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        else:
            # one-layer encoders of the real widths (768 + 1280 = the UNet's 2048 context; 1280 pooled)
            te1 = CLIPTextModel(CLIPTextConfig(vocab_size=v, **dict(CLIP_L, num_hidden_layers=1))).to(dtype)
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=v, hidden_size=1280, intermediate_size=5120, num_hidden_layers=1, num_attention_heads=20,
                projection_dim=1280, max_position_embeddings=77)).to(dtype)
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                             tokenizer_2=tok, unet=unet,
                                             scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _median_ms(fn, device: str, n: int, warm: int) -> float:
    import torch

    for _ in range(warm):
        fn()
    ts = []
    for _ in range(n):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1000)
    return statistics.median(ts)


def bench_sample(model: str = "demo:sd", device: str = "auto", dtype: str = "auto", lora: str | None = None,
                 batch: int = 1, height: int | None = None, width: int | None = None, n: int = 5,
                 warm: int = 2, dpm_steps: int = 25, log=print) -> dict:
    """ms/image for plain diffusers (LCM 4 steps LoRA unfused / fused; DPM++ 25 CFG 7.5) and lcmtool's path."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler

    from lcmtool.engines.sample import Job, apply_loras, default_loras, generate, set_scheduler
    from lcmtool.lora.io import save_lora
    from lcmtool.lora.synth import synth_lora, target_shapes
    from lcmtool.models.load import load_pipeline, quiet_libraries, resolve_device, resolve_dtype

    quiet_libraries()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    torch.set_grad_enabled(False)
    if model.startswith("random:"):
        family = model.split(":", 1)[1]
        pipe = random_pipeline(family, dev, dt)
    else:
        pipe, family = load_pipeline(model, dt, dev)
    base = dict(pipe.scheduler.config)
    h = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    w = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    tmp = Path(tempfile.mkdtemp(prefix="lcmtool-bench-"))
    if lora is None and model.startswith("demo:"):
        lora = default_loras(model, "lcm")[0][0]
    if lora is None:  # rank 64 on the 14 LCM-LoRA target kinds, like the released LCM-LoRAs
        lora = str(save_lora(synth_lora(target_shapes(pipe.unet), rank=64, std=1e-3), tmp / "lora.safetensors",
                             format="diffusers"))
    res: dict = {"model": model, "family": family, "device": dev, "dtype": str(dt).replace("torch.", ""),
                 "gpu": torch.cuda.get_device_name() if dev.startswith("cuda") else None, "size": f"{w}x{h}",
                 "batch": batch, "torch": torch.__version__}
    prompts = [PROMPT] * batch

    def rec(key, ms):
        res[key] = round(ms / batch, 2)
        log(f"{key}: {res[key]} ms/image")

    def plain(steps, g):
        gens = [torch.Generator(dev).manual_seed(i) for i in range(batch)]
        return lambda: pipe(prompts, num_inference_steps=steps, guidance_scale=g, height=h, width=w,
                            generator=gens, output_type="pil")

    # 1. plain diffusers, as the docs show
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(base, algorithm_type="dpmsolver++")
    rec(f"diffusers_dpmpp{dpm_steps}_cfg7.5_ms", _median_ms(plain(dpm_steps, 7.5), dev, max(1, n // 2), 1))
    pipe.scheduler = LCMScheduler.from_config(base)
    pipe.load_lora_weights(lora, adapter_name="lcm")
    rec("diffusers_lcm4_lora_unfused_ms", _median_ms(plain(4, 1.0), dev, n, warm))
    pipe.fuse_lora()
    rec("diffusers_lcm4_lora_fused_ms", _median_ms(plain(4, 1.0), dev, n, warm))
    pipe.unfuse_lora()
    pipe.unload_lora_weights()

    # 2. lcmtool's path on the same weights
    jobs = [Job(PROMPT, "", i) for i in range(batch)]
    set_scheduler(pipe, base, "dpmpp", dpm_steps, "leading")
    rec(f"lcmtool_dpmpp{dpm_steps}_cfg7.5_ms", _median_ms(
        lambda: generate(pipe, jobs, "dpmpp", dpm_steps, 7.5, h, w, dev), dev, max(1, n // 2), 1))
    apply_loras(pipe, family, model, [(lora, 1.0)], fuse=True)
    set_scheduler(pipe, base, "lcm", 4, "leading")
    rec("lcmtool_lcm4_lora_ms", _median_ms(lambda: generate(pipe, jobs, "lcm", 4, 1.0, h, w, dev), dev, n, warm))

    lt = res["lcmtool_lcm4_lora_ms"]
    res["speedup_vs_diffusers_lcm4_unfused"] = round(res["diffusers_lcm4_lora_unfused_ms"] / lt, 3)
    res["speedup_vs_diffusers_lcm4_fused"] = round(res["diffusers_lcm4_lora_fused_ms"] / lt, 3)
    res[f"speedup_vs_diffusers_dpmpp{dpm_steps}"] = round(res[f"diffusers_dpmpp{dpm_steps}_cfg7.5_ms"] / lt, 3)
    res[f"lcmtool_dpmpp{dpm_steps}_vs_diffusers"] = round(
        res[f"diffusers_dpmpp{dpm_steps}_cfg7.5_ms"] / res[f"lcmtool_dpmpp{dpm_steps}_cfg7.5_ms"], 3)
    return res


if __name__ == "__main__":
    import json
    import sys

    args = dict(a.split("=", 1) for a in sys.argv[1:])
    for k in ("batch", "n", "warm", "dpm_steps", "height", "width"):
        if k in args:
            args[k] = int(args[k])
    print(json.dumps(bench_sample(**args)))
