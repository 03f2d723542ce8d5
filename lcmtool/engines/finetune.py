"""`lcmtool finetune`: a style LoRA (the style vector tau' of paper eq. 2-3) or, with --full, a fine-tuned variant
of the model, trained with the standard denoising loss (epsilon or v by the model's prediction type).

It shares distill's machinery: the data sources and latent cache (lcmtool.distill.data), the accelerate setup
(engines.training.make_accelerator), the teacher loader, checkpoints, resume and stop requests
(lcmtool.distill.checkpoint), the progress bar, metrics.jsonl, TensorBoard and loss.png (lcmtool.distill.monitor)
and the LoRA writer (lcmtool.distill.student). Outputs in --out: lora.safetensors (or pipeline/, a diffusers
folder, with --full), validation.png (DPM-Solver++ at CFG 7.5), loss.png, metrics.jsonl, config.yaml, summary.json.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcmtool.distill import checkpoint as ckpt
from lcmtool.distill.checkpoint import StopRequest, TrainState
from lcmtool.distill.monitor import loss_curve_png
from lcmtool.engines.training import run_loop
from lcmtool.errors import LcmError, to_stderr
from lcmtool.options import FinetuneConfig

VALIDATION_GUIDANCE = 7.5  # the paper's CFG for the style LoRA's own sampler (Fig. 3)


@dataclass
class Tune:
    """Everything the loop uses, made once by `setup`."""
    cfg: FinetuneConfig
    out: Path
    log: Any
    accelerator: Any
    tracker: str | None
    pipe: Any
    family: str
    dataset: Any
    cache_root: Path
    alphas_cumprod: Any
    prediction_type: str
    weight_dtype: Any
    uncond: tuple = ()
    unet: Any = None
    raw_unet: Any = None
    params: list | None = None
    optimizer: Any = None
    lr_sched: Any = None
    metrics: Any = None

    main = property(lambda self: self.accelerator.is_main_process)
    samples_per_step = property(lambda self: self.cfg.batch_size * self.cfg.grad_accum
                                * self.accelerator.num_processes)


def check_config(cfg: FinetuneConfig) -> Path:
    if not cfg.model:
        raise LcmError("finetune needs a model: --model demo:sd | a diffusers folder | a hub id")
    if cfg.full and cfg.format != "kohya":
        raise LcmError("--format is the LoRA file format; --full writes a diffusers pipeline folder")
    return Path(cfg.out or Path("runs") / cfg.name)


def lr_schedule(optimizer, cfg: FinetuneConfig):
    """diffusers.optimization's constant or cosine schedule after a linear warm-up, advanced by one step (as
    distill's: optimizer step 1 does not run at lr 0)."""
    import warnings

    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if cfg.lr_schedule == "constant" else "cosine"
    sched = get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sched.step()
    return sched


def add_trainable(run: Tune) -> None:
    """LoRA on the frozen UNet (base in the compute dtype, factors in fp32), or every UNet weight (--full)."""
    import torch

    from lcmtool.distill import student

    cfg, unet = run.cfg, run.pipe.unet
    unet.requires_grad_(cfg.full)
    if cfg.full:
        unet.to(run.accelerator.device, torch.float32)  # full fine-tune: fp32 master weights, autocast computes
        params = list(unet.parameters())
    else:
        unet.to(run.accelerator.device, run.weight_dtype)
        params = student.add_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.target_modules)
        if not params:
            raise LcmError(f"no module of the UNet matches target_modules {cfg.target_modules}")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay)
    run.params, run.lr_sched = params, lr_schedule(optimizer, cfg)
    run.unet, run.optimizer = run.accelerator.prepare(unet, optimizer)
    run.raw_unet = run.accelerator.unwrap_model(run.unet)


def setup(cfg: FinetuneConfig, out: Path, log) -> Tune:
    """Machine -> data listing -> model -> run folder -> noise schedule -> latent cache -> trainable weights."""

    from lcmtool.distill.teacher import noise_schedule
    from lcmtool.engines.training import latent_data, open_run

    opened = open_run(cfg, out)
    prediction_type, alphas_cumprod, _ = noise_schedule(opened.pipe, 50)
    weight_dtype = opened.weight_dtype
    dataset, root, uncond = latent_data(cfg, opened, weight_dtype, log)
    run = Tune(cfg, out, log, opened.accelerator, opened.tracker, opened.pipe, opened.family, dataset, root,
               alphas_cumprod, prediction_type, weight_dtype, uncond)
    add_trainable(run)
    return run


