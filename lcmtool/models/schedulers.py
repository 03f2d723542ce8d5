"""Pinned scheduler configurations: lcm, dpmpp, ddim, euler, tcd.

Each scheduler is built from the model's noise schedule (betas, prediction type) and an explicit
configuration stated here, never from whatever the checkpoint's scheduler_config.json carries. The
classes are diffusers' own (so the math is diffusers' and stock pipelines run them), wrapped so that the
denoising loop has no host-device synchronisation: see `_no_sync`.
"""
from __future__ import annotations

import inspect

SCHEDULERS = ("lcm", "dpmpp", "ddim", "euler", "tcd")
# A1111's sampler names, for the `parameters` PNG chunk
SAMPLER_NAMES = {"lcm": "LCM", "dpmpp": "DPM++ 2M", "ddim": "DDIM", "euler": "Euler", "tcd": "TCD"}
# Default guidance (issue 4): LCM/TCD are distilled with guidance baked in, so one UNet pass per step.
DEFAULT_GUIDANCE = {"lcm": 1.0, "tcd": 1.0, "dpmpp": 7.5, "ddim": 7.5, "euler": 7.5}
# The noise schedule is the model's; these keys are copied from its scheduler config, nothing else.
NOISE_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                       "prediction_type", "rescale_betas_zero_snr")
# LCM's skipping-step schedule (LCM paper sec. 4.3; diffusers LCMScheduler): 50 solver steps over 1000
# training steps, i.e. t = 999, 979, ..., 19; c_skip/c_out use timestep_scaling 10.
LCM_ORIGINAL_STEPS = 50

# Pinned configurations. Timestep spacing of the baselines: "leading" with steps_offset 1, the values in
# SD-1.5's and SDXL-base's shipped scheduler_config.json, so the baselines are what a diffusers user gets.
_LCM_PINNED = dict(original_inference_steps=LCM_ORIGINAL_STEPS, timestep_scaling=10.0, clip_sample=False,
                   set_alpha_to_one=True, steps_offset=0, thresholding=False, timestep_spacing="leading")
PINNED = {
    "lcm": dict(_LCM_PINNED),
    "tcd": dict(_LCM_PINNED),  # TCD shares LCM's skipping-step schedule and consistency parametrisation
    # DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095), data prediction, midpoint 2nd-order update,
    # first order at the final step (stable at few steps), sigma 0 at the end.
    "dpmpp": dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
                  euler_at_final=False, use_karras_sigmas=False, final_sigmas_type="zero", thresholding=False,
                  timestep_spacing="leading", steps_offset=1),
    # DDIM (Song et al. 2020), eta 0; final alpha is alphas_cumprod[0] as in SD-1.5's config.
    "ddim": dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1, thresholding=False,
                 timestep_spacing="leading"),
    "euler": dict(interpolation_type="linear", use_karras_sigmas=False, final_sigmas_type="zero",
                  timestep_spacing="leading", steps_offset=1),
}


def _classes():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler, TCDScheduler

    return {"lcm": LCMScheduler, "dpmpp": DPMSolverMultistepScheduler, "ddim": DDIMScheduler,
            "euler": EulerDiscreteScheduler, "tcd": TCDScheduler}


def _no_sync(base, host_timestep: bool):
    """`base` with a loop free of host-device syncs.

    Stock diffusers syncs inside `step()`: the first call finds its index with `(timesteps == t).nonzero()`,
    and LCM/TCD/DDIM index their CPU `alphas_cumprod` with the device tensor `t` and test `prev_t >= 0` on
    it. Here `set_timesteps` keeps a host copy of the timesteps (one copy, before the loop) and sets
    begin_index 0; with `host_timestep`, `step()` sees this step's timestep and the schedule as host
    values, so every table lookup is on the CPU. The math is diffusers' own, unchanged.
    """

    def set_timesteps(self, *args, **kwargs):
        base.set_timesteps(self, *args, **kwargs)
        self._host_timesteps = self.timesteps.cpu()
        self._begin_index = 0
        self._host_step = 0  # our own count: DDIM keeps no step index

    def step(self, model_output, timestep, sample, *args, **kwargs):
        if not host_timestep:
            return base.step(self, model_output, timestep, sample, *args, **kwargs)
        device_timesteps, self.timesteps = self.timesteps, self._host_timesteps
        try:
            return base.step(self, model_output, int(self._host_timesteps[self._host_step]), sample, *args,
                             **kwargs)
        finally:
            self.timesteps = device_timesteps
            self._host_step += 1

    # pipelines inspect these signatures (custom `timesteps`, `eta`, `generator`)
    set_timesteps.__signature__ = inspect.signature(base.set_timesteps)
    step.__signature__ = inspect.signature(base.step)
    return type(base.__name__, (base,), {"set_timesteps": set_timesteps, "step": step,
                                         "__doc__": f"{base.__name__} without host-device syncs in step()."})


_WRAPPED: dict = {}


def scheduler_class(name: str):
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}")
    if name not in _WRAPPED:
        _WRAPPED[name] = _no_sync(_classes()[name], host_timestep=name in ("lcm", "tcd", "ddim"))
    return _WRAPPED[name]


def noise_schedule(model_scheduler_config) -> dict:
    """The model's noise schedule: the only keys taken from its scheduler config."""
    cfg = dict(model_scheduler_config)
    out = {k: cfg[k] for k in NOISE_SCHEDULE_KEYS if cfg.get(k) is not None}
    out.setdefault("prediction_type", "epsilon")
    return out


def pinned_config(name: str, model_scheduler_config, timestep_spacing: str | None = None,
                  original_inference_steps: int | None = None) -> dict:
    """The full, explicit configuration of scheduler `name` for a model with this scheduler config."""
    if name not in PINNED:
        raise ValueError(f"unknown scheduler {name!r}")
    cfg = {**PINNED[name], **noise_schedule(model_scheduler_config)}
    if timestep_spacing and name not in ("lcm", "tcd"):  # LCM/TCD have their own skipping-step schedule
        cfg["timestep_spacing"] = timestep_spacing
        cfg["steps_offset"] = 1 if timestep_spacing == "leading" else 0
    if original_inference_steps and name in ("lcm", "tcd"):
        cfg["original_inference_steps"] = original_inference_steps
    return cfg


def make_scheduler(name: str, model_scheduler_config, **kw):
    """A scheduler `name` (lcm|dpmpp|ddim|euler|tcd) with its pinned config, on the model's noise schedule."""
    return scheduler_class(name).from_config(pinned_config(name, model_scheduler_config, **kw))
