"""`bench_sample()`: plain diffusers (as its docs show) vs lcmtool's sampling loop, same run, same device, same inputs.

Plain diffusers: the pipeline call with LCMScheduler.from_config, the LoRA as a peft adapter via `load_lora_weights`
(unfused), then `fuse_lora()`; DPM-Solver++ 25 steps CFG 7.5 on the teacher. lcmtool: `FastSampler` (engines'
loop: pinned no-sync schedulers, LoRA fused by lcmtool, fused QKV, channels_last on CUDA), eager and, where asked
(default: CUDA), torch.compiled. Text is encoded on every call on both paths (lcmtool's prompt cache is cleared),
so the rows compare the same work.

Every row: ms/image (end to end: text, denoising, VAE decode, PIL images), images/s, peak memory (CUDA), compile
time, ratio to plain diffusers, fraction of the FLOP bound (CUDA, at PEAK_TFLOPS), and `outputs_match` /
`max_abs_diff`: the final latents of that path vs plain diffusers' (the fused LoRA for LCM rows) on the same
prompt and seeds, within `tolerance`.
Models: anything `load_pipeline` takes, plus `random:sd15|sdxl|ssd1b` (the real architectures from
lcmtool/presets with random weights; compute does not depend on the values).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

PROMPT = "a large red circle on the left"
TOLERANCE = {"float32": 2e-3, "float16": 5e-2, "bfloat16": 1e-1}  # max |latent difference| counted as a match
PEAK_TFLOPS = {"H100": 790.0, "H200": 790.0}  # dense bf16/fp16 reachable on one chip (ANCHORS.md's bound)


def random_pipeline(family: str, device: str, dtype):
    """The real SD-1.5 / SDXL / SSD-1B pipeline (lcmtool/presets configs, CLIP's tokenizer) with random weights."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from lcmtool.models.schedulers import scheduler_class
    from lcmtool.models.single_file import single_file_config_dir

    with tempfile.TemporaryDirectory(prefix="lcmtool-random-") as tmp:
        d = single_file_config_dir(family, dst=Path(tmp))
        torch.manual_seed(0)
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(d / "unet")).to(dtype)
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(d / "vae")).to(dtype)
            te = CLIPTextModel(CLIPTextConfig.from_pretrained(d / "text_encoder")).to(dtype)
            te2 = (CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(d / "text_encoder_2")).to(dtype)
                   if family != "sd15" else None)
        tok = CLIPTokenizer.from_pretrained(d / "tokenizer")
        sched = scheduler_class("ddim").from_pretrained(d / "scheduler")  # any: only its noise schedule is read
    if family == "sd15":
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                         unet=unet, scheduler=sched, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _median_ms(fn, device: str, n: int, warm: int) -> float:
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(n):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        ts.append((time.perf_counter() - t) * 1000)
    return statistics.median(ts)


class _Bench:
    """One model on one device; `row(...)` times a callable and compares its final latents with a reference."""

    def __init__(self, pipe, model: str, family: str, device: str, h: int, w: int, n: int, warm: int, log):
        import torch

        self.pipe, self.device, self.h, self.w, self.n, self.warm, self.log = pipe, device, h, w, n, warm, log
        self.dtype = str(pipe.unet.dtype).replace("torch.", "")
        self.cuda = device.startswith("cuda")
        gpu = torch.cuda.get_device_name() if self.cuda else None
        peak = next((v for k, v in PEAK_TFLOPS.items() if gpu and k in gpu), None)
        self.peak = peak * 1e12 if peak else None
        self.common = {"model": model, "family": family, "device": device, "gpu": gpu, "dtype": self.dtype,
                       "size": f"{w}x{h}", "torch": torch.__version__, "tolerance": TOLERANCE[self.dtype]}
        self.refs: dict = {}
        self.flops: dict = {}

    def row(self, case: str, path: str, batch: int, run, latents, ref: str, baseline_ms: float | None = None,
            compile_s: float | None = None, flops_fn=None) -> dict:
        """Time `run()` (one call = `batch` images), compare `latents()` with the reference latents `ref`."""
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        lat = latents().float()
        if ref not in self.refs:
            self.refs[ref] = lat
        diff = float((lat - self.refs[ref]).abs().max()) if lat.shape == self.refs[ref].shape else float("inf")
        ms = _median_ms(run, self.device, self.n, self.warm) / batch
        row = dict(self.common, case=case, path=path, batch=batch, ms_per_image=round(ms, 2),
                   images_per_s=round(1000 / ms, 2), compile_s=None if compile_s is None else round(compile_s, 1),
                   peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if self.cuda else None,
                   speedup_vs_diffusers=round(baseline_ms / ms, 3) if baseline_ms else None,
                   max_abs_diff=diff, outputs_match=bool(diff <= TOLERANCE[self.dtype]), flop_bound_fraction=None)
        if self.peak and flops_fn is not None:
            if case not in self.flops:
                from torch.utils.flop_counter import FlopCounterMode

                with FlopCounterMode(display=False) as fc:
                    flops_fn()
                self.flops[case] = fc.get_total_flops() / batch
            row["flop_bound_fraction"] = round(self.flops[case] / self.peak * 1000 / ms, 3)
        self.log(f"{case:>16} b{batch:<3} {path:<28} {ms:9.2f} ms/img  {row['images_per_s']:8.2f} img/s  "
                 f"x{row['speedup_vs_diffusers'] or 1:<6} match {row['outputs_match']} ({diff:.2e})"
                 + (f"  compile {row['compile_s']} s" if compile_s is not None else ""))
        return row