def resume(run: Tune) -> TrainState:
    from lcmtool.config import to_dict

    state = TrainState()
    if not run.cfg.resume:
        return state
    ck = ckpt.find_checkpoint(run.out, run.cfg.resume)
    saved = ckpt.load_training(ck, to_dict(run.cfg), run.accelerator.num_processes, run.params, [], run.optimizer,
                               run.lr_sched)
    state.step = state.start_step = saved["step"]
    records = ckpt.trim_metrics(run.out / "metrics.jsonl", state.step) if run.main else []
    state.losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    run.log(f"resumed from {ck} at step {state.step}")
    return state


def micro_loss(run: Tune, step: int, micro: int):
    """The denoising loss of one micro-batch: data at this stream position, t ~ U{0..T-1}, eps ~ N(0, I)."""
    import torch
    import torch.nn.functional as F

    from lcmtool.distill import lcd
    from lcmtool.distill.denoise import denoising_target

    cfg, acc, dt = run.cfg, run.accelerator, run.weight_dtype
    device = acc.device
    position = ((step * cfg.grad_accum + micro) * acc.num_processes + acc.process_index) * cfg.batch_size
    batch = run.dataset.batch(position, cfg.batch_size)
    g = torch.Generator().manual_seed(hash((cfg.seed, step, micro, acc.process_index)) % 2 ** 62)
    x0 = batch["latents"].to(device, torch.float32)
    cond = batch["prompt_embeds"].to(device, dt)
    bsz = x0.shape[0]
    noise = torch.randn(x0.shape, generator=g).to(device)
    t = torch.randint(0, len(run.alphas_cumprod), (bsz,), generator=g).to(device)
    drop = (torch.rand(bsz, generator=g) < cfg.caption_dropout).to(device)
    cond = torch.where(drop[:, None, None], run.uncond[0].expand_as(cond), cond)
    kw = {}
    if run.family in ("sdxl", "ssd1b"):
        pooled = batch["pooled_embeds"].to(device, dt)
        pooled = torch.where(drop[:, None], run.uncond[1].expand_as(pooled), pooled)
        kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": batch["geometry"].to(device, dt)}
    with acc.autocast():
        pred = run.unet(lcd.add_noise(x0, noise, t, run.alphas_cumprod).to(dt), t, encoder_hidden_states=cond,
                        **kw).sample
    target = denoising_target(x0, noise, t, run.alphas_cumprod, run.prediction_type)
    return F.mse_loss(pred.float(), target)


