"""The sample engine: `sample(cfg)` makes PNGs for every prompt x num_images.

Flow: validate every input (engines/inputs.py: prompts, steps, LoRA files) -> load the pipeline -> pin the
scheduler -> fuse the LoRAs -> diffusers' own pipeline call per batch, with per-image device generators so an
image depends on its seed, not on its batch -> PNG + metadata, written atomically. `compare` (engines/compare.py)
shares the loading, LoRA and batch functions here.
The denoising loop is diffusers' with the no-sync schedulers of `schedulers.py`.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from lcmtool import __version__
from lcmtool.engines.inputs import (
    Job,
    check_guidance,
    check_steps,
    default_loras,
    parse_loras,
    read_prompts,
)
from lcmtool.errors import LcmError
from lcmtool.models.load import resolve_model
from lcmtool.models.schedulers import LCM_ORIGINAL_STEPS, SAMPLER_NAMES, make_scheduler, pinned_config
from lcmtool.options import SampleConfig  # every option is declared once, in lcmtool/options.py

# ---- model, LoRAs ----

def load(model: str, device: str, dtype: str, model_config: str | None = None, tokenizer: str | None = None):
    """-> (pipe, family, device, load ms). No global grad switch: diffusers' pipeline call and the LoRA fuse
    run under no_grad themselves, and a process-wide set_grad_enabled(False) leaked into later callers."""
    from lcmtool.models.load import load_pipeline, resolve_device, resolve_dtype

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    t0 = time.perf_counter()
    pipe, family = load_pipeline(model, dt, dev, config_dir=model_config, tokenizer=tokenizer)
    return pipe, family, dev, (time.perf_counter() - t0) * 1000


def check_fit(unet, loras: list, spec: str) -> None:
    """Every UNet module of every LoRA exists in `unet` with the right shape, or LcmError naming the first one."""
    for lf, _ in loras:
        for path, m in lf.modules.items():
            if path.startswith(("text_encoder.", "text_encoder_2.")):
                continue
            try:
                weight = unet.get_submodule(path).weight
            except AttributeError:
                raise LcmError(f"LoRA {lf.path} does not fit {spec}: module '{path}' does not exist in this "
                               "model (a LoRA for another model family?)") from None
            if tuple(m.out_shape)[:2] != tuple(weight.shape[:2]) or m.A[0].numel() != weight[0].numel():
                raise LcmError(f"LoRA {lf.path} does not fit {spec}: module '{path}' changes a "
                               f"{list(m.out_shape)} weight but the model's is {list(weight.shape)}")


def check_loras(pipe, family: str, spec: str, loras: list[tuple[str, float]]) -> list:
    """Load the LoRA files and check their family and fit to `pipe`; -> [(LoraFile, weight)]."""
    from lcmtool.lora.io import load_lora

    files = [(load_lora(p), w) for p, w in loras]
    strict = resolve_model(spec).strict_family
    for lf, _ in files:
        if strict and lf.family and family and lf.family != family:
            raise LcmError(f"LoRA {lf.path} is for {lf.family} but {spec} is {family}")
    check_fit(pipe.unet, files, spec)
    return files


def apply_loras(pipe, family: str, spec: str, loras: list[tuple[str, float]], fuse: bool,
                files: list | None = None) -> list[dict]:
    """Load, check and apply LoRAs (fused by default); returns their records for the PNG metadata.
    `files`: what `check_loras` returned for these `loras`, so that they are not read and checked again."""
    if not loras:
        return []
    from lcmtool.fileio import sha256_file
    from lcmtool.lora.fuse import fuse_into_pipeline

    if files is None:
        files = check_loras(pipe, family, spec, loras)
    if fuse:
        fuse_into_pipeline(pipe, files)  # the UNet and the text encoders the LoRAs change (issue 17)
    else:
        names = [f"lora{i}" for i in range(len(loras))]
        try:
            for name, (path, _) in zip(names, loras, strict=True):
                pipe.load_lora_weights(path, adapter_name=name)
            pipe.set_adapters(names, [w for _, w in loras])
        except (ValueError, KeyError, RuntimeError) as e:
            raise LcmError(f"diffusers could not load the LoRA unfused: {str(e).splitlines()[0][:200]}") from None
    return [{"path": str(p), "weight": w, "sha256": sha256_file(p), "format": lf.format}
            for (p, w), (lf, _) in zip(loras, files, strict=True)]


# ---- one batch ----

def generate(pipe, jobs: list[Job], scheduler: str, steps: int, guidance: float, height: int, width: int,
             device: str, timesteps: list[int] | None = None, gamma: float = 0.3, **extra):
    """One pipeline call for `jobs` with the scheduler already on `pipe`; -> (PIL images, ms for the batch)."""
    import torch

    gens = [torch.Generator(device=device).manual_seed(j.seed) for j in jobs]
    kw = dict(prompt=[j.prompt for j in jobs], height=height, width=width, guidance_scale=guidance,
              generator=gens, output_type="pil", **extra)
    if guidance > 1 and any(j.negative_prompt for j in jobs):  # None keeps SDXL's zeros for an empty negative
        kw["negative_prompt"] = [j.negative_prompt for j in jobs]
    if timesteps:
        kw["timesteps"] = list(timesteps)
    else:
        kw["num_inference_steps"] = steps
    if scheduler == "tcd":
        kw["eta"] = gamma
    t0 = time.perf_counter()
    images = pipe(**kw).images  # output_type "pil" copies to the host: the batch is finished on return
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return images, (time.perf_counter() - t0) * 1000


def set_scheduler(pipe, base_config: dict, name: str, steps: int, timestep_spacing: str) -> None:
    orig = max(LCM_ORIGINAL_STEPS, steps) if name in ("lcm", "tcd") else None
    pipe.scheduler = make_scheduler(name, base_config, timestep_spacing=timestep_spacing,
                                    original_inference_steps=orig)


def image_size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    f = pipe.vae_scale_factor
    native = pipe.unet.config.sample_size * f
    h, w = height or native, width or native
    for name, v in (("height", h), ("width", w)):
        if v < f or v % f:
            raise LcmError(f"--{name} {v} must be a positive multiple of {f} (the VAE's downsampling factor)")
    return h, w


def _next_index(out: Path) -> int:
    idx = [int(p.name.split("-", 1)[0]) for p in out.glob("*.png") if p.name.split("-", 1)[0].isdigit()]
    return max(idx, default=-1) + 1


def sample(cfg: SampleConfig, on_image: Callable[[dict], None] | None = None, progress: bool = True) -> list[dict]:
    """`lcmtool sample`: images for every prompt x num_images; returns one record per PNG written."""
    from lcmtool.config import write_resolved
    from lcmtool.outputs.png import save_png

    if cfg.batch_size < 1:
        raise LcmError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    jobs = read_prompts(cfg.prompt, cfg.prompts, cfg.negative_prompt, cfg.seed, cfg.num_images)
    resolve_model(cfg.model)  # a missing model is told before anything else
    steps = check_steps(cfg.scheduler, cfg.steps, cfg.timesteps)
    guidance = check_guidance(cfg.scheduler, cfg.guidance, any(j.negative_prompt for j in jobs), steps)
    loras = parse_loras(cfg.lora)
    if loras is None:
        loras = default_loras(cfg.model, cfg.scheduler)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise LcmError(f"--out {cfg.out} is a file; sample writes into a folder")

    pipe, family, device, load_ms = load(cfg.model, cfg.device, cfg.dtype, cfg.model_config, cfg.tokenizer)
    base_config = dict(pipe.scheduler.config)
    height, width = image_size(pipe, cfg.height, cfg.width)
    lora_meta = apply_loras(pipe, family, cfg.model, loras, cfg.fuse)
    set_scheduler(pipe, base_config, cfg.scheduler, steps, cfg.timestep_spacing)
    sched_cfg = pinned_config(cfg.scheduler, base_config, timestep_spacing=cfg.timestep_spacing)

    index = _next_index(out) if out.is_dir() else 0
    records: list[dict] = []
    run_meta = dict(model=cfg.model, family=family, loras=lora_meta, fused=cfg.fuse, scheduler=cfg.scheduler,
                    sampler=SAMPLER_NAMES[cfg.scheduler], steps=steps, guidance=guidance,
                    gamma=cfg.gamma if cfg.scheduler == "tcd" else None, width=width, height=height,
                    device=device, dtype=str(pipe.unet.dtype).replace("torch.", ""),
                    scheduler_config=sched_cfg, version=__version__)
    with _progress(progress) as bar:
        task = bar.add_task("sample", total=len(jobs))
        for b in range(0, len(jobs), cfg.batch_size):
            batch = jobs[b:b + cfg.batch_size]
            images, ms = generate(pipe, batch, cfg.scheduler, steps, guidance, height, width, device,
                                  cfg.timesteps, cfg.gamma)
            timesteps = pipe.scheduler._host_timesteps.tolist()  # the schedule this call ran
            for job, im in zip(batch, images, strict=True):
                meta = dict(run_meta, prompt=job.prompt, negative_prompt=job.negative_prompt if guidance > 1 else "",
                            seed=job.seed, timesteps=timesteps)
                path = out / f"{index:05d}-{job.seed}.png"
                index += 1
                save_png(im, path, meta)
                rec = {"path": str(path), "prompt": job.prompt, "seed": job.seed, "scheduler": cfg.scheduler,
                       "steps": steps, "guidance": guidance, "width": width, "height": height,
                       "ms_per_image": round(ms / len(batch), 2), "batch_ms": round(ms, 2), "batch_size": len(batch),
                       "load_ms": round(load_ms, 1)}
                records.append(rec)
                if on_image:
                    on_image(rec)
            bar.advance(task, len(batch))
    write_resolved(cfg, out / "sample.yaml")
    return records


def _progress(enabled: bool):
    """rich's progress bar on stderr, shown only when asked and stderr is a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("sampling"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True, disable=not (enabled and sys.stderr.isatty()))
