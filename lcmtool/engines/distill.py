"""LoRA latent consistency distillation: one flat accelerate loop (LCM-LoRA arXiv 2311.05556, Algorithm 1).

Reads top to bottom: config -> data listing -> teacher -> cache -> LoRA student -> loop -> tau_LCM file.
One UNet in memory: the teacher is the UNet with its LoRA switched off, the student the UNet with it on, and
the target (default) the student itself under stop-gradient, or an EMA copy of the LoRA weights.
Runs on one device, or data-parallel with `accelerate launch -m lcmtool distill ...` / torchrun.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

from lcmtool.errors import LcmError
from lcmtool.lora.formats import LCM_TARGETS  # the 14 LCM-LoRA module kinds, defined once
from lcmtool.options import DistillConfig  # every option is declared once, in lcmtool/options.py

LCM_LORA_TARGETS = list(LCM_TARGETS)


# ------------------------------------------------------------------------------------------------ helpers

class NonFiniteLoss(LcmError):
    pass


def _cache_root(cfg: DistillConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("LCMTOOL_CACHE", Path.home() / ".cache" / "lcmtool")) / "distill"


def load_teacher(spec: str):
    """(pipeline, family, model identity for the cache key)."""
    import torch
    from diffusers import DiffusionPipeline

    from lcmtool.models.load import family_of_pipeline, resolve_model

    ref = resolve_model(spec)
    if ref.kind == "single-file":
        raise LcmError(f"{spec}: distill needs a diffusers folder or hub id (convert the single file first)")
    pipe = DiffusionPipeline.from_pretrained(ref.location, torch_dtype=torch.float32)
    if not hasattr(pipe, "unet"):
        raise LcmError(f"{spec} is not a UNet text-to-image pipeline ({type(pipe).__name__})")
    family = family_of_pipeline(pipe)
    ident = ref.location
    if os.path.isdir(ref.location):
        stats = []
        for sub in ("vae", "text_encoder", "text_encoder_2"):
            folder = Path(ref.location, sub)
            files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
            for f in files:
                st = f.stat()
                stats.append((f.name, sub, st.st_size, int(st.st_mtime)))
        ident = json.dumps([str(Path(ref.location).resolve()), stats])
    return pipe, family, ident


@contextlib.contextmanager
def adapters_off(unet):
    """The teacher: the same UNet with its LoRA switched off."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


@contextlib.contextmanager
def swapped(params, other):
    """Temporarily load `other` tensors into `params` (the EMA target network)."""
    import torch

    if not other:
        yield
        return
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, o in zip(params, other, strict=False):
            p.copy_(o)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup, strict=False):
                p.copy_(b)


def lcd_pred_target(unet, raw_unet, z_t, t_start, t_prev, index, w, cond, uncond, added, added_uncond, grid,
                    alphas_cumprod, prediction_type: str, timestep_scaling: float, autocast, lora_params=(), ema=()):
    """Algorithm 1 lines 5-7 on one UNet: returns (f_theta(z_{t_{n+k}}), stop-grad f_theta-(z_hat_{t_n})).

    `unet` is the (possibly DDP-wrapped) student, `raw_unet` the same module unwrapped; the teacher is `raw_unet`
    with its LoRA off, run once on cond and uncond concatenated; the target is the student (or its EMA LoRA).
    """
    import torch

    from lcmtool.distill import lcd

    def kwargs(a):
        return {"added_cond_kwargs": a} if a is not None else {}

    # student: f_theta(z_{t_{n+k}}, c, t_{n+k}) = c_skip z + c_out x0 (the LCM boundary condition)
    with autocast():
        out_s = unet(z_t, t_start, encoder_hidden_states=cond, **kwargs(added)).sample
    x0_s = lcd.predicted_x0(out_s.float(), t_start, z_t, prediction_type, alphas_cumprod)
    pred = lcd.consistency_output(z_t, x0_s, t_start, timestep_scaling)
    with torch.no_grad():
        # teacher (LoRA off): cond and uncond in one batch, guided x0 and eps, one DDIM step to t_n
        both = None if added is None else {k: torch.cat([added[k], added_uncond[k]]) for k in added}
        with adapters_off(raw_unet), autocast():
            out_t = raw_unet(torch.cat([z_t, z_t]), torch.cat([t_start, t_start]),
                             encoder_hidden_states=torch.cat([cond, uncond]), **kwargs(both)).sample.float()
        o_c, o_u = out_t.chunk(2)
        x0 = lcd.guided(lcd.predicted_x0(o_c, t_start, z_t, prediction_type, alphas_cumprod),
                        lcd.predicted_x0(o_u, t_start, z_t, prediction_type, alphas_cumprod), w)
        eps = lcd.guided(lcd.predicted_eps(o_c, t_start, z_t, prediction_type, alphas_cumprod),
                         lcd.predicted_eps(o_u, t_start, z_t, prediction_type, alphas_cumprod), w)
        z_prev = grid.ddim_step(x0, eps, index).float()
        # target: f_theta-(z_hat_{t_n}, c, t_n), theta- = stop-grad student (default) or the EMA LoRA
        with swapped(lora_params, ema), autocast():
            out_tg = raw_unet(z_prev, t_prev, encoder_hidden_states=cond, **kwargs(added)).sample.float()
        x0_tg = lcd.predicted_x0(out_tg, t_prev, z_prev, prediction_type, alphas_cumprod)
        target = lcd.consistency_output(z_prev, x0_tg, t_prev, timestep_scaling)
    return pred, target