def train_step(run: Tune, state: TrainState, stop: StopRequest) -> list[float]:
    cfg, acc = run.cfg, run.accelerator
    lvals = []
    for micro in range(cfg.grad_accum):
        with acc.accumulate(run.unet):
            loss = micro_loss(run, state.step, micro)
            lval = acc.reduce(loss.detach().float(), "mean").item()
            if not math.isfinite(lval):
                raise LcmError(f"non-finite loss ({lval}) at step {state.step + 1}; last good checkpoint: "
                               f"{state.last_good or 'none'} (lower --lr?)")
            acc.backward(loss)
        lvals.append(lval)
    with stop.deferred():
        if acc.sync_gradients and cfg.max_grad_norm > 0:
            acc.clip_grad_norm_(run.params, cfg.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.lr_sched.step()
        state.step += 1
    return lvals


def save_checkpoint(run: Tune, state: TrainState, reason: str) -> Path | None:
    from lcmtool.config import to_dict

    run.accelerator.wait_for_everyone()
    if not run.main:
        return None
    meta = {"step": state.step, "world_size": run.accelerator.num_processes, "reason": reason,
            "config": to_dict(run.cfg)}
    return ckpt.save_training(run.out / "checkpoints", f"step-{state.step:07d}", run.params, [], run.optimizer,
                              run.lr_sched, meta, max(1, run.cfg.keep_checkpoints))


def validate(run: Tune, path: Path) -> None:
    """Rows: validation prompts; columns: DPM-Solver++ at validation_steps, CFG 7.5, image i seeded seed + i."""
    import torch

    from lcmtool.distill.teacher import encoders_on
    from lcmtool.models.schedulers import make_scheduler
    from lcmtool.outputs.grid import grid
    from lcmtool.outputs.png import save_png

    cfg, pipe = run.cfg, run.pipe
    comps = dict(pipe.components, unet=run.raw_unet)
    vpipe = type(pipe)(**comps)
    vpipe.set_progress_bar_config(disable=True)
    run.raw_unet.eval()
    cols = []
    with encoders_on(pipe, run.accelerator.device), torch.no_grad(), run.accelerator.autocast():
        for steps in cfg.validation_steps:
            vpipe.scheduler = make_scheduler("dpmpp", pipe.scheduler.config)
            gens = [torch.Generator("cpu").manual_seed(cfg.validation_seed + i)
                    for i in range(len(cfg.validation_prompts))]
            cols.append(vpipe(cfg.validation_prompts, num_inference_steps=steps, guidance_scale=VALIDATION_GUIDANCE,
                              generator=gens, output_type="pil").images)
    run.raw_unet.train()
    cells = [[col[r] for col in cols] for r in range(len(cfg.validation_prompts))]
    save_png(grid(cells, [f"DPM++ {s} steps, w={VALIDATION_GUIDANCE:g}" for s in cfg.validation_steps],
                  min_cell=128), path, a1111=False)


def after_step(run: Tune, state: TrainState, stop: StopRequest) -> None:
    cfg, step = run.cfg, state.step
    if step >= cfg.max_steps:
        return
    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
        state.last_good = save_checkpoint(run, state, "periodic") or state.last_good
    if cfg.validate_every and step % cfg.validate_every == 0 and run.main:
        validate(run, run.out / "validation" / f"step-{step:07d}.png")
    if stop.requested:
        stop.written = True
        where = save_checkpoint(run, state, "interrupted")
        run.log(f"interrupted at step {step}: checkpoint {where} (continue with --resume latest)")
        raise KeyboardInterrupt


def finetune(cfg: FinetuneConfig, log=None) -> dict:
    """Run the fine-tune; returns a summary dict (output path, steps, first and final loss). A run that fails
    before its first checkpoint leaves no run folder it created (as distill)."""
    from lcmtool.fileio import fresh_folder

    log = log or to_stderr
    out = check_config(cfg)
    with fresh_folder(out, keep=lambda p: any(ckpt.is_checkpoint(c) for c in (p / "checkpoints").glob("*"))):
        run = setup(cfg, out, log)
        return run_loop(run, resume(run), cfg, out, "finetune", train_step, after_step, save_checkpoint, finish,
                        log)


def style_of(cfg: FinetuneConfig) -> str:
    """The style recorded in the LoRA: --style, else the demo data's (demo:shapes:outline -> outline)."""
    if cfg.style:
        return cfg.style
    parts = cfg.data.split(":")
    return parts[2] if len(parts) == 3 and parts[0] == "demo" else ""


def save_pipeline(run: Tune, folder: Path) -> None:
    """The fine-tuned variant as a diffusers folder (UNet in save_dtype), written beside and renamed in place."""
    import shutil
    import tempfile

    from lcmtool.fileio import atomic_write_json, publish_dir
    from lcmtool.models.load import torch_dtype

    dtype = torch_dtype(run.cfg.save_dtype)
    pipe = run.pipe
    pipe.unet = run.raw_unet.to("cpu", dtype)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        atomic_write_json(tmp / "lcmtool_finetune.json", {"base_model": run.cfg.model, "data": run.cfg.data,
                                                           "style": style_of(run.cfg), "family": run.family})
        publish_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def finish(run: Tune, state: TrainState, elapsed: float) -> dict:
    """Final checkpoint, validation grid, the LoRA file or pipeline folder, loss curve, summary.json."""
    from lcmtool import __version__
    from lcmtool.config import to_dict
    from lcmtool.distill.student import save_tau_lcm
    from lcmtool.fileio import atomic_write_json

    cfg, out = run.cfg, run.out
    last = save_checkpoint(run, state, "final")
    losses = [v for _, v in state.losses]
    summary = {"out": str(out), "steps": state.step, "family": run.family, "full": cfg.full,
               "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
               "samples_per_s": (state.step - state.start_step) * run.samples_per_step / max(elapsed, 1e-9),
               "samples_cached": len(run.dataset), "cache": str(run.cache_root), "checkpoint": str(last)}
    if run.main:
        validate(run, out / "validation.png")
        loss_curve_png(state.losses, out / "loss.png", f"denoising loss ({cfg.model}, {state.step} steps)")
        if cfg.full:
            save_pipeline(run, out / "pipeline")
            summary["pipeline"] = str(out / "pipeline")
        else:
            from lcmtool.lora.metadata import portable_values
            from lcmtool.models.load import torch_dtype

            path = out / "lora.safetensors"
            save_tau_lcm(run.raw_unet, path, cfg.format, run.family, torch_dtype(cfg.save_dtype), portable_values({
                "lcmtool_version": __version__, "lcmtool_kind": "style_lora", "base_model": cfg.model,
                "family": run.family, "style": style_of(cfg), "steps": str(state.step), "rank": str(cfg.lora_rank),
                "alpha": str(cfg.lora_alpha), "config": to_dict(cfg)}))
            summary.update(lora=str(path), format=cfg.format)
        summary.update(validation=str(out / "validation.png"), loss_curve=str(out / "loss.png"))
        atomic_write_json(out / "summary.json", summary)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return summary
