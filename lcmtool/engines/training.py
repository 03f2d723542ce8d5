"""What the training engines (distill, finetune) share: the run's machine, data listing, model and run folder
(`open_run`), the latent cache (`latent_data`), the per-interval log (`log_step`) and the training loop itself
(`run_loop`: progress, metrics.jsonl, Ctrl-C checkpoints, the final summary).

`cfg` is any config with distill's machine, data and output keys (DistillConfig, FinetuneConfig).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcmtool.errors import LcmError


@dataclass
class Opened:
    accelerator: Any
    tracker: str | None
    mixed_precision: str
    source: Any
    pipe: Any
    family: str
    model_id: str

    @property
    def weight_dtype(self):
        """The frozen weights' and cached embeddings' dtype: the autocast dtype, fp32 without mixed precision."""
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision, torch.float32)


def make_accelerator(cfg, out: Path):
    """accelerate does mixed precision, gradient accumulation and DDP; -> (accelerator, tracker, mixed precision)."""
    import torch
    from accelerate import Accelerator

    from lcmtool.distill.monitor import tensorboard_tracker

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


def open_run(cfg, out: Path, family: str = "auto") -> Opened:
    """Machine -> data listing -> model (a mismatch with the expected `family` is an error) -> run folder (with
    config.yaml, only once the inputs are checked) -> TensorBoard with the config's scalars."""
    from accelerate.utils import set_seed

    from lcmtool.config import to_dict, write_resolved
    from lcmtool.distill import checkpoint as ckpt
    from lcmtool.distill import data as D
    from lcmtool.distill.teacher import load_teacher

    accelerator, tracker, mp = make_accelerator(cfg, out)
    set_seed(cfg.seed)
    source = D.open_source(cfg.data, cfg.num_samples, cfg.seed)  # an empty data set is an error before any load
    pipe, fam, model_id = load_teacher(cfg.model)
    if family != "auto" and not (family == fam or {family, fam} == {"sdxl", "ssd1b"}):
        raise LcmError(f"this config is for the {family} family but {cfg.model} is {fam}")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_resolved(cfg, out / "config.yaml")
        ckpt.clean_stale(out / "checkpoints")
    if tracker:
        accelerator.init_trackers("tensorboard", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                         for k, v in to_dict(cfg).items()})
    return Opened(accelerator, tracker, mp, source, pipe, fam, model_id)


def latent_data(cfg, run: Opened, weight_dtype, log) -> tuple[Any, Path, tuple]:
    """The latent cache of (model, data, resolution, crop, seed, unconditional embedding), built by the main
    process -> (LatentCache, its folder, (uncond embeddings, SDXL pooled ones or None) in `weight_dtype`)."""
    from lcmtool.distill import data as D

    acc, pipe = run.accelerator, run.pipe
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    resolution = cfg.resolution or pipe.unet.config.sample_size * vae_factor
    is_xl = run.family in ("sdxl", "ssd1b")
    uncond = cfg.uncond if cfg.uncond != "auto" else ("zeros" if is_xl else "empty")
    root = D.cache_root(cfg.cache_dir) / D.cache_key(run.model_id, run.source, resolution, cfg.center_crop, cfg.seed,
                                                     uncond)
    if acc.is_main_process:  # the main process builds the cache, the others wait and read it
        D.prepare_cache(pipe, run.family, run.source, root, resolution, cfg.center_crop, cfg.seed, uncond,
                        acc.device, log)
    acc.wait_for_everyone()
    if getattr(cfg, "teacher_data", 0):
        root = teacher_data(cfg, run, root, weight_dtype, log)
    in_memory = D.fits_in_memory(run.source, pipe, resolution)
    dataset = D.LatentCache(root, cfg.seed, device=acc.device if in_memory else "cpu")
    if dataset.meta["skipped"] and acc.is_main_process:
        log(f"warning: skipped {dataset.meta['skipped']} unreadable image(s)")
    text = dataset.text  # the same every step: in the compute dtype once
    embeds = (text["uncond_embeds"].to(acc.device, weight_dtype),
              text["uncond_pooled"].to(acc.device, weight_dtype) if is_xl else None)
    return dataset, root, embeds


