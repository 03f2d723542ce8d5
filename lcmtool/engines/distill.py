"""LoRA latent consistency distillation: one flat accelerate loop (LCM-LoRA arXiv 2311.05556, Algorithm 1).

Reads top to bottom like nanoGPT's train.py: `setup` (machine, data listing, teacher, latent cache, student,
optimizer; shared with finetune: engines/training.py), `resume`, then per step `train_step` (grad_accum
micro-batches of Algorithm 1), `log_step` and `after_step` (checkpoint, validation, the held-out hook of
engines/distill_eval.py, stop requests), and `finish` (tau_LCM file or unet/, grid, curve, summary).
The student is a LoRA on the frozen teacher UNet (lora_rank > 0, optionally started from `init_lora`) or the whole
UNet against a frozen copy (lora_rank 0, full LCD; it starts from teacher + init_lora's delta when one is given);
its LCD pass and export are lcmtool.distill.student,
checkpoints and stop requests lcmtool.distill.checkpoint, validation images lcmtool.distill.validate.
Runs on one device, or data-parallel with `accelerate launch -m lcmtool distill ...` / torchrun.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcmtool.distill import checkpoint as ckpt
from lcmtool.distill import lcd
from lcmtool.distill.checkpoint import StopRequest, TrainState
from lcmtool.distill.monitor import loss_curve_png
from lcmtool.engines import distill_eval
from lcmtool.engines.training import latent_data, open_run, run_loop
from lcmtool.errors import LcmError, to_stderr
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
    params: list | None = None  # the trained tensors (the LoRA factors, or every UNet weight)
    ema: list | None = None     # their EMA copy (the target) when ema_decay > 0
    optimizer: Any = None
    lr_sched: Any = None
    metrics: Any = None         # metrics.jsonl, open for appending (main process)
    uncond: tuple = ()          # the unconditional embeddings (and SDXL pooled ones) in the compute dtype
    teacher: Any = None         # full LCD: the frozen teacher copy (else the student with its LoRA off)
    evaluator: Any = None       # the held-out hook's prompts and scorer (eval_every > 0)

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
    if cfg.max_steps < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.lora_rank < 0:
        raise LcmError("max_steps, batch_size and grad_accum must be >= 1, lora_rank >= 0")
    extract = cfg.extract_conv_rank or cfg.extract_fro or cfg.extract_budget_mb or cfg.extract_calibrate
    if (cfg.extract_rank or extract) and cfg.lora_rank:
        raise LcmError("extract_rank, extract_conv_rank, extract_fro, extract_budget_mb and extract_calibrate are for "
                       "full LCD (lora_rank 0): a LoRA run writes its LoRA itself")
    if extract and not cfg.extract_rank:
        raise LcmError("extract_conv_rank, extract_fro, extract_budget_mb and extract_calibrate need extract_rank "
                       "(the extract's largest rank)")
    if cfg.extract_fro and cfg.extract_budget_mb:
        raise LcmError("extract_fro and extract_budget_mb both set the extract's ranks: give one of them")
    if 0 < cfg.teacher_data < 1:
        raise LcmError(f"teacher_data is the teacher samples' CFG scale (1: the conditional teacher alone; 1 + w "
                       f"matches the distilled guidance), got {cfg.teacher_data:g}")
    if cfg.teacher_samples and not cfg.teacher_data:
        raise LcmError("teacher_samples needs teacher_data (the CFG scale the teacher samples are drawn at)")
    if cfg.init_lora and not Path(cfg.init_lora).expanduser().is_file():
        raise LcmError(f"--init-lora {cfg.init_lora}: file not found")
    if cfg.eval_prompts:
        distill_eval.read_prompts(cfg.eval_prompts)
    distill_eval.check_scale_search(cfg)
    return Path(cfg.out or Path("runs") / cfg.name)


def add_student(run: Run) -> None:
    """The trained weights: a LoRA on the 14 LCM-LoRA module kinds of the teacher UNet (frozen in the compute
    dtype), one read from init_lora, or the whole UNet (lora_rank 0, started from teacher + init_lora's delta when
    given) with a frozen teacher copy; AdamW, schedule."""
    from lcmtool.distill import student

    cfg, unet = run.cfg, run.pipe.unet
    unet.requires_grad_(False)
    unet.to(run.accelerator.device, run.weight_dtype)
    if not cfg.lora_rank:
        params, run.teacher = student.add_full(unet, run.weight_dtype)
        check_budget(run, unet)
        if cfg.init_lora:  # full LCD from a LoRA: the student starts at teacher + its delta, the teacher stays
            fuse_init_lora(run, unet)
    elif cfg.init_lora:
        params = add_init_lora(run, unet)
    else:
        conv_alpha = cfg.conv_alpha or cfg.conv_rank * cfg.lora_alpha / cfg.lora_rank
        ranks, alphas = student.conv_patterns(unet, cfg.conv_rank, conv_alpha, cfg.target_modules)
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


def read_init_lora(run: Run, unet):
    """cfg.init_lora read and checked to fit the teacher `unet` (LcmError: one line naming the file)."""
    from lcmtool.engines.sample import check_fit
    from lcmtool.lora.io import load_lora

    lf = load_lora(run.cfg.init_lora, family=run.family)
    check_fit(unet, [(lf, 1.0)], run.cfg.model)
    run.log(f"init_lora: {len(lf.modules)} modules from {run.cfg.init_lora}")
    return lf


def fuse_init_lora(run: Run, unet) -> None:
    """Full LCD from a LoRA: its delta fused into the trainable `unet` (the frozen teacher copy is made first)."""
    from lcmtool.lora.fuse import fuse_into_unet

    fuse_into_unet(unet, [(read_init_lora(run, unet), 1.0)])


def add_init_lora(run: Run, unet) -> list:
    """The LoRA of cfg.init_lora (checked to fit the teacher) on `unet`, exactly: step 0 is base + its delta."""
    from lcmtool.distill import student

    lf = read_init_lora(run, unet)
    try:
        return student.add_lora_from(unet, lf)
    except ValueError as e:
        raise LcmError(f"--init-lora {e}") from None


def setup(cfg: DistillConfig, out: Path, log) -> Run:
    """Machine -> data listing -> teacher -> run folder -> noise schedule -> latent cache -> student -> hook."""

    from lcmtool.distill.teacher import noise_schedule

    opened = open_run(cfg, out, cfg.family)
    prediction_type, alphas_cumprod, grid = noise_schedule(opened.pipe, cfg.num_ddim_timesteps)
    weight_dtype = opened.weight_dtype
    dataset, root, uncond = latent_data(cfg, opened, weight_dtype, log)
    run = Run(cfg, out, log, opened.accelerator, opened.tracker, opened.pipe, opened.family, dataset, root, grid,
              alphas_cumprod, prediction_type, weight_dtype, uncond=uncond)
    add_student(run)
    if cfg.eval_every:
        run.evaluator = distill_eval.Evaluator(cfg, str(opened.accelerator.device))
    return run


def resume(run: Run) -> TrainState:
    """A fresh state, or the one of `cfg.resume`: tensors, optimizer, schedule, step; metrics.jsonl cut to it."""
    from lcmtool.config import to_dict

    state = TrainState()
    if not run.cfg.resume:
        return state
    ck = ckpt.find_checkpoint(run.out, run.cfg.resume)
    saved = ckpt.load_training(ck, to_dict(run.cfg), run.world, run.params, run.ema, run.optimizer, run.lr_sched)
    state.step = state.start_step = saved["step"]
    records = ckpt.trim_metrics(run.out / "metrics.jsonl", state.step) if run.main else []
    state.losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    distill_eval.restore(run, state, records)
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
                                           ema=run.ema, teacher=run.teacher, **b)
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

def save_checkpoint(run: Run, state: TrainState, reason: str, name: str | None = None,
                    extra: dict | None = None) -> Path | None:
    """Checkpoint `name` (default step-NNNNNNN) of the current step (`extra` goes into trainer_state.json);
    step-* beyond keep_checkpoints are removed."""
    from lcmtool.config import to_dict

    run.accelerator.wait_for_everyone()
    if not run.main:
        return None
    meta = {"step": state.step, "samples_seen": state.step * run.samples_per_step, "world_size": run.world,
            "reason": reason, "config": to_dict(run.cfg), **(extra or {})}
    return ckpt.save_training(run.out / "checkpoints", name or f"step-{state.step:07d}", run.params, run.ema,
                              run.optimizer, run.lr_sched, meta, 0 if name else max(1, run.cfg.keep_checkpoints),
                              state.last_good)


def validate(run: Run, path: Path, unet=None) -> None:
    """The validation grid (main process): LCM at validation_steps, sampled as `lcmtool sample` samples, of the
    student (or `unet`)."""
    from lcmtool.distill.validate import validation_grid

    cfg = run.cfg
    validation_grid(run.pipe, unet or run.raw_unet, cfg.validation_prompts, cfg.validation_steps, cfg.validation_seed,
                    path, run.accelerator.device, run.accelerator.autocast, cfg.timestep_scaling)


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
    if cfg.eval_every and step % cfg.eval_every == 0:
        distill_eval.evaluate(run, state, save_checkpoint, save_lora)
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
    log = log or to_stderr
    run = setup(cfg, out, log)
    return run_loop(run, resume(run), cfg, out, "distill", train_step, after_step, save_checkpoint, finish, log)


def save_lora(run: Run, state: TrainState, name: str = "lcm-lora-best.safetensors") -> Path | None:
    """tau_LCM as `name` in the run folder (main process): the LoRA, or in full LCD with extract_rank the UNet's
    change as an SVD LoRA; -> its path (None: full LCD without extract_rank)."""
    from lcmtool import __version__
    from lcmtool.config import to_dict
    from lcmtool.distill import student
    from lcmtool.models.load import torch_dtype

    cfg, modules = run.cfg, None
    from lcmtool.lora.metadata import portable_values

    meta = portable_values({
        "lcmtool_version": __version__, "lcmtool_kind": "tau_lcm", "base_model": cfg.model, "family": run.family,
        "steps": str(state.step), "rank": str(cfg.lora_rank), "alpha": str(cfg.lora_alpha), "config": to_dict(cfg)})
    if not cfg.lora_rank:
        if not cfg.extract_rank:
            return None
        moments = calibration_moments(run) if cfg.extract_calibrate else None
        modules, err = student.extract_lora(run.raw_unet, run.teacher, cfg.target_modules, cfg.extract_rank,
                                            cfg.extract_conv_rank, cfg.extract_fro, moments,
                                            budget_values(cfg))
        meta.update(rank=str(cfg.extract_rank), alpha=str(cfg.extract_rank), extract_rel_error=f"{err:.4g}")
    student.save_tau_lcm(run.raw_unet, run.out / name, cfg.format, run.family, torch_dtype(cfg.save_dtype), meta,
                         modules)
    return run.out / name


def value_bytes(cfg: DistillConfig) -> int:
    """Bytes per stored value of the LoRA file (save_dtype)."""
    from lcmtool.models.load import torch_dtype

    return torch_dtype(cfg.save_dtype).itemsize


def budget_values(cfg: DistillConfig) -> int:
    """extract_budget_mb as a count of stored values at save_dtype (0: no budget)."""
    return int(cfg.extract_budget_mb * 1e6) // value_bytes(cfg)


def check_budget(run: Run, unet) -> None:
    """Full LCD with extract_budget_mb: it must hold rank 1 on every extracted module (checked before training)."""
    from lcmtool.distill import student

    need = student.extract_values(unet, run.cfg.target_modules)
    if run.cfg.extract_budget_mb and need > budget_values(run.cfg):
        raise LcmError(f"extract_budget_mb {run.cfg.extract_budget_mb:g} is below the "
                       f"{need * value_bytes(run.cfg) / 1e6:.3g} MB that rank 1 on every extracted module takes")


def calibration_moments(run: Run) -> dict:
    """extract_calibrate's statistics: `extract_calibrate` training captions (a seeded draw) sampled by the trained
    UNet at LCM 2 / 4 / 8 steps, guidance 1 (as `lcmtool sample`), and the second moment of every extracted
    module's inputs over those passes (student.input_moments)."""
    import random

    from lcmtool.distill import student
    from lcmtool.distill.teacher import encoders_on
    from lcmtool.distill.validate import lcm_images, lcm_pipeline

    cfg, device = run.cfg, run.accelerator.device
    captions = list(run.dataset.meta["captions"])
    prompts = random.Random(cfg.seed).sample(captions, min(cfg.extract_calibrate, len(captions)))
    run.log(f"calibrating the extract on {len(prompts)} training captions x LCM {student.CALIBRATION_STEPS} steps")
    with encoders_on(run.pipe, device):
        vpipe = lcm_pipeline(run.pipe, run.raw_unet, cfg.timestep_scaling)

        def sample():
            for steps in student.CALIBRATION_STEPS:
                lcm_images(vpipe, prompts, steps, cfg.seed, run.accelerator.autocast, output_type="latent")

        return student.input_moments(run.raw_unet, cfg.target_modules, sample)