def _plain(pipe, device: str, batch: int, steps: int, g: float, h: int, w: int, output: str = "pil"):
    import torch

    def call():
        gens = [torch.Generator(device).manual_seed(i) for i in range(batch)]
        return pipe([PROMPT] * batch, num_inference_steps=steps, guidance_scale=g, height=h, width=w,
                    generator=gens, output_type=output).images
    return call


def _ours(sampler, sched_fn, batch: int, steps: int, g: float, h: int, w: int, output: str = "pil"):
    def call():
        sampler._text.clear()  # encode the prompt on every call, as the pipeline does
        return sampler([PROMPT] * batch, [""] * batch, list(range(batch)), sched_fn(), steps, g, h, w,
                       output=output)
    return call


def _load(model: str, dev: str, dt):
    from lcmtool.models.load import load_pipeline

    if model.startswith("random:"):
        family = model.split(":", 1)[1]
        return random_pipeline(family, dev, dt), family
    return load_pipeline(model, dt, dev)


def _lora_file(model: str, pipe, tmp: Path, lora: str | None) -> str:
    from lcmtool.engines.inputs import default_loras
    from lcmtool.lora.io import save_lora
    from lcmtool.lora.synth import synth_lora, target_shapes

    if lora is None and model.startswith("demo:"):
        lora = default_loras(model, "lcm")[0][0]
    if lora is None:  # rank 64 on the 14 LCM-LoRA target kinds, like the released LCM-LoRAs
        lora = str(save_lora(synth_lora(target_shapes(pipe.unet), rank=64, std=1e-3), tmp / "lora.safetensors",
                             format="diffusers"))
    return lora