def teacher_data(cfg, run: Opened, root: Path, weight_dtype, log) -> Path:
    """distill's `teacher_data`: a cache of the teacher's own samples for the records of the latent cache at `root`
    (built once by the main process, which shows a progress bar; the others wait) -> its folder."""
    from lcmtool.distill import data as D
    from lcmtool.distill.monitor import count_progress

    acc, unet = run.accelerator, run.pipe.unet
    out = D.teacher_cache_root(root, cfg.teacher_data, cfg.teacher_steps, cfg.teacher_samples)
    if acc.is_main_process and not (out / "meta.json").is_file():
        t0 = time.time()
        progress, task = count_progress("teacher samples", True)
        device, dtype = unet.device, unet.dtype
        unet.to(acc.device, weight_dtype)
        try:
            with progress, acc.autocast():
                D.build_teacher_cache(unet, dict(run.pipe.scheduler.config), root, out, cfg.teacher_data,
                                      cfg.teacher_steps, cfg.teacher_samples, cfg.seed, acc.device, weight_dtype,
                                      progress=lambda done, n: progress.update(task, completed=done, total=n))
        finally:
            unet.to(device, dtype)
        made = json.loads((out / "meta.json").read_text())["count"]
        log(f"teacher data: {made} DPM-Solver++ {cfg.teacher_steps}-step samples at CFG {cfg.teacher_data:g} in "
            f"{time.time() - t0:.1f}s -> {out}")
    acc.wait_for_everyone()
    return out


def log_step(run, state, meter, progress, task, label: str) -> None:
    """Every log_every steps: metrics.jsonl, TensorBoard, the progress bar (or a line when there is none). `run`
    has cfg, accelerator, tracker, lr_sched, metrics, log, main and samples_per_step."""
    cfg, step = run.cfg, state.step
    if step % cfg.log_every and step != cfg.max_steps:
        return
    mean, n, seconds = meter.take()
    sps = run.samples_per_step * (n / cfg.grad_accum) / seconds
    elapsed = time.time() - meter.t0
    lr = run.lr_sched.get_last_lr()[0]
    state.losses.append((step, mean))
    if run.main:
        run.metrics.write(json.dumps({"step": step, "loss": mean, "lr": lr, "samples_per_s": sps,
                                      "samples_seen": step * run.samples_per_step, "elapsed_s": elapsed}) + "\n")
        run.metrics.flush()
    if run.tracker:
        run.accelerator.log({"loss": mean, "lr": lr, "samples_per_s": sps}, step=step)
    progress.update(task, completed=step, loss=f"{mean:.4g}", sps=f"{sps:.0f}")
    if run.main and progress.disable and (step % (cfg.log_every * 5) == 0 or step == cfg.max_steps):
        run.log(f"{label} step {step}/{cfg.max_steps} loss {mean:.4g} {sps:.0f} samples/s elapsed {elapsed:.0f}s")


def run_loop(run, state, cfg, out: Path, label: str, train_step: Callable, after_step: Callable,
             save_checkpoint: Callable, finish: Callable, log: Callable) -> dict:
    """Train `run` from `state` to cfg.max_steps: one `train_step(run, state, stop)` (-> its losses) and one
    `after_step(run, state, stop)` (checkpoints, validation, a stop request) per optimizer step, a progress bar and
    the interval log, metrics.jsonl on the main process (appended on --resume); -> `finish(run, state, seconds)`.

    A KeyboardInterrupt raised mid-step (a second Ctrl-C, or a test) in a single-process run still writes a
    checkpoint with `save_checkpoint(run, state, "interrupted")`; several processes cannot safely (the others may
    be inside a collective), so they leave with the last periodic one. TensorBoard is flushed either way."""
    from lcmtool.distill.checkpoint import StopRequest
    from lcmtool.distill.monitor import Meter, make_progress

    single = run.accelerator.num_processes == 1
    progress, task = make_progress(cfg.max_steps, state.step, run.main)
    run.unet.train()
    meter, stop = Meter(), StopRequest(single_process=single)
    metrics = open(out / "metrics.jsonl", "a" if cfg.resume else "w") if run.main else contextlib.nullcontext()
    with metrics as run.metrics:  # the loop's and finish's records
        try:
            stop.install()
            with progress:
                while state.step < cfg.max_steps:
                    meter.add(train_step(run, state, stop))
                    log_step(run, state, meter, progress, task, label)
                    after_step(run, state, stop)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt) and state.step > state.start_step and not stop.written and single:
                where = save_checkpoint(run, state, "interrupted")
                log(f"interrupted at step {state.step}: checkpoint {where} (continue with --resume latest)")
            if run.tracker:
                run.accelerator.end_training()  # flush the TensorBoard events logged so far
            raise
        finally:
            stop.restore()
        return finish(run, state, time.time() - meter.t0)
