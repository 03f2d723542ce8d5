"""The student of LCD: the teacher's UNet with a peft LoRA (LCM-LoRA arXiv 2311.05556), and its one LCD pass.

One UNet in memory: the teacher is the UNet with its LoRA switched off (`adapters_off`), the student the UNet
with it on, and the target the student itself under stop-gradient, or an EMA copy of the LoRA (`swapped`).
`lora_modules` / `save_tau_lcm` export the LoRA (tau_LCM) through peft's own state dict and lcmtool.lora.io.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch

from lcmtool.distill import lcd
from lcmtool.lora.io import LoraModule, save_lora


def conv_patterns(unet, conv_rank: int, conv_alpha: float) -> tuple[dict, dict]:
    """peft rank_pattern / alpha_pattern giving every 3x3 (non-1x1) conv of `unet` rank conv_rank, alpha conv_alpha."""
    ranks, alphas = {}, {}
    if conv_rank:
        for name, mod in unet.named_modules():
            if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size != (1, 1):
                ranks[re.escape(name)], alphas[re.escape(name)] = conv_rank, conv_alpha
    return ranks, alphas


def add_lora(unet, rank: int, alpha: float, target_modules: list[str], rank_pattern: dict | None = None,
             alpha_pattern: dict | None = None) -> list[torch.nn.Parameter]:
    """Add a gaussian-initialised peft LoRA (B = 0) to the frozen `unet`; -> its parameters, trained in fp32."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules,
                                rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {}))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # LoRA weights train in fp32 (autocast computes in bf16)
    return params


def make_optimizer(params, cfg):
    """AdamW over `params` and diffusers' constant schedule after a linear warm-up (cfg: a DistillConfig)."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    return opt, lr_schedule(opt, cfg.warmup_steps)


def lr_schedule(optimizer, warmup_steps: int):
    """diffusers.optimization's schedule, advanced by one step: optimizer step s (1-based) trains at
    lr * min(1, s / warmup_steps), so that no step runs at lr 0 (diffusers' warm-up starts at 0)."""
    import warnings

    from diffusers.optimization import get_constant_schedule_with_warmup

    sched = get_constant_schedule_with_warmup(optimizer, warmup_steps)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        sched.step()
    return sched


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


def _kwargs(added):
    return {"added_cond_kwargs": added} if added is not None else {}


def lcd_pred_target(unet, raw_unet, z_t, t_start, t_prev, index, w, cond, uncond, added, added_uncond, grid,
                    alphas_cumprod, prediction_type: str, timestep_scaling: float, autocast, lora_params=(), ema=(),
                    teacher=None):
    """Algorithm 1 lines 5-7 on one UNet: returns (f_theta(z_{t_{n+k}}), stop-grad f_theta-(z_hat_{t_n})).

    `unet` is the (possibly DDP-wrapped) student, `raw_unet` the same module unwrapped; the teacher is `raw_unet`
    with its LoRA off (or `teacher`, a frozen copy, when the whole UNet trains), run once on cond and uncond
    concatenated; the target is the student (or its EMA weights `ema` swapped into `lora_params`).
    """
    with torch.no_grad():
        # teacher (LoRA off): cond and uncond in one batch, guided x0 and eps, one DDIM step to t_n
        both = None if added is None else {k: torch.cat([added[k], added_uncond[k]]) for k in added}
        frozen = contextlib.nullcontext() if teacher is not None else adapters_off(raw_unet)
        with frozen, autocast():
            out_t = (teacher or raw_unet)(torch.cat([z_t, z_t]), torch.cat([t_start, t_start]),
                                          encoder_hidden_states=torch.cat([cond, uncond]), **_kwargs(both)).sample
        o_c, o_u = out_t.float().chunk(2)
        x0 = lcd.guided(lcd.predicted_x0(o_c, t_start, z_t, prediction_type, alphas_cumprod),
                        lcd.predicted_x0(o_u, t_start, z_t, prediction_type, alphas_cumprod), w)
        eps = lcd.guided(lcd.predicted_eps(o_c, t_start, z_t, prediction_type, alphas_cumprod),
                         lcd.predicted_eps(o_u, t_start, z_t, prediction_type, alphas_cumprod), w)
        z_prev = grid.ddim_step(x0, eps, index).float()
        # target: f_theta-(z_hat_{t_n}, c, t_n), theta- = stop-grad student (default) or the EMA weights; before
        # the student's forward, so that swapping the EMA weights in and out touches no tensor autograd saved
        with swapped(lora_params, ema), autocast():
            out_tg = raw_unet(z_prev, t_prev, encoder_hidden_states=cond, **_kwargs(added)).sample.float()
        x0_tg = lcd.predicted_x0(out_tg, t_prev, z_prev, prediction_type, alphas_cumprod)
        target = lcd.consistency_output(z_prev, x0_tg, t_prev, timestep_scaling)
    # student: f_theta(z_{t_{n+k}}, c, t_{n+k}) = c_skip z + c_out x0 (the LCM boundary condition)
    with autocast():
        out_s = unet(z_t, t_start, encoder_hidden_states=cond, **_kwargs(added)).sample
    x0_s = lcd.predicted_x0(out_s.float(), t_start, z_t, prediction_type, alphas_cumprod)
    pred = lcd.consistency_output(z_t, x0_s, t_start, timestep_scaling)
    return pred, target


def lora_modules(unet, adapter: str = "default") -> dict[str, LoraModule]:
    """The UNet's peft LoRA -> {diffusers module path: LoraModule(A, B, alpha)} (fp32, CPU), read through
    peft's get_peft_model_state_dict; alpha per module from the adapter's alpha_pattern as peft resolves it."""
    from peft.utils import get_peft_model_state_dict
    from peft.utils.other import get_pattern_key

    config = unet.peft_config[adapter]
    state = get_peft_model_state_dict(unet, adapter_name=adapter)
    out = {}
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[: -len(".lora_A.weight")]
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
        out[name] = LoraModule(a.detach().to("cpu", torch.float32),
                               state[f"{name}.lora_B.weight"].detach().to("cpu", torch.float32), float(alpha))
    return out


def save_tau_lcm(unet, path: Path, fmt: str, family: str, dtype, metadata: dict) -> str:
    """Write tau_LCM (the LoRA) atomically via lcmtool.lora.io in `fmt` (kohya by default); -> the format."""
    import json

    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()}
    save_lora(lora_modules(unet), path, format=fmt, family=family, metadata=meta, dtype=dtype)
    return fmt
