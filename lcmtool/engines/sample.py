"""The sample engine: `sample(cfg)` makes PNGs, `compare(cfg)` makes a schedulers x steps grid.

Flow: validate every input (prompts, steps, LoRA files) -> load the pipeline -> pin the scheduler ->
fuse the LoRAs -> diffusers' own pipeline call per batch, with per-image device generators so an image
depends on its seed, not on its batch -> PNG + metadata, written atomically.
The denoising loop is diffusers' with the no-sync schedulers of `schedulers.py`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lcmtool import __version__
from lcmtool.errors import LcmError
from lcmtool.models.load import resolve_model
from lcmtool.models.schedulers import (
    DEFAULT_GUIDANCE,
    LCM_ORIGINAL_STEPS,
    SAMPLER_NAMES,
    SCHEDULERS,
    make_scheduler,
    pinned_config,
)
from lcmtool.options import CompareConfig, SampleConfig  # every option is declared once, in lcmtool/options.py

# Before torch loads OpenMP: idle threads sleep instead of spinning. On a shared 2-core CPU, spinning made the
# demo UNet ~100x slower (4 s instead of 20-30 ms per call).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

@dataclass
class Job:
    prompt: str
    negative_prompt: str
    seed: int


_warned: set[str] = set()


def warn(msg: str) -> None:
    """A warning on stderr, once per message."""
    if msg in _warned:
        return
    _warned.add(msg)
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold yellow]warning:[/] {msg}")


# ---- input validation (all of it before any model loads or any file is written) ----

def read_prompts(prompt: str | None, prompts: str | None, negative: str, seed: int, num_images: int) -> list[Job]:
    if prompt is not None and prompts is not None:
        raise LcmError("give --prompt or --prompts, not both")
    if num_images < 1:
        raise LcmError(f"--num-images must be >= 1, got {num_images}")
    entries: list[tuple[str, str, int]] = []
    if prompt is not None:
        if not prompt.strip():
            raise LcmError("--prompt is empty")
        entries.append((prompt, negative, seed))
    elif prompts is not None:
        if prompts == "-":
            text, where = sys.stdin.read(), "stdin"
        else:
            p = Path(prompts)
            if not p.is_file():
                raise LcmError(f"prompts file not found: {prompts}")
            try:
                text, where = p.read_text(encoding="utf-8"), prompts
            except UnicodeDecodeError:
                raise LcmError(f"prompts file {prompts} is not UTF-8 text") from None
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LcmError(f"{where} line {n}: bad JSON ({e.msg})") from None
                if not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
                    raise LcmError(f"{where} line {n}: JSON line needs a non-empty \"prompt\"")
                s = rec.get("seed", seed)
                if isinstance(s, bool) or not isinstance(s, int):
                    raise LcmError(f"{where} line {n}: \"seed\" must be an integer")
                neg = rec.get("negative_prompt", rec.get("negative"))  # null: the default, not "None"
                entries.append((rec["prompt"], negative if neg is None else str(neg), s))
            else:
                entries.append((line, negative, seed))
        if not entries:
            raise LcmError(f"prompts file {where} has no prompts")
    else:
        raise LcmError("no prompt: give --prompt TEXT or --prompts FILE")
    jobs = [Job(p, neg, s + k) for p, neg, s in entries for k in range(num_images)]
    bad = next((j.seed for j in jobs if not -2 ** 63 <= j.seed < 2 ** 64), None)
    if bad is not None:  # torch.Generator.manual_seed takes a 64-bit seed
        raise LcmError(f"seed {bad} is out of range (a 64-bit integer)")
    return jobs


def parse_loras(specs: list[str]) -> list[tuple[str, float]] | None:
    """['a.safetensors:0.8', 'b.safetensors'] -> [(path, weight)]; [] -> None (use the default); 'none' -> []."""
    if not specs:
        return None
    if any(s.strip().lower() == "none" for s in specs):
        if len(specs) > 1:
            raise LcmError("--lora none turns LoRAs off; it cannot be combined with other --lora values")
        return []
    out = []
    for s in specs:
        path, weight = s, 1.0
        head, sep, tail = s.rpartition(":")
        if sep and head and not Path(s).exists():
            try:
                path, weight = head, float(tail)
            except ValueError:
                pass
        if not Path(path).is_file():
            raise LcmError(f"LoRA file not found: {path}")
        out.append((path, weight))
    return out


def default_loras(model: str, scheduler: str) -> list[tuple[str, float]]:
    """A model that ships an LCM-LoRA (the demo models) gets it for lcm/tcd (issue 6); elsewhere nothing."""
    ref = resolve_model(model)
    if scheduler not in ("lcm", "tcd") or not ref.lcm_lora:
        return []
    if not Path(ref.lcm_lora).is_file():
        raise LcmError(f"the LCM-LoRA shipped for {model} is not built at {ref.lcm_lora} (run `make demo-models`), "
                       "or pass --lora none to sample the plain teacher")
    return [(ref.lcm_lora, 1.0)]


def check_steps(scheduler: str, steps: int, timesteps: list[int] | None) -> int:
    if timesteps:
        if scheduler not in ("lcm", "tcd"):
            raise LcmError("--timesteps is for the lcm and tcd schedulers")
        decreasing = all(a > b for a, b in zip(timesteps, timesteps[1:], strict=False))
        if not decreasing or any(t < 0 or t > 999 for t in timesteps):
            raise LcmError(f"--timesteps must be strictly decreasing values in 0..999, got {timesteps}")
        return len(timesteps)
    if steps < 1:
        raise LcmError(f"--steps must be >= 1, got {steps}")
    if steps > 1000:
        raise LcmError(f"--steps must be <= 1000, got {steps}")
    return steps


def check_guidance(scheduler: str, guidance: float | None, negatives: bool, steps: int) -> float:
    g = DEFAULT_GUIDANCE[scheduler] if guidance is None else float(guidance)
    if g < 0:
        raise LcmError(f"--guidance must be >= 0, got {g}")
    if scheduler in ("lcm", "tcd") and g > 2:
        warn(f"guidance {g} > 2 with {scheduler.upper()} over-saturates images; LCM-LoRA is distilled for 1-2")
    if negatives and g <= 1:
        warn("the negative prompt has no effect at guidance <= 1 (one UNet pass per step, no CFG)")
    if scheduler in ("lcm", "tcd") and steps > LCM_ORIGINAL_STEPS:
        warn(f"{steps} LCM steps exceed the {LCM_ORIGINAL_STEPS} original solver steps the LoRA was distilled on; "
             "the schedule is stretched and quality will not improve")
    return g


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
    from lcmtool.lora.fuse import fuse_into_unet

    if files is None:
        files = check_loras(pipe, family, spec, loras)
    if fuse:
        fuse_into_unet(pipe.unet, files)
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


# ---- commands ----

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
    bar = _progress(progress, len(jobs))
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
        bar.advance(len(batch))
    bar.stop()
    write_resolved(cfg, out / "sample.yaml")
    return records


class _NoBar:
    def advance(self, n): ...
    def stop(self): ...


class _Bar:
    def __init__(self, total: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("sampling"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          console=Console(stderr=True), transient=True)
        self.task = self.p.add_task("sample", total=total)
        self.p.start()

    def advance(self, n):
        self.p.advance(self.task, n)

    def stop(self):
        self.p.stop()


def _progress(enabled: bool, total: int):
    return _Bar(total) if enabled and sys.stderr.isatty() else _NoBar()


def parse_run(spec: str) -> tuple[str, int, float | None]:
    """'lcm:4' or 'dpmpp:25:7.5' -> (scheduler, steps, guidance or None)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] not in SCHEDULERS:
        raise LcmError(f"bad run {spec!r}: expected scheduler:steps[:guidance] with scheduler one of "
                       f"{', '.join(SCHEDULERS)}")
    try:
        steps = int(parts[1])
        g = float(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise LcmError(f"bad run {spec!r}: steps must be an integer and guidance a number") from None
    check_steps(parts[0], steps, None)
    return parts[0], steps, g


def compare(cfg: CompareConfig) -> dict:
    """`lcmtool compare`: one grid, rows = prompt x seed, columns = scheduler:steps, each with its ms/image."""
    from lcmtool.config import write_resolved
    from lcmtool.outputs.png import grid, save_png

    jobs = read_prompts(cfg.prompt, cfg.prompts, cfg.negative_prompt, cfg.seed, cfg.num_images)
    resolve_model(cfg.model)
    if not cfg.runs:
        raise LcmError("compare needs at least one run (scheduler:steps)")
    runs = [parse_run(r) for r in cfg.runs]
    guid = [check_guidance(s, g, any(j.negative_prompt for j in jobs), n) for s, n, g in runs]
    explicit = parse_loras(cfg.lora)
    distilled = [s in ("lcm", "tcd") for s, _, _ in runs]
    loras = explicit if explicit is not None else (default_loras(cfg.model, "lcm") if any(distilled) else [])
    out = Path(cfg.out)
    if out.suffix.lower() != ".png":
        raise LcmError(f"--out for compare is the grid's PNG path, got {cfg.out}")

    pipe, family, device, _ = load(cfg.model, cfg.device, cfg.dtype, cfg.model_config, cfg.tokenizer)
    base_config = dict(pipe.scheduler.config)
    height, width = image_size(pipe, cfg.height, cfg.width)
    files = check_loras(pipe, family, cfg.model, loras) if loras else None  # fail on a bad LoRA before sampling
    # warm-up: first calls pay for allocation and kernel selection, which no column should be charged
    set_scheduler(pipe, base_config, "ddim", 1, cfg.timestep_spacing)
    generate(pipe, jobs[:1], "ddim", 1, 1.0, height, width, device)

    # the teacher's columns first, then fuse the LoRA once for the distilled ones
    order = sorted(range(len(runs)), key=lambda i: distilled[i])
    cells: dict[int, list] = {}
    timings: dict[int, float] = {}
    lora_meta: list[dict] = []
    fused = False
    for i in order:
        name, steps, _ = runs[i]
        if distilled[i] and loras and not fused:
            lora_meta = apply_loras(pipe, family, cfg.model, loras, fuse=True, files=files)
            fused = True
        set_scheduler(pipe, base_config, name, steps, cfg.timestep_spacing)
        images, ms = generate(pipe, jobs, name, steps, guid[i], height, width, device, gamma=cfg.gamma)
        cells[i], timings[i] = images, ms / len(jobs)
    col_labels = [f"{SAMPLER_NAMES[s]} {n} step{'s' * (n > 1)}, {timings[i]:.0f} ms/img"
                  for i, (s, n, _) in enumerate(runs)]
    rows = [[cells[i][r] for i in range(len(runs))] for r in range(len(jobs))]
    row_labels = [f"{j.prompt} (seed {j.seed})" for j in jobs]
    cell_labels = [[f"{SAMPLER_NAMES[s]} {n}, w={guid[i]:g}" for i, (s, n, _) in enumerate(runs)] for _ in jobs]
    img = grid(rows, col_labels, row_labels, cell_labels)
    result = {"path": str(out), "model": cfg.model, "device": device, "width": width, "height": height,
              "runs": [{"scheduler": s, "steps": n, "guidance": guid[i], "lora": bool(distilled[i] and loras),
                        "ms_per_image": round(timings[i], 2)} for i, (s, n, _) in enumerate(runs)],
              "loras": lora_meta, "rows": [dataclasses.asdict(j) for j in jobs], "version": __version__}
    save_png(img, out, result, a1111=False)
    write_resolved(cfg, out.with_suffix(".yaml"))
    return result