def finish(run: Run, state: TrainState, elapsed: float) -> dict:
    """A final checkpoint (and held-out score), tau_LCM (full LCD: unet/), the grid, loss.png and summary.json."""
    import torch

    from lcmtool.distill.student import save_unet
    from lcmtool.fileio import atomic_write_json
    from lcmtool.models.load import torch_dtype

    cfg, out, acc = run.cfg, run.out, run.accelerator
    last = save_checkpoint(run, state, "final")
    scores = distill_eval.evaluate(run, state, save_checkpoint, save_lora) if cfg.eval_every else {}
    # data-parallel ranks must hold identical weights: one checksum per rank, gathered into the summary
    flat = torch.cat([p.detach().double().flatten() for p in run.params])
    probe = torch.cos(torch.arange(flat.numel(), dtype=torch.float64, device=flat.device))
    rank_sums = acc.gather(torch.stack([flat.sum(), flat @ probe]).float().unsqueeze(0)).cpu().tolist()
    summary = {"out": str(out), "steps": state.step, "family": run.family, "full": not cfg.lora_rank,
               "samples_per_s": (state.step - state.start_step) * run.samples_per_step / max(elapsed, 1e-9),
               "final_loss": state.losses[-1][1] if state.losses else None,
               "skipped_images": run.dataset.meta["skipped"], "samples_cached": len(run.dataset),
               "world_size": run.world, "rank_checksums": rank_sums, "cache": str(run.cache_root), **scores}
    if run.main:
        lora_path = save_lora(run, state, "lcm-lora.safetensors")
        if cfg.scale_search and lora_path:
            scale, rows = distill_eval.scale_search(run, lora_path)
            distill_eval.write_scaled(lora_path, scale, rows, cfg.format, run.family, torch_dtype(cfg.save_dtype))
            run.metrics.write(json.dumps({"step": state.step, "scale_search": rows, "scale": scale}) + "\n")
            run.metrics.flush()
            summary.update(scale=scale, scale_search=rows)
            run.log(f"scale search: {cfg.scale_search} -> {scale:g} (written into {lora_path.name})")
            from lcmtool.lora.io import load_lora

            # the grid of the file as written (at its picked weight), not of the student
            with distill_eval.file_on_teacher(run, load_lora(lora_path, run.family), 1.0) as unet:
                validate(run, out / "validation.png", unet)
        else:
            validate(run, out / "validation.png")
        loss_curve_png(state.losses, out / "loss.png", f"LCD loss ({cfg.model}, {state.step} steps)", state.evals,
                       f"held-out FD-demo, LCM 4 steps ({distill_eval.SELECT})")
        if lora_path:
            summary.update({"lora": str(lora_path), "format": cfg.format, "lora_bytes": lora_path.stat().st_size})
        if state.best is not None:
            summary.update(best=str(out / "checkpoints" / "best"), best_score=state.best)
        if not cfg.lora_rank:  # last: the UNet is cast to save_dtype in place
            save_unet(run.raw_unet, out / "unet", torch_dtype(cfg.save_dtype))
            summary["unet"] = str(out / "unet")
        summary.update({"checkpoint": str(last), "validation": str(out / "validation.png"),
                        "loss_curve": str(out / "loss.png")})
        atomic_write_json(out / "summary.json", summary)
    acc.wait_for_everyone()
    acc.end_training()
    return summary