def _diffusers_rows(B: _Bench, pipe, lora: str, base: dict, batches, dpm_steps: int) -> tuple[list[dict], dict]:
    """Plain diffusers as the docs show it: DPM-Solver++ on the teacher; LCM with the peft adapter, then fused."""
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler

    dev, h, w = B.device, B.h, B.w
    rows, base_ms = [], {}
    dpm = f"dpmpp{dpm_steps}_cfg7.5"
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(base, algorithm_type="dpmsolver++")
    rows.append(B.row(dpm, "diffusers", 1, _plain(pipe, dev, 1, dpm_steps, 7.5, h, w),
                      _plain(pipe, dev, 1, dpm_steps, 7.5, h, w, "latent"), ref=dpm,
                      flops_fn=_plain(pipe, dev, 1, dpm_steps, 7.5, h, w)))
    base_ms[dpm, 1] = rows[-1]["ms_per_image"]
    pipe.scheduler = LCMScheduler.from_config(base)
    teacher = {k: v.detach().to("cpu", copy=True) for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(lora, adapter_name="lcm")
    rows.append(B.row("lcm4", "diffusers_lora_unfused", 1, _plain(pipe, dev, 1, 4, 1.0, h, w),
                      _plain(pipe, dev, 1, 4, 1.0, h, w, "latent"), ref="lcm4_b1"))
    pipe.fuse_lora()
    for b in batches:
        rows.append(B.row("lcm4", "diffusers_lora_fused", b, _plain(pipe, dev, b, 4, 1.0, h, w),
                          _plain(pipe, dev, b, 4, 1.0, h, w, "latent"), ref=f"lcm4_b{b}",
                          flops_fn=_plain(pipe, dev, b, 4, 1.0, h, w)))
        base_ms["lcm4", b] = rows[-1]["ms_per_image"]
    rows[1]["speedup_vs_diffusers"] = round(base_ms["lcm4", 1] / rows[1]["ms_per_image"], 3)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    pipe.unet.load_state_dict(teacher)  # unfusing subtracts the delta again: not bit-exact in fp16
    return rows, base_ms


def _lcmtool_rows(B: _Bench, pipe, family: str, model: str, lora: str, base: dict, batches, dpm_steps: int,
                  compile: bool, base_ms: dict) -> list[dict]:
    """lcmtool's loop on the same weights: eager, then compiled (first call of each shape = compile time)."""
    from lcmtool.engines.sample import apply_loras
    from lcmtool.models.pipeline import FastSampler
    from lcmtool.models.schedulers import make_scheduler

    h, w = B.h, B.w
    s = FastSampler(pipe)
    dpm = f"dpmpp{dpm_steps}_cfg7.5"

    def sched(name, steps):
        return lambda: make_scheduler(name, base, timestep_spacing="leading",
                                      original_inference_steps=50 if name == "lcm" else None)

    def measured(case, path, b, steps, g, name):
        fn, lat = _ours(s, sched(name, steps), b, steps, g, h, w), _ours(s, sched(name, steps), b, steps, g, h, w,
                                                                          "latent")
        compile_s = None
        if s.compile:  # the first call of this shape compiles; the steady call time is subtracted below
            t0 = time.perf_counter()
            fn()
            _sync(B.device)
            compile_s = time.perf_counter() - t0
        row = B.row(case, path, b, fn, lat, ref=f"{case}_b{b}" if case == "lcm4" else case,
                    baseline_ms=base_ms.get((case, b)), compile_s=compile_s, flops_fn=fn)
        if compile_s is not None:
            row["compile_s"] = round(compile_s - row["ms_per_image"] * b / 1000, 1)
        return row

    rows = []
    for compiled in ([False, True] if compile else [False]):
        s.set_compile(compiled)
        suffix = "_compiled" if compiled else ""
        rows.append(measured(dpm, "lcmtool" + suffix, 1, dpm_steps, 7.5, "dpmpp"))
    apply_loras(pipe, family, model, [(lora, 1.0)], fuse=True)
    for compiled in ([False, True] if compile else [False]):
        s.set_compile(compiled)
        s.weights_changed()
        suffix = "_compiled" if compiled else ""
        for b in batches:
            rows.append(measured("lcm4", "lcmtool" + suffix, b, 4, 1.0, "lcm"))
    return rows


def bench_sample(model: str = "demo:sd", device: str = "auto", dtype: str = "auto", lora: str | None = None,
                 batches: tuple[int, ...] = (1, 16), height: int | None = None, width: int | None = None, n: int = 5,
                 warm: int = 2, dpm_steps: int = 25, compile: bool | None = None, log=print) -> list[dict]:
    """Rows of ms/image, images/s, memory, compile time, ratio and outputs_match, plain diffusers vs lcmtool."""
    import torch

    from lcmtool.models.load import quiet_libraries, resolve_device, resolve_dtype
    from lcmtool.models.pipeline import compile_by_default

    quiet_libraries()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    pipe, family = _load(model, dev, dt)
    base = dict(pipe.scheduler.config)
    h = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    w = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    compile = compile_by_default(dev) if compile is None else compile
    with tempfile.TemporaryDirectory(prefix="lcmtool-bench-") as tmp, torch.no_grad():
        lora = _lora_file(model, pipe, Path(tmp), lora)
        B = _Bench(pipe, model, family, dev, h, w, n, warm, log)
        rows, base_ms = _diffusers_rows(B, pipe, lora, base, batches, dpm_steps)
        rows += _lcmtool_rows(B, pipe, family, model, lora, base, batches, dpm_steps, compile, base_ms)
    return rows