def lora_modules(unet) -> dict:
    """The UNet's peft LoRA -> {diffusers module path: (A, B, alpha)} (fp32, CPU); alpha = scaling * r per module."""
    import torch

    out = {}
    for name, mod in unet.named_modules():
        lora_a = getattr(mod, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and "default" in lora_a:
            A = lora_a["default"].weight.detach().to("cpu", torch.float32)
            B = mod.lora_B["default"].weight.detach().to("cpu", torch.float32)
            out[name] = (A, B, float(mod.scaling["default"] * mod.r["default"]))
    return out


def save_tau_lcm(unet, path: Path, fmt: str, family: str, dtype, metadata: dict) -> str:
    """Write tau_LCM (the LoRA) atomically via lcmtool.lora.io (kohya default); diffusers by hand if it is absent."""
    from safetensors.torch import save_file

    from lcmtool.fileio import atomic_path

    modules = lora_modules(unet)
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()}
    try:
        from lcmtool.lora import io as lora_io
    except ImportError:
        lora_io = None
    if lora_io is not None:
        lora_io.save_lora({n: lora_io.LoraModule(A, B, alpha) for n, (A, B, alpha) in modules.items()}, path,
                          format=fmt, family=family, metadata=meta, dtype=dtype)
        return fmt
    if fmt != "diffusers":
        raise LcmError(f"format {fmt} needs lcmtool.lora, which is not installed here; use --format diffusers")
    # diffusers format: "unet.<module>.lora_A/B.weight"; it carries no alpha, so alpha / r is folded into B
    out = {}
    for name, (A, B, alpha) in modules.items():
        out[f"unet.{name}.lora_A.weight"] = A.to(dtype).contiguous()
        out[f"unet.{name}.lora_B.weight"] = (B * (alpha / A.shape[0])).to(dtype).contiguous()
    meta["format"] = "diffusers"
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=meta)
    return "diffusers"


