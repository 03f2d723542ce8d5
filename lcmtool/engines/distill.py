"""LoRA latent consistency distillation: one flat accelerate loop (LCM-LoRA arXiv 2311.05556, Algorithm 1).

Reads top to bottom like nanoGPT's train.py: `setup` (machine, data listing, teacher, latent cache, LoRA
student, optimizer), `resume`, then per step `train_step` (grad_accum micro-batches of Algorithm 1),
`log_step` and `after_step` (checkpoint, validation, stop requests), and `finish` (tau_LCM file, grid, curve).
The student, its LCD pass and the LoRA export are lcmtool.distill.student; checkpoints and stop requests
lcmtool.distill.checkpoint; validation images lcmtool.distill.validate.
Runs on one device, or data-parallel with `accelerate launch -m lcmtool distill ...` / torchrun.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcmtool.distill import checkpoint as ckpt
from lcmtool.distill import lcd
from lcmtool.distill.checkpoint import StopRequest, TrainState
from lcmtool.distill.monitor import Meter, MetricsLog, loss_curve_png, make_progress, tensorboard_tracker
from lcmtool.errors import LcmError
from lcmtool.lora.formats import LCM_TARGETS  # the 14 LCM-LoRA module kinds, defined once
from lcmtool.options import DistillConfig  # every option is declared once, in lcmtool/options.py

LCM_LORA_TARGETS = list(LCM_TARGETS)


class NonFiniteLoss(LcmError):
    pass


@dataclass
class Run:
    """Everything the loop uses, made once by `setup`."""
    cfg: DistillConfig
    out: Path
    log: Any
    accelerator: Any
    tracker: str | None
    pipe: Any
    family: str
    dataset: Any
    cache_root: Path
    grid: lcd.SkippingGrid
    alphas_cumprod: Any
    prediction_type: str
    weight_dtype: Any
    unet: Any = None            # the student as accelerate prepared it (DDP-wrapped when data-parallel)
    raw_unet: Any = None        # the same module unwrapped
    params: list | None = None  # the trained tensors (the LoRA factors)
    ema: list | None = None     # their EMA copy (the target) when ema_decay > 0
    optimizer: Any = None
    lr_sched: Any = None
    metrics: MetricsLog | None = None  # metrics.jsonl and TensorBoard
    uncond: tuple = ()          # the unconditional embeddings (and SDXL pooled ones) in the compute dtype

    main = property(lambda self: self.accelerator.is_main_process)
    world = property(lambda self: self.accelerator.num_processes)
    samples_per_step = property(lambda self: self.cfg.batch_size * self.cfg.grad_accum * self.world)
    is_xl = property(lambda self: self.family in ("sdxl", "ssd1b"))


# ------------------------------------------------------------------------------------------------ setup

def check_config(cfg: DistillConfig) -> Path:
    if not cfg.model:
        raise LcmError("distill needs a teacher: --model demo:sd | a diffusers folder | a hub id")
    if cfg.w_min > cfg.w_max or cfg.w_min < 0:
        raise LcmError(f"need 0 <= w_min <= w_max, got w_min={cfg.w_min} w_max={cfg.w_max}")
    if cfg.max_steps < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.lora_rank < 1:
        raise LcmError("max_steps, batch_size, grad_accum and lora_rank must be >= 1")
    return Path(cfg.out or Path("runs") / cfg.name)


def make_accelerator(cfg: DistillConfig, out: Path):
    """accelerate does mixed precision, gradient accumulation and DDP; -> (accelerator, tracker, mixed precision)."""
    import torch
    from accelerate import Accelerator

    use_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if not use_cpu and not torch.cuda.is_available():
        raise LcmError(f"device {cfg.device} requested but CUDA is not available")
    if cfg.device.startswith("cuda:") and "LOCAL_RANK" not in os.environ:
        torch.cuda.set_device(int(cfg.device.split(":")[1]))
    mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("no" if use_cpu else "bf16")
    tracker = tensorboard_tracker(cfg.report_to)
    accelerator = Accelerator(mixed_precision=mp, gradient_accumulation_steps=cfg.grad_accum, cpu=use_cpu,
                              log_with=tracker, project_dir=str(out) if tracker else None)
    return accelerator, tracker, mp


def add_student(run: Run) -> None:
    """Teacher UNet + LoRA on the 14 LCM-LoRA module kinds (base frozen in the compute dtype), AdamW, warm-up."""
    from lcmtool.distill import student

    cfg = run.cfg
    unet = run.pipe.unet
    unet.requires_grad_(False)
    unet.to(run.accelerator.device, run.weight_dtype)
    conv_alpha = cfg.conv_alpha or cfg.conv_rank * cfg.lora_alpha / cfg.lora_rank
    ranks, alphas = student.conv_patterns(unet, cfg.conv_rank, conv_alpha)
    try:
        params = student.add_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.target_modules, ranks, alphas)
    except ValueError as e:  # peft's NoMatchingPeftModuleError
        raise LcmError(f"config key 'target_modules': {str(e).splitlines()[0]}") from None
    if not params:
        raise LcmError(f"no module of the UNet matches target_modules {cfg.target_modules}")
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    run.params = params
    run.ema = [p.detach().clone() for p in params] if cfg.ema_decay > 0 else []
    optimizer, run.lr_sched = student.make_optimizer(params, cfg)
    run.unet, run.optimizer = run.accelerator.prepare(unet, optimizer)
    run.raw_unet = run.accelerator.unwrap_model(run.unet)


def setup(cfg: DistillConfig, out: Path, log) -> Run:
    """Machine -> data listing -> teacher -> run folder -> noise schedule -> latent cache -> student."""
    import torch
    from accelerate.utils import set_seed

    from lcmtool.config import to_dict, write_resolved
    from lcmtool.distill import data as D
    from lcmtool.distill.teacher import load_teacher, noise_schedule

    accelerator, tracker, mp = make_accelerator(cfg, out)
    set_seed(cfg.seed)
    source = D.open_source(cfg.data, cfg.num_samples, cfg.seed)  # an empty data set is an error before any load
    pipe, family, model_id = load_teacher(cfg.model)
    if cfg.family != "auto" and not (cfg.family == family or {cfg.family, family} == {"sdxl", "ssd1b"}):
        raise LcmError(f"this config is for the {cfg.family} family but {cfg.model} is {family}")
    if accelerator.is_main_process:  # the run folder appears only once its inputs have been checked
        out.mkdir(parents=True, exist_ok=True)
        write_resolved(cfg, out / "config.yaml")
        ckpt.clean_stale(out / "checkpoints")
    if tracker:  # TensorBoard run <out>/tensorboard, with the config's scalars as its hyper-parameters
        accelerator.init_trackers("tensorboard", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                         for k, v in to_dict(cfg).items()})
    prediction_type, alphas_cumprod, grid = noise_schedule(pipe, cfg.num_ddim_timesteps)
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    resolution = cfg.resolution or pipe.unet.config.sample_size * vae_factor
    is_xl = family in ("sdxl", "ssd1b")
    uncond = cfg.uncond if cfg.uncond != "auto" else ("zeros" if is_xl else "empty")
    root = D.cache_root(cfg.cache_dir) / D.cache_key(model_id, source, resolution, cfg.center_crop, cfg.seed, uncond)
    if accelerator.is_main_process:  # the main process builds the cache, the others wait and read it
        D.prepare_cache(pipe, family, source, root, resolution, cfg.center_crop, cfg.seed, uncond,
                        accelerator.device, log)
    accelerator.wait_for_everyone()
    dataset = D.LatentCache(root, cfg.seed, device=accelerator.device if D.fits_in_memory(source, pipe, resolution)
                            else "cpu")
    if dataset.meta["skipped"] and accelerator.is_main_process:
        log(f"[yellow]skipped {dataset.meta['skipped']} unreadable image(s)[/]")
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, torch.float32)
    run = Run(cfg, out, log, accelerator, tracker, pipe, family, dataset, root, grid, alphas_cumprod,
              prediction_type, weight_dtype)
    text = dataset.text  # the unconditional embeddings are the same every step: in the compute dtype once
    run.uncond = (text["uncond_embeds"].to(accelerator.device, weight_dtype),
                  text["uncond_pooled"].to(accelerator.device, weight_dtype) if is_xl else None)
    add_student(run)
    return run


def resume(run: Run) -> TrainState:
    """A fresh state, or the one of `cfg.resume`: tensors, optimizer, schedule, step; metrics.jsonl cut to it."""
    import torch

    from lcmtool.config import to_dict

    state = TrainState()
    if not run.cfg.resume:
        return state
    ck = ckpt.find_checkpoint(run.out, run.cfg.resume)
    saved, blob = ckpt.load(ck, to_dict(run.cfg), run.world)
    with torch.no_grad():
        for p, v in zip(run.params, blob["lora"], strict=False):
            p.copy_(v)
        for e, v in zip(run.ema, blob.get("ema", []), strict=False):
            e.copy_(v)
    run.optimizer.load_state_dict(blob["optimizer"])
    run.lr_sched.load_state_dict(blob["lr_scheduler"])
    state.step = state.start_step = saved["step"]
    records = ckpt.trim_metrics(run.out / "metrics.jsonl", state.step) if run.main else []
    state.losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    run.log(f"resumed from {ck} at step {state.step}")
    return state


# ------------------------------------------------------------------------------------------------ one step

def micro_batch(run: Run, step: int, micro: int) -> dict:
    """Algorithm 1 lines 3-4 for one micro-batch: the data at this stream position (deterministic: a resumed run
    sees the same samples), n, w and the noise from a generator of (seed, step, micro, rank), z noised to t_{n+k}."""
    import torch

    cfg, acc, device, dt = run.cfg, run.accelerator, run.accelerator.device, run.weight_dtype
    position = ((step * cfg.grad_accum + micro) * run.world + acc.process_index) * cfg.batch_size
    batch = run.dataset.batch(position, cfg.batch_size)
    g = torch.Generator().manual_seed(hash((cfg.seed, step, micro, acc.process_index)) % 2 ** 62)
    latents = batch["latents"].to(device, torch.float32)
    cond = batch["prompt_embeds"].to(device, dt)
    index, t_start, t_prev, w, noise = (x.to(device) for x in lcd.draw(g, run.grid, latents.shape, cfg.w_min,
                                                                         cfg.w_max))
    out = dict(z_t=lcd.add_noise(latents, noise, t_start, run.alphas_cumprod), t_start=t_start, t_prev=t_prev,
               index=index, w=w, cond=cond, uncond=run.uncond[0].expand_as(cond), added=None, added_uncond=None)
    if run.is_xl:
        pooled, time_ids = batch["pooled_embeds"].to(device, dt), batch["geometry"].to(device, dt)
        out["added"] = {"text_embeds": pooled, "time_ids": time_ids}
        out["added_uncond"] = {"text_embeds": run.uncond[1].expand_as(pooled), "time_ids": time_ids}
    return out


def train_step(run: Run, state: TrainState, stop: StopRequest) -> list[float]:
    """One optimizer step of grad_accum micro-batches; -> their losses (all-reduced means). The update and the
    step counter's increment happen inside stop.deferred(): a signal there waits for the step boundary."""
    import torch

    from lcmtool.distill.student import lcd_pred_target

    cfg, acc = run.cfg, run.accelerator
    lvals = []
    for micro in range(cfg.grad_accum):
        b = micro_batch(run, state.step, micro)
        with acc.accumulate(run.unet):
            # Algorithm 1 lines 5-7: student at t_{n+k}; teacher (LoRA off) guided DDIM step to t_n; target at t_n
            pred, target = lcd_pred_target(run.unet, run.raw_unet, grid=run.grid, alphas_cumprod=run.alphas_cumprod,
                                           prediction_type=run.prediction_type, autocast=acc.autocast,
                                           timestep_scaling=cfg.timestep_scaling, lora_params=run.params,
                                           ema=run.ema, **b)
            loss = lcd.distance(pred, target, cfg.loss, cfg.huber_c)
            # one all-reduce carries the loss and the ranks' stop requests (no extra collective)
            lval, votes = acc.reduce(torch.stack([loss.detach().float(),
                                                  loss.new_tensor(stop.requested, dtype=torch.float32)]),
                                     "mean").tolist()
            stop.any_rank = votes > 0
            if not math.isfinite(lval):
                raise NonFiniteLoss(f"non-finite loss ({lval}) at step {state.step + 1}; stopped, last good "
                                    f"checkpoint: {state.last_good or 'none'}")
            acc.backward(loss)
        lvals.append(lval)
    with stop.deferred():  # optimizer step, schedule, EMA and counter: all or nothing w.r.t. signals
        if acc.sync_gradients and cfg.max_grad_norm > 0:
            acc.clip_grad_norm_(run.params, cfg.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.lr_sched.step()
        if run.ema:
            with torch.no_grad():
                torch._foreach_lerp_(run.ema, [p.detach() for p in run.params], 1 - cfg.ema_decay)
        state.step += 1
    return lvals


# ------------------------------------------------------------------------------------------------ logging, checkpoints

def log_step(run: Run, state: TrainState, meter: Meter, progress, task) -> None:
    """Every log_every steps: metrics.jsonl, TensorBoard, the progress bar (or a line when there is none)."""
    cfg, step = run.cfg, state.step
    if step % cfg.log_every and step != cfg.max_steps:
        return
    mean, n, seconds = meter.take()
    sps = run.samples_per_step * (n / cfg.grad_accum) / seconds
    elapsed = time.time() - meter.t0
    lr = run.lr_sched.get_last_lr()[0]
    state.losses.append((step, mean))
    run.metrics.write({"step": step, "loss": mean, "lr": lr, "samples_per_s": sps,
                       "samples_seen": step * run.samples_per_step, "elapsed_s": elapsed},
                      {"loss": mean, "lr": lr, "samples_per_s": sps})
    progress.update(task, completed=step, loss=f"{mean:.4g}", sps=f"{sps:.0f}")
    if run.main and progress.disable and (step % (cfg.log_every * 5) == 0 or step == cfg.max_steps):
        run.log(f"step {step}/{cfg.max_steps} loss {mean:.4g} {sps:.0f} samples/s elapsed {elapsed:.0f}s")


def save_checkpoint(run: Run, state: TrainState, reason: str, name: str | None = None) -> Path | None:
    """Checkpoint `name` (default step-NNNNNNN) of the current step; step-* beyond keep_checkpoints are removed."""
    from lcmtool.config import to_dict

    run.accelerator.wait_for_everyone()
    if not run.main:
        return None
    blob = {"lora": [p.detach().cpu() for p in run.params], "ema": [e.cpu() for e in run.ema],
            "optimizer": run.optimizer.state_dict(), "lr_scheduler": run.lr_sched.state_dict()}
    meta = {"step": state.step, "samples_seen": state.step * run.samples_per_step, "world_size": run.world,
            "reason": reason, "config": to_dict(run.cfg)}
    keep = 0 if name else max(1, run.cfg.keep_checkpoints)
    return ckpt.save(run.out / "checkpoints", name or f"step-{state.step:07d}", blob, meta, keep)


def validate(run: Run, path: Path) -> None:
    """The validation grid (main process): LCM at validation_steps, sampled as `lcmtool sample` samples."""
    from lcmtool.distill.validate import validation_grid

    cfg = run.cfg
    validation_grid(run.pipe, run.raw_unet, cfg.validation_prompts, cfg.validation_steps, cfg.validation_seed, path,
                    run.accelerator.device, run.accelerator.autocast, cfg.timestep_scaling)


def after_step(run: Run, state: TrainState, stop: StopRequest) -> None:
    """Periodic checkpoint and validation; Ctrl-C / SIGTERM: every rank stops after the same step (the request is
    all-reduced), so the checkpoint's collectives line up; a killed run resumes from it with --resume latest."""
    cfg, step = run.cfg, state.step
    if step >= cfg.max_steps:
        return
    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
        state.last_good = save_checkpoint(run, state, "periodic") or state.last_good
    if cfg.validate_every and step % cfg.validate_every == 0 and run.main:
        validate(run, run.out / "validation" / f"step-{step:07d}.png")
    if stop.requested if run.world == 1 else stop.any_rank:
        stop.written = True
        where = save_checkpoint(run, state, "interrupted")
        if run.main:
            run.log(f"interrupted at step {step}: checkpoint {where} (continue with --resume latest)")
        raise KeyboardInterrupt


# ------------------------------------------------------------------------------------------------ the run

def distill(cfg: DistillConfig, log=None) -> dict:
    """Run LCD with a LoRA student; returns a summary dict (paths, steps, final loss, samples/s). A run that
    fails before its first checkpoint leaves no run folder it created (no lone config.yaml or tensorboard/)."""
    from lcmtool.fileio import fresh_folder

    out = check_config(cfg)
    with fresh_folder(out, keep=lambda p: any(ckpt.is_checkpoint(c) for c in (p / "checkpoints").glob("*"))):
        return _distill(cfg, out, log)


def _distill(cfg: DistillConfig, out: Path, log=None) -> dict:
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    log = log or (lambda msg: console.print(msg))
    run = setup(cfg, out, log)
    state = resume(run)
    run.metrics = MetricsLog(out / "metrics.jsonl", run.accelerator, run.tracker, append=bool(cfg.resume))
    progress, task = make_progress(cfg.max_steps, state.step, run.main)
    run.unet.train()
    meter, stop = Meter(), StopRequest(single_process=run.world == 1)
    try:
        stop.install()
        with progress:
            while state.step < cfg.max_steps:
                meter.add(train_step(run, state, stop))
                log_step(run, state, meter, progress, task)
                after_step(run, state, stop)
    except BaseException as exc:
        # an interrupt raised mid-step (second Ctrl-C, or a test): one process can still write its checkpoint;
        # several cannot safely (the others may be inside a collective), so they leave with the last periodic one
        if isinstance(exc, KeyboardInterrupt) and state.step > state.start_step and not stop.written \
                and run.world == 1:
            where = save_checkpoint(run, state, "interrupted")
            log(f"interrupted at step {state.step}: checkpoint {where} (continue with --resume latest)")
        if run.tracker:
            run.accelerator.end_training()  # flush the TensorBoard events logged so far
        raise
    finally:
        stop.restore()
        run.metrics.close()
    return finish(run, state, time.time() - meter.t0)


def finish(run: Run, state: TrainState, elapsed: float) -> dict:
    """A final checkpoint, tau_LCM, the validation grid, the loss curve and summary.json."""
    import torch

    from lcmtool import __version__
    from lcmtool.config import to_dict
    from lcmtool.distill.student import save_tau_lcm
    from lcmtool.fileio import atomic_write_json

    cfg, out, acc = run.cfg, run.out, run.accelerator
    last = save_checkpoint(run, state, "final")
    # data-parallel ranks must hold identical LoRA weights: one checksum per rank, gathered into the summary
    flat = torch.cat([p.detach().double().flatten() for p in run.params])
    probe = torch.cos(torch.arange(flat.numel(), dtype=torch.float64, device=flat.device))
    rank_sums = acc.gather(torch.stack([flat.sum(), flat @ probe]).float().unsqueeze(0)).cpu().tolist()
    summary = {"out": str(out), "steps": state.step, "family": run.family,
               "samples_per_s": (state.step - state.start_step) * run.samples_per_step / max(elapsed, 1e-9),
               "final_loss": state.losses[-1][1] if state.losses else None,
               "skipped_images": run.dataset.meta["skipped"], "samples_cached": len(run.dataset),
               "world_size": run.world, "rank_checksums": rank_sums, "cache": str(run.cache_root)}
    if run.main:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.save_dtype]
        lora_path = out / "lcm-lora.safetensors"
        fmt = save_tau_lcm(run.raw_unet, lora_path, cfg.format, run.family, dtype, {
            "lcmtool_version": __version__, "lcmtool_kind": "tau_lcm", "base_model": cfg.model,
            "family": run.family, "steps": str(state.step), "rank": str(cfg.lora_rank),
            "alpha": str(cfg.lora_alpha), "config": to_dict(cfg)})
        validate(run, out / "validation.png")
        loss_curve_png(state.losses, out / "loss.png", f"LCD loss ({cfg.model}, {state.step} steps)")
        summary.update({"lora": str(lora_path), "format": fmt, "lora_bytes": lora_path.stat().st_size,
                        "checkpoint": str(last), "validation": str(out / "validation.png"),
                        "loss_curve": str(out / "loss.png")})
        atomic_write_json(out / "summary.json", summary)
    acc.wait_for_everyone()
    acc.end_training()
    return summary
