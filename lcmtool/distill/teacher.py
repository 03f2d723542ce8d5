"""The teacher of a distill run: its diffusers pipeline (fp32), family, cache identity and noise schedule."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from lcmtool.distill import lcd
from lcmtool.errors import LcmError


def load_teacher(spec: str):
    """(pipeline, family, model identity for the cache key)."""
    import torch
    from diffusers import DiffusionPipeline

    from lcmtool.models.load import family_of_pipeline, pipeline_classes, resolve_model, text_encoders

    pipeline_classes()  # the pipeline modules from_pretrained would import: the start-up pause ends here

    ref = resolve_model(spec)
    if ref.kind == "single-file":
        raise LcmError(f"{spec}: distill needs a diffusers folder or hub id (convert the single file first)")
    try:
        pipe = DiffusionPipeline.from_pretrained(ref.location, dtype=torch.float32,
                                                 **text_encoders(ref.location, torch.float32))
    except (OSError, ValueError, RuntimeError) as e:  # a missing or damaged part, or a pickle lcmtool won't run
        raise LcmError(f"cannot load the teacher {spec}: {str(e).strip().splitlines()[0][:200]} (lcmtool loads "
                       "safetensors weights; pickled .bin weights are refused)") from None
    if not hasattr(pipe, "unet"):
        raise LcmError(f"{spec} is not a UNet text-to-image pipeline ({type(pipe).__name__})")
    family = family_of_pipeline(pipe)
    ident = ref.location
    if os.path.isdir(ref.location):
        stats = []
        for sub in ("vae", "text_encoder", "text_encoder_2"):
            folder = Path(ref.location, sub)
            for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
                st = f.stat()
                stats.append((f.name, sub, st.st_size, int(st.st_mtime)))
        ident = json.dumps([str(Path(ref.location).resolve()), stats])
    return pipe, family, ident


def noise_schedule(pipe, num_ddim_timesteps: int):
    """-> (prediction type, alphas_cumprod (fp64), the LCD skipping grid) of the teacher's scheduler config."""
    import torch
    from diffusers import DDPMScheduler

    sched = pipe.scheduler.config
    prediction_type = sched.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise LcmError(f"teacher prediction type {prediction_type!r} is not supported (epsilon or v_prediction)")
    alphas_cumprod = DDPMScheduler.from_config(sched).alphas_cumprod.to(torch.float64)
    try:
        grid = lcd.SkippingGrid(alphas_cumprod, sched.get("num_train_timesteps", 1000), num_ddim_timesteps)
    except ValueError as e:
        raise LcmError(f"config key 'num_ddim_timesteps': {e}") from None
    return prediction_type, alphas_cumprod, grid


@contextlib.contextmanager
def encoders_on(pipe, device):
    """The VAE and text encoders on `device` for the call (they live on the CPU while the UNet trains)."""
    mods = [m for m in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    for m in mods:
        m.to(device)
    try:
        yield
    finally:
        for m in mods:
            m.to("cpu")