def loss_curve_png(points: list[tuple[int, float]], path: Path, title: str = "LCD loss") -> None:
    """The logged loss against the step (log-scale y): raw and a running mean, drawn by lcmtool.outputs.plot."""
    from lcmtool.outputs.plot import line_chart, smooth

    steps, ys = [s for s, _ in points], [v for _, v in points]
    line_chart({"loss": ys, "running mean": smooth(ys, max(3, len(ys) // 15))}, path, title=title, x=steps)


def validation_grid(pipe, unet, cfg: DistillConfig, path: Path, device, autocast) -> None:
    """Rows: fixed prompts; columns: LCM 1, 2, 4, 8 steps (stock diffusers LCMScheduler, guidance 1, LoRA on)."""
    import torch
    from diffusers import LCMScheduler
    from PIL import Image, ImageDraw

    from lcmtool.fileio import atomic_path

    comps = {k: v for k, v in pipe.components.items()}
    comps["unet"] = unet
    comps["scheduler"] = LCMScheduler.from_config(pipe.scheduler.config, timestep_scaling=cfg.timestep_scaling)
    vpipe = type(pipe)(**comps)
    vpipe.set_progress_bar_config(disable=True)
    cols = []
    was_training = unet.training
    unet.eval()
    for steps in cfg.validation_steps:
        gens = [torch.Generator("cpu").manual_seed(cfg.validation_seed + i) for i in range(len(cfg.validation_prompts))]
        with torch.no_grad(), autocast():
            imgs = vpipe(cfg.validation_prompts, num_inference_steps=steps, guidance_scale=1.0, generator=gens,
                         output_type="pil").images
        cols.append(imgs)
    unet.train(was_training)
    s = cols[0][0].size[0]
    scale = max(1, 128 // s)
    cell = s * scale
    grid = Image.new("RGB", (cell * len(cols), cell * len(cfg.validation_prompts) + 14), "white")
    d = ImageDraw.Draw(grid)
    for c, (steps, imgs) in enumerate(zip(cfg.validation_steps, cols, strict=False)):
        d.text((c * cell + 4, 1), f"LCM {steps} step{'s' if steps > 1 else ''}", fill="black")
        for r, im in enumerate(imgs):
            grid.paste(im.resize((cell, cell), Image.NEAREST), (c * cell, 14 + r * cell))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


class StopRequest:
    """SIGINT/SIGTERM during training ask for a stop at the next step boundary instead of killing the step.

    One process: a second Ctrl-C leaves at once (KeyboardInterrupt). Under torchrun / accelerate launch the launcher
    forwards the terminal's signal to the workers, so each may see two: all are taken as the one request, and the
    launcher's own kill timeout (30 s) covers a run that does not stop.
    """

    def __init__(self, single_process: bool):
        self.single_process = single_process
        self.requested = False
        self.written = False
        self.any_rank = False  # some rank had asked as of the last all-reduced step (data-parallel runs decide on it)
        self._old: dict = {}

    def _handler(self, signum, frame):
        if self.requested and self.single_process:
            raise KeyboardInterrupt
        self.requested = True

    def install(self) -> None:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)

    def restore(self) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def tensorboard_tracker(report_to: str) -> str | None:
    """accelerate's log_with for `report_to`: "tensorboard" when wanted and installed, else None."""
    from accelerate.utils import is_tensorboard_available

    if report_to == "none" or (report_to == "auto" and not is_tensorboard_available()):
        return None
    if not is_tensorboard_available():
        raise LcmError("report_to: tensorboard needs the tensorboard package (pip install tensorboard), "
                       "or set report_to: auto|none")
    return "tensorboard"


def find_checkpoint(out: Path, resume: str) -> Path:
    if resume == "latest":
        ckpts = sorted((out / "checkpoints").glob("step-*"))
        ckpts = [c for c in ckpts if (c / "trainer_state.json").is_file()]
        if not ckpts:
            raise LcmError(f"--resume latest: no checkpoint in {out / 'checkpoints'}")
        return ckpts[-1]
    p = Path(resume).expanduser()
    if not (p / "trainer_state.json").is_file():
        raise LcmError(f"--resume {resume}: not a distill checkpoint folder (no trainer_state.json)")
    return p


# ------------------------------------------------------------------------------------------------ the run

def distill(cfg: DistillConfig, log=None) -> dict:
    """Run LCD with a LoRA student; returns a summary dict (paths, steps, final loss, samples/s)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft import LoraConfig
    from rich.console import Console

    from lcmtool.config import write_resolved
    from lcmtool.distill import data as D
    from lcmtool.distill import lcd

    console = Console(stderr=True, highlight=False)
    log = log or (lambda msg: console.print(msg))
    if not cfg.model:
        raise LcmError("distill needs a teacher: --model demo:sd | a diffusers folder | a hub id")
    if cfg.w_min > cfg.w_max or cfg.w_min < 0:
        raise LcmError(f"need 0 <= w_min <= w_max, got w_min={cfg.w_min} w_max={cfg.w_max}")
    if cfg.max_steps < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.lora_rank < 1:
        raise LcmError("max_steps, batch_size, grad_accum and lora_rank must be >= 1")
    out = Path(cfg.out or Path("runs") / cfg.name)

    # 1. the machine: accelerate does mixed precision, gradient accumulation and DDP
    use_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if not use_cpu and not torch.cuda.is_available():
        raise LcmError(f"device {cfg.device} requested but CUDA is not available")
    if cfg.device.startswith("cuda:") and "LOCAL_RANK" not in os.environ:
        torch.cuda.set_device(int(cfg.device.split(":")[1]))
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "no" if use_cpu else "bf16"
    tracker = tensorboard_tracker(cfg.report_to)
    accelerator = Accelerator(mixed_precision=mp, gradient_accumulation_steps=cfg.grad_accum, cpu=use_cpu,
                              log_with=tracker, project_dir=str(out) if tracker else None)
    device, main = accelerator.device, accelerator.is_main_process
    set_seed(cfg.seed)
    # 2. data listing before any model loads (an empty data set is an error here)
    source = D.open_source(cfg.data, cfg.num_samples, cfg.seed)

    # 3. the teacher (frozen), and its noise schedule
    pipe, family, model_id = load_teacher(cfg.model)
    if cfg.family != "auto" and not (cfg.family == family or {cfg.family, family} == {"sdxl", "ssd1b"}):
        raise LcmError(f"this config is for the {cfg.family} family but {cfg.model} is {family}")
    if main:  # the run folder appears only once its inputs have been checked
        out.mkdir(parents=True, exist_ok=True)
        write_resolved(cfg, out / "config.yaml")
    if tracker:  # TensorBoard run <out>/tensorboard, with the config's scalars as its hyper-parameters
        from lcmtool.config import to_dict

        accelerator.init_trackers("tensorboard", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                         for k, v in to_dict(cfg).items()})
    is_xl = family in ("sdxl", "ssd1b")
    uncond = cfg.uncond if cfg.uncond != "auto" else ("zeros" if is_xl else "empty")
    unet = pipe.unet
    sched = pipe.scheduler.config
    prediction_type = sched.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise LcmError(f"teacher prediction type {prediction_type!r} is not supported (epsilon or v_prediction)")
    from diffusers import DDPMScheduler

    alphas_cumprod = DDPMScheduler.from_config(sched).alphas_cumprod.to(torch.float64)
    num_train_timesteps = sched.get("num_train_timesteps", 1000)
    grid = lcd.SkippingGrid(alphas_cumprod, num_train_timesteps, cfg.num_ddim_timesteps)
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    resolution = cfg.resolution or unet.config.sample_size * vae_factor

    # 4. the latent + text-embedding cache (main process builds it, the others wait and read it)
    cache_root = _cache_root(cfg) / D.cache_key(model_id, source, resolution, cfg.center_crop, cfg.seed, uncond)
    if main:
        for m in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if m is not None:
                m.to(device)
        t0 = time.time()
        fresh = not (cache_root / "meta.json").is_file()
        D.build_cache(pipe, family, source, cache_root, resolution, cfg.center_crop, cfg.seed, uncond, device)
        if fresh:
            n_cached = json.loads((cache_root / "meta.json").read_text())["count"]
            log(f"cached {n_cached} latents in {time.time() - t0:.1f}s -> {cache_root}")
        for m in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if m is not None:
                m.to("cpu")  # with the cache, the VAE and text encoders leave the GPU during training
    accelerator.wait_for_everyone()
    small = len(source) * 4 * (resolution // vae_factor) ** 2 * 2 < 2 ** 30
    dataset = D.LatentCache(cache_root, cfg.seed, device=device if small else "cpu")
    if dataset.meta["skipped"] and main:
        log(f"[yellow]skipped {dataset.meta['skipped']} unreadable image(s)[/]")

    # 5. the student: teacher UNet + LoRA on the 14 LCM-LoRA module kinds; base weights frozen in the compute dtype
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, torch.float32)
    unet.requires_grad_(False)
    unet.to(device, weight_dtype)
    rank_pattern, alpha_pattern = {}, {}
    if cfg.conv_rank:
        conv_alpha = cfg.conv_alpha or cfg.conv_rank * cfg.lora_alpha / cfg.lora_rank
        for name, mod in unet.named_modules():
            if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size != (1, 1):
                rank_pattern[re.escape(name)], alpha_pattern[re.escape(name)] = cfg.conv_rank, conv_alpha
    unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                target_modules=cfg.target_modules, rank_pattern=rank_pattern,
                                alpha_pattern=alpha_pattern))
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    for p in lora_params:
        p.data = p.data.float()  # LoRA weights train in fp32 (autocast computes in bf16)
    if not lora_params:
        raise LcmError(f"no module of the UNet matches target_modules {cfg.target_modules}")
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ema = [p.detach().clone() for p in lora_params] if cfg.ema_decay > 0 else []
    optimizer = torch.optim.AdamW(lora_params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    unet, optimizer = accelerator.prepare(unet, optimizer)
    raw_unet = accelerator.unwrap_model(unet)

    # 6. resume: LoRA, optimizer, schedule and the data position (step), written by `checkpoint` below
    step, ckpt_dir, losses = 0, out / "checkpoints", []
    if cfg.resume:
        ck = find_checkpoint(out, cfg.resume)
        state = json.loads((ck / "trainer_state.json").read_text())
        for key in ("seed", "batch_size", "grad_accum", "lora_rank", "lora_alpha", "conv_rank", "target_modules"):
            if state["config"].get(key) != getattr(cfg, key):
                raise LcmError(f"cannot resume {ck}: it was trained with {key}={state['config'].get(key)}, "
                               f"now {getattr(cfg, key)}")
        if state["world_size"] != accelerator.num_processes:
            raise LcmError(f"cannot resume {ck}: it ran on {state['world_size']} processes, "
                           f"now {accelerator.num_processes}")
        # CPU first: a DDP run on CPU tags its storages "cpu:N", which map_location=device cannot restore
        blob = torch.load(ck / "training.pt", map_location="cpu", weights_only=True)
        with torch.no_grad():
            for p, v in zip(lora_params, blob["lora"], strict=False):
                p.copy_(v)
            for e, v in zip(ema, blob.get("ema", []), strict=False):
                e.copy_(v)
        optimizer.load_state_dict(blob["optimizer"])
        lr_sched.load_state_dict(blob["lr_scheduler"])
        step = state["step"]
        metrics_file = out / "metrics.jsonl"
        if metrics_file.is_file():
            losses = [(r["step"], r["loss"]) for r in map(json.loads, metrics_file.read_text().splitlines())
                      if r.get("step", 0) <= step and "loss" in r]
        log(f"resumed from {ck} at step {step}")

    def checkpoint(reason: str) -> Path | None:
        """Atomic: written into a temp folder, then renamed; older ones beyond keep_checkpoints are removed."""
        accelerator.wait_for_everyone()
        if not main:
            return None
        final = ckpt_dir / f"step-{step:07d}"
        tmp = ckpt_dir / f".tmp-step-{step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save({"lora": [p.detach().cpu() for p in lora_params], "ema": [e.cpu() for e in ema],
                    "optimizer": optimizer.state_dict(), "lr_scheduler": lr_sched.state_dict()}, tmp / "training.pt")
        from lcmtool.config import to_dict
        from lcmtool.fileio import publish_dir

        (tmp / "trainer_state.json").write_text(json.dumps(
            {"step": step, "samples_seen": step * samples_per_step, "world_size": accelerator.num_processes,
             "reason": reason, "config": to_dict(cfg)}, indent=1))
        publish_dir(tmp, final)
        for old in sorted(ckpt_dir.glob("step-*"))[:-max(1, cfg.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    # 7. the loop: each optimizer step consumes grad_accum micro-batches per process from the data stream
    world = accelerator.num_processes
    samples_per_step = cfg.batch_size * cfg.grad_accum * world
    metrics = open(out / "metrics.jsonl", "a") if main else None
    if main and not cfg.resume:
        metrics.truncate(0)
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("distill"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[sps]} samples/s"),
                        TimeRemainingColumn(), console=console, disable=not main or not sys.stderr.isatty()
                        and os.environ.get("LCMTOOL_PROGRESS") != "1")
    task = progress.add_task("distill", total=cfg.max_steps, completed=step, loss="-", sps="-")
    # the unconditional text embeddings are the same every step: convert them to the compute dtype once
    uncond_embeds = dataset.text["uncond_embeds"].to(device, weight_dtype)
    uncond_pooled = dataset.text["uncond_pooled"].to(device, weight_dtype) if is_xl else None
    unet.train()
    start_step, t_start, t_log, loss_acc, n_acc = step, time.time(), time.time(), 0.0, 0
    last_good = None
    stop = StopRequest(single_process=world == 1)
    try:
        stop.install()
        with progress:
            while step < cfg.max_steps:
                for micro in range(cfg.grad_accum):
                    # 7.1 the batch at this stream position (deterministic: resume sees the same samples)
                    position = ((step * cfg.grad_accum + micro) * world + accelerator.process_index) * cfg.batch_size
                    batch = dataset.batch(position, cfg.batch_size)
                    seed = hash((cfg.seed, step, micro, accelerator.process_index)) % 2 ** 62
                    g = torch.Generator().manual_seed(seed)
                    latents = batch["latents"].to(device, torch.float32)
                    cond = batch["prompt_embeds"].to(device, weight_dtype)
                    bsz = latents.shape[0]
                    # 7.2 n ~ U{0..N-1} on the skipping grid, w ~ U[w_min, w_max], noise z to t_{n+k}
                    index = torch.randint(0, len(grid), (bsz,), generator=g)
                    t_start_, t_prev = grid.start_and_target_timesteps(index)
                    w = lcd.sample_guidance(g, bsz, cfg.w_min, cfg.w_max).to(device)
                    noise = torch.randn(latents.shape, generator=g).to(device)
                    index, t_start_, t_prev = index.to(device), t_start_.to(device), t_prev.to(device)
                    z_t = lcd.add_noise(latents, noise, t_start_, alphas_cumprod)
                    uncond_e = uncond_embeds.expand_as(cond)
                    kw, kw_u = {}, {}
                    if is_xl:
                        pooled = batch["pooled_embeds"].to(device, weight_dtype)
                        time_ids = batch["geometry"].to(device, weight_dtype)
                        kw = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
                        up = uncond_pooled.expand_as(pooled)
                        kw_u = {"added_cond_kwargs": {"text_embeds": up, "time_ids": time_ids}}

                    with accelerator.accumulate(unet):
                        # 7.3-7.5 student at t_{n+k}; teacher (LoRA off) guided DDIM step to t_n; target at t_n
                        pred, target = lcd_pred_target(unet, raw_unet, z_t, t_start_, t_prev, index, w, cond, uncond_e,
                                                       kw.get("added_cond_kwargs"), kw_u.get("added_cond_kwargs"),
                                                       grid, alphas_cumprod, prediction_type, cfg.timestep_scaling,
                                                       accelerator.autocast, lora_params, ema)
                        # 7.6 loss and update
                        loss = lcd.distance(pred, target, cfg.loss, cfg.huber_c)
                        # one all-reduce carries the loss and the ranks' stop requests (no extra collective)
                        lval, votes = accelerator.reduce(torch.stack(
                            [loss.detach().float(), loss.new_tensor(stop.requested, dtype=torch.float32)]),
                            "mean").tolist()
                        stop.any_rank = votes > 0
                        if not math.isfinite(lval):
                            raise NonFiniteLoss(f"non-finite loss ({lval}) at step {step + 1}; stopped, last good "
                                                f"checkpoint: {last_good or 'none'}")
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(lora_params, cfg.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    loss_acc += lval
                    n_acc += 1
                lr_sched.step()
                if ema:
                    with torch.no_grad():
                        torch._foreach_lerp_(ema, [p.detach() for p in lora_params], 1 - cfg.ema_decay)
                step += 1

                # 7.7 logging, checkpoints, validation
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    now = time.time()
                    mean = loss_acc / max(1, n_acc)
                    sps = samples_per_step * (n_acc / cfg.grad_accum) / max(now - t_log, 1e-9)
                    losses.append((step, mean))
                    if main:
                        metrics.write(json.dumps({"step": step, "loss": mean, "lr": lr_sched.get_last_lr()[0],
                                                  "samples_per_s": sps, "samples_seen": step * samples_per_step,
                                                  "elapsed_s": now - t_start}) + "\n")
                        metrics.flush()
                    if tracker:
                        accelerator.log({"loss": mean, "lr": lr_sched.get_last_lr()[0], "samples_per_s": sps},
                                        step=step)
                    progress.update(task, completed=step, loss=f"{mean:.4g}", sps=f"{sps:.0f}")
                    if main and progress.disable and (step % (cfg.log_every * 5) == 0 or step == cfg.max_steps):
                        log(f"step {step}/{cfg.max_steps} loss {mean:.4g} {sps:.0f} samples/s "
                            f"elapsed {now - t_start:.0f}s")
                    t_log, loss_acc, n_acc = now, 0.0, 0
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                    last_good = checkpoint("periodic") or last_good
                if cfg.validate_every and step % cfg.validate_every == 0 and step < cfg.max_steps and main:
                    _validate(pipe, raw_unet, cfg, out / "validation" / f"step-{step:07d}.png", device,
                              accelerator.autocast)
                # 7.8 Ctrl-C / SIGTERM: every rank stops after the same step (the request is all-reduced), so the
                # checkpoint's collectives line up; a killed run resumes from it with --resume latest
                if (stop.requested if world == 1 else stop.any_rank) and step < cfg.max_steps:
                    stop.written = True
                    where = checkpoint("interrupted")
                    if main:
                        log(f"interrupted at step {step}: checkpoint {where} (continue with --resume latest)")
                    raise KeyboardInterrupt
    except BaseException as exc:
        # an interrupt raised mid-step (second Ctrl-C, or a test): one process can still write its checkpoint;
        # several cannot safely (the others may be inside a collective), so they leave with the last periodic one
        if isinstance(exc, KeyboardInterrupt) and step > start_step and not stop.written and world == 1:
            where = checkpoint("interrupted")
            log(f"interrupted at step {step}: checkpoint {where} (continue with --resume latest)")
        if tracker:
            accelerator.end_training()  # flush the TensorBoard events logged so far
        raise
    finally:
        stop.restore()
        if metrics:
            metrics.close()
    elapsed = time.time() - t_start

    # 8. outputs: tau_LCM, the validation grid, the loss curve, a final checkpoint
    ckpt = checkpoint("final")
    # data-parallel ranks must hold identical LoRA weights: one checksum per rank, gathered into the summary
    flat = torch.cat([p.detach().double().flatten() for p in lora_params])
    probe = torch.cos(torch.arange(flat.numel(), dtype=torch.float64, device=flat.device))
    rank_sums = accelerator.gather(torch.stack([flat.sum(), flat @ probe]).float().unsqueeze(0)).cpu().tolist()
    summary = {"out": str(out), "steps": step, "family": family, "samples_per_s": (step - start_step)
               * samples_per_step / max(elapsed, 1e-9), "final_loss": losses[-1][1] if losses else None,
               "skipped_images": dataset.meta["skipped"], "samples_cached": len(dataset),
               "world_size": world, "rank_checksums": rank_sums, "cache": str(cache_root)}
    if main:
        from lcmtool import __version__

        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.save_dtype]
        from lcmtool.config import to_dict

        lora_path = out / "lcm-lora.safetensors"
        fmt = save_tau_lcm(raw_unet, lora_path, cfg.format, family, dtype, {
            "lcmtool_version": __version__, "lcmtool_kind": "tau_lcm", "base_model": cfg.model, "family": family,
            "steps": str(step), "rank": str(cfg.lora_rank), "alpha": str(cfg.lora_alpha), "config": to_dict(cfg)})
        _validate(pipe, raw_unet, cfg, out / "validation.png", device, accelerator.autocast)
        loss_curve_png(losses, out / "loss.png", f"LCD loss ({cfg.model}, {step} steps)")
        summary.update({"lora": str(lora_path), "format": fmt, "lora_bytes": lora_path.stat().st_size,
                        "checkpoint": str(ckpt), "validation": str(out / "validation.png"),
                        "loss_curve": str(out / "loss.png")})
        from lcmtool.fileio import atomic_write_json

        atomic_write_json(out / "summary.json", summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _validate(pipe, unet, cfg, path, device, autocast):
    """Validation runs on the main process with the VAE and text encoders brought to the device for the call."""
    mods = [m for m in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    for m in mods:
        m.to(device)
    try:
        validation_grid(pipe, unet, cfg, path, device, autocast)
    finally:
        for m in mods:
            m.to("cpu")
