"""Validation of a distill run: LCM images of the student, sampled exactly as `lcmtool sample` samples them.

The scheduler is the pinned LCM configuration of lcmtool.models.schedulers (the one `sample` uses), on the
teacher's noise schedule, guidance 1, one CPU generator per image seeded `seed + i`; grids are drawn by
lcmtool.outputs.grid.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from lcmtool.distill.teacher import encoders_on
from lcmtool.models.schedulers import LCM_ORIGINAL_STEPS, make_scheduler


def lcm_pipeline(pipe, unet, timestep_scaling: float = 10.0):
    """A pipeline of `pipe`'s class and components with `unet` and sample's pinned LCM scheduler."""
    comps = dict(pipe.components)
    comps["unet"] = unet
    vpipe = type(pipe)(**comps)
    vpipe.scheduler = make_scheduler("lcm", pipe.scheduler.config)
    if timestep_scaling != vpipe.scheduler.config.timestep_scaling:  # a run distilled for another scaling
        vpipe.scheduler = type(vpipe.scheduler).from_config(vpipe.scheduler.config, timestep_scaling=timestep_scaling)
    vpipe.set_progress_bar_config(disable=True)
    return vpipe


def lcm_images(vpipe, prompts: list[str], steps: int, seed: int, autocast=contextlib.nullcontext,
               batch_size: int = 16, output_type: str = "pil") -> list:
    """PIL images of `prompts` at LCM `steps` steps, guidance 1; image i has seed `seed + i` (as `sample`);
    output_type "latent": the final latents (no VAE decode)."""
    import torch

    vpipe.scheduler = type(vpipe.scheduler).from_config(
        vpipe.scheduler.config, original_inference_steps=max(LCM_ORIGINAL_STEPS, steps))  # as sample.set_scheduler
    unet = vpipe.unet
    was_training = unet.training
    unet.eval()
    images = []
    try:
        for b in range(0, len(prompts), batch_size):
            batch = prompts[b:b + batch_size]
            gens = [torch.Generator("cpu").manual_seed(seed + b + i) for i in range(len(batch))]
            with torch.no_grad(), autocast():
                images += vpipe(batch, num_inference_steps=steps, guidance_scale=1.0, generator=gens,
                                output_type=output_type).images
    finally:
        unet.train(was_training)
    return images


def validation_grid(pipe, unet, prompts: list[str], steps: list[int], seed: int, path: Path, device,
                    autocast=contextlib.nullcontext, timestep_scaling: float = 10.0) -> None:
    """Rows: `prompts`; columns: LCM `steps` steps (guidance 1, LoRA on), written to `path` (PNG, atomic)."""
    from lcmtool.outputs import grid as grids
    from lcmtool.outputs.png import save_png

    with encoders_on(pipe, device):
        vpipe = lcm_pipeline(pipe, unet, timestep_scaling)
        cols = [lcm_images(vpipe, prompts, s, seed, autocast) for s in steps]
    cells = [[col[r] for col in cols] for r in range(len(prompts))]
    image = grids.grid(cells, [f"LCM {s} step{'s' if s > 1 else ''}" for s in steps], min_cell=128)
    save_png(image, path)
