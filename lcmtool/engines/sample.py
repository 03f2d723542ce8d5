"""The sample engine: `sample(cfg)` makes PNGs for every prompt x num_images.

Flow: validate every input (engines/inputs.py) -> this process's share of the images (engines/shard.py), less
those already written -> load the pipeline -> fuse the LoRAs -> lcmtool's denoising loop
(lcmtool.models.pipeline.FastSampler: the diffusers pipeline's numbers, text encoded once per prompt, no
host-device sync, optional torch.compile) per batch, one device generator per image so that an image depends on
its seed, not on its batch -> PNG + metadata, written atomically after each batch.

Image names are deterministic: `<prompt index>-<seed>-<request digest>.png`; the digest covers everything that
sets the pixels (model, LoRAs by content, scheduler, steps, guidance, size, dtype, device type, prompt, seed), so
a rerun of the same command skips what is written and a different command never overwrites it. A killed run
loses at most the batch in flight. `compare` (engines/compare.py) shares the loading, LoRA and batch functions.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
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
from lcmtool.engines.shard import Shard, shard_for
from lcmtool.errors import LcmError
from lcmtool.models.load import resolve_model
from lcmtool.models.schedulers import LCM_ORIGINAL_STEPS, SAMPLER_NAMES, make_scheduler, pinned_config
from lcmtool.options import SampleConfig  # every option is declared once, in lcmtool/options.py

PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last chunk of every complete PNG


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
                files: list | None = None, sha: list[str] | None = None) -> list[dict]:
    """Load, check and apply LoRAs (fused by default); returns their records for the PNG metadata.
    `files`: what `check_loras` returned for these `loras`, `sha`: their sha256, so nothing is read twice."""
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
    sha = sha or [sha256_file(p) for p, _ in loras]
    return [{"path": str(p), "weight": w, "sha256": h, "format": lf.format}
            for (p, w), h, (lf, _) in zip(loras, sha, files, strict=True)]


# ---- batches ----

def set_scheduler(pipe, base_config: dict, name: str, steps: int, timestep_spacing: str):
    """Put the pinned scheduler `name` on `pipe` (LCM/TCD: original steps stretched to `steps` if more); -> it."""
    orig = max(LCM_ORIGINAL_STEPS, steps) if name in ("lcm", "tcd") else None
    pipe.scheduler = make_scheduler(name, base_config, timestep_spacing=timestep_spacing,
                                    original_inference_steps=orig)
    return pipe.scheduler


def sampler_of(pipe, **kw):
    """The FastSampler kept on `pipe` (made on first use; `kw` as FastSampler's). Callers that change the UNet's
    weights in place between calls leave fuse_qkv off or call `weights_changed()`."""
    from lcmtool.models.pipeline import FastSampler

    s = getattr(pipe, "_lcmtool_sampler", None)
    if s is None:
        s = FastSampler(pipe, **{"fuse_qkv": False, **kw})
        pipe._lcmtool_sampler = s
    return s


def generate(pipe, jobs: list[Job], scheduler: str, steps: int, guidance: float, height: int, width: int,
             device: str, timesteps: list[int] | None = None, gamma: float = 0.3, sampler=None,
             steady: bool = False):
    """One batch of `jobs` with the scheduler on `pipe`, through lcmtool's loop; -> (PIL images, ms for the batch:
    its wall time, a first call's tracing or compiling included). `steady`: a batch that traced a new shape is run
    again and that run timed (the same images), so that the ms say what the path costs from then on (paper's
    tables). The negative prompt counts only at guidance > 1 (no CFG pass otherwise)."""
    import torch

    from lcmtool.models.pipeline import NonFiniteImage

    sampler = sampler or sampler_of(pipe)
    negatives = [j.negative_prompt if guidance > 1 else "" for j in jobs]

    def run():
        try:
            images = sampler([j.prompt for j in jobs], negatives, [j.seed for j in jobs], pipe.scheduler, steps,
                             guidance, height, width, timesteps=timesteps,
                             eta=gamma if scheduler == "tcd" else None)
        except NonFiniteImage as e:
            j = jobs[e.positions[0]]
            raise LcmError(f"the model produced NaN/inf pixels for prompt {j.prompt!r} (seed {j.seed}); no image "
                           "saved (non-finite weights in the model or a LoRA?)") from None
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        return images

    t0, traced = time.perf_counter(), sampler.trace_s
    images = run()
    if steady and sampler.trace_s > traced:
        t0 = time.perf_counter()
        images = run()
    return images, (time.perf_counter() - t0) * 1000


def image_size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    f = pipe.vae_scale_factor
    native = pipe.unet.config.sample_size * f
    h, w = height or native, width or native
    for name, v in (("height", h), ("width", w)):
        if v < f or v % f:
            raise LcmError(f"--{name} {v} must be a positive multiple of {f} (the VAE's downsampling factor)")
    return h, w


# ---- the command ----

@dataclass
class Plan:
    """What `sample` will make, checked before any model loads."""
    jobs: list[Job]
    steps: int
    guidance: float
    loras: list[tuple[str, float]]
    sha: list[str]              # the LoRAs' sha256 (names, metadata)
    out: Path
    request: dict               # what sets the pixels, besides prompt and seed


def plan(cfg: SampleConfig, device: str) -> Plan:
    from lcmtool.fileio import sha256_file
    from lcmtool.models.load import resolve_dtype

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
    sha = [sha256_file(p) for p, _ in loras]
    distilled = cfg.scheduler in ("lcm", "tcd")
    request = dict(model=cfg.model, model_config=cfg.model_config, tokenizer=cfg.tokenizer,
                   loras=[[h, w] for h, (_, w) in zip(sha, loras, strict=True)], fuse=cfg.fuse,
                   scheduler=cfg.scheduler, steps=steps, timesteps=cfg.timesteps, guidance=guidance,
                   gamma=cfg.gamma if cfg.scheduler == "tcd" else None,
                   spacing=None if distilled else cfg.timestep_spacing, height=cfg.height, width=cfg.width,
                   dtype=str(resolve_dtype(cfg.dtype, device)), device="cuda" if device.startswith("cuda") else "cpu")
    return Plan(jobs, steps, guidance, loras, sha, out, request)


def image_path(p: Plan, job: Job) -> Path:
    """`<prompt index>-<seed>-<digest of everything that sets the pixels>.png`."""
    neg = job.negative_prompt if p.guidance > 1 else ""
    key = json.dumps([p.request, job.prompt, neg, job.seed], sort_keys=True, default=str)
    return p.out / f"{job.index:05d}-{job.seed}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.png"


def is_complete(path: Path) -> bool:
    """A PNG written whole (atomic writes publish only complete files; the end chunk says so too)."""
    try:
        with open(path, "rb") as f:
            f.seek(-len(PNG_END), 2)
            return f.read() == PNG_END
    except OSError:
        return False


def _record(p: Plan, job: Job, path: Path, cfg: SampleConfig, **timing) -> dict:
    return {"path": str(path), "prompt": job.prompt, "seed": job.seed, "scheduler": cfg.scheduler,
            "steps": p.steps, "guidance": p.guidance, "width": cfg.width, "height": cfg.height, **timing}


def _resolve_compile(cfg: SampleConfig, device: str, unet_calls: int | None = None) -> bool:
    """--compile, or its auto value for a run of `unet_calls` UNet calls (CPU: traces once they pay)."""
    from lcmtool.models.pipeline import compile_by_default

    value = getattr(cfg, "compile", None)
    return compile_by_default(device, unet_calls) if value is None else bool(value)


def sample(cfg: SampleConfig, on_image: Callable[[dict], None] | None = None, progress: bool = True) -> list[dict]:
    """`lcmtool sample`: images for every prompt x num_images; returns one record per PNG (skipped: true for
    those a previous run wrote). Under a launcher each rank makes its share; rank 0 gets every record."""
    from lcmtool.models.load import resolve_device

    shard = shard_for(cfg.device)
    device = shard.device or resolve_device(cfg.device)
    p = plan(cfg, device)
    mine = shard.split(p.jobs)
    written = [is_complete(image_path(p, j)) for j in mine]
    todo = [j for j, w in zip(mine, written, strict=True) if not w]
    skipped = [_record(p, j, image_path(p, j), cfg, ms_per_image=0.0, batch_ms=0.0, batch_size=0, load_ms=0.0,
                       skipped=True) for j, w in zip(mine, written, strict=True) if w]
    records = _emit(shard, skipped, on_image)
    n_batches = shard.most(-(-len(todo) // cfg.batch_size))
    if n_batches:
        records += _sample_jobs(cfg, p, shard, device, todo, n_batches, on_image, progress)
    if shard.main:
        from lcmtool.config import write_resolved

        p.out.mkdir(parents=True, exist_ok=True)
        write_resolved(cfg, p.out / "sample.yaml")
    shard.done()
    return records


def _emit(shard: Shard, records: list[dict], on_image) -> list[dict]:
    """Every rank's records to rank 0 (a collective), which hands them to `on_image`; -> this rank's share."""
    every = shard.gather(records)
    if shard.main and on_image:
        for rec in every:
            on_image(rec)
    return every if shard.main else records


def _sample_jobs(cfg: SampleConfig, p: Plan, shard: Shard, device: str, todo: list[Job], n_batches: int,
                 on_image, progress: bool) -> list[dict]:
    """Load once (ranks with nothing to do skip it), then `n_batches` rounds of one batch and one gather each."""
    from lcmtool.outputs.png import save_png

    ctx = _setup(cfg, p, device, len(todo)) if todo else None
    records: list[dict] = []
    with _progress(progress and shard.main) as bar:
        task = bar.add_task("sample", total=len(todo))
        for b in range(n_batches):
            batch = todo[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            recs = []
            if batch:
                images, ms = generate(ctx["pipe"], batch, cfg.scheduler, p.steps, p.guidance, ctx["height"],
                                      ctx["width"], device, cfg.timesteps, cfg.gamma, sampler=ctx["sampler"])
                timesteps = ctx["pipe"].scheduler._host_timesteps.tolist()  # the schedule this call ran
                for job, im in zip(batch, images, strict=True):
                    path = image_path(p, job)
                    meta = dict(ctx["meta"], prompt=job.prompt, seed=job.seed, timesteps=timesteps,
                                negative_prompt=job.negative_prompt if p.guidance > 1 else "")
                    save_png(im, path, meta)
                    recs.append(dict(_record(p, job, path, cfg), width=ctx["width"], height=ctx["height"],
                                     ms_per_image=round(ms / len(batch), 2), batch_ms=round(ms, 2),
                                     batch_size=len(batch), load_ms=round(ctx["load_ms"], 1), skipped=False,
                                     compile_s=round(ctx["sampler"].compile_s, 1) if ctx["sampler"].compile else None))
            records += _emit(shard, recs, on_image)
            bar.advance(task, len(batch))
    return records


def _setup(cfg: SampleConfig, p: Plan, device: str, n: int) -> dict:
    """Model, LoRAs, scheduler, the loop and the metadata every PNG of this run shares."""
    from lcmtool.models.pipeline import FastSampler

    pipe, family, device, load_ms = load(cfg.model, device, cfg.dtype, cfg.model_config, cfg.tokenizer)
    base_config = dict(pipe.scheduler.config)
    height, width = image_size(pipe, cfg.height, cfg.width)
    lora_meta = apply_loras(pipe, family, cfg.model, p.loras, cfg.fuse, sha=p.sha)
    set_scheduler(pipe, base_config, cfg.scheduler, p.steps, cfg.timestep_spacing)
    sched_cfg = pinned_config(cfg.scheduler, base_config, timestep_spacing=cfg.timestep_spacing)
    batches = -(-n // max(1, cfg.batch_size))
    sampler = FastSampler(pipe, compile=_resolve_compile(cfg, device, unet_calls=batches * p.steps))
    sampler.static_batch = min(cfg.batch_size, n)
    meta = dict(model=cfg.model, family=family, loras=lora_meta, fused=cfg.fuse, scheduler=cfg.scheduler,
                sampler=SAMPLER_NAMES[cfg.scheduler], steps=p.steps, guidance=p.guidance,
                gamma=cfg.gamma if cfg.scheduler == "tcd" else None, width=width, height=height,
                device=device, dtype=str(pipe.unet.dtype).replace("torch.", ""),
                scheduler_config=sched_cfg, version=__version__)
    return dict(pipe=pipe, sampler=sampler, height=height, width=width, load_ms=load_ms, meta=meta)


def _progress(enabled: bool):
    """rich's progress bar on stderr, shown only when asked and stderr is a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("sampling"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True, disable=not (enabled and sys.stderr.isatty()))
