"""Training-speed bench for LCD: samples/s and peak memory of our step vs the plain reference loop.

Ours (lcmtool.distill.student.lcd_pred_target): one UNet in memory, the teacher is the UNet with its LoRA off,
run once on cond and uncond concatenated. Reference (as the diffusers train_lcm_distill_lora_*.py scripts): a
separate frozen teacher UNet, called twice (cond, then uncond), then the target with the student under no_grad.
Both run the same student forward/backward and AdamW step. On CUDA: real SD-1.5 (512 px) / SDXL (1024 px)
architectures with random weights from lcmtool/presets; on CPU: the tiny demo architectures (the numbers then only
check the plumbing).
"""
from __future__ import annotations

import contextlib
import copy
import json
import time


def _unet_config(family: str, cuda: bool) -> tuple[dict, int, int, int | None]:
    """(UNet config, latent size, text width, pooled width or None)."""
    if cuda:
        from lcmtool.lora.io import unet_preset

        cfg = unet_preset(family)
        if family == "sd15":
            return cfg, 64, cfg["cross_attention_dim"], None
        return cfg, 128, cfg["cross_attention_dim"], 1280
    from lcmtool.demo import arch

    if family == "sd15":
        return dict(arch.SD_UNET_CONFIG), 8, arch.SD_UNET_CONFIG["cross_attention_dim"], None
    return dict(arch.XL_UNET_CONFIG), 8, arch.XL_UNET_CONFIG["cross_attention_dim"], arch.XL_POOLED_DIM


_BATCH = {True: {"sd15": 16, "sdxl": 4}, False: {"sd15": 4, "sdxl": 4}}  # per family, on CUDA / on CPU


def _student(family: str, mode: str, device: str, dtype, rank: int, cuda: bool, bsz: int) -> dict:
    """The random-weight UNet with a rank-`rank` LoRA (and, for the reference, a frozen teacher copy), its
    optimizer, and one fixed batch of inputs."""
    import torch
    from diffusers import UNet2DConditionModel

    from lcmtool.distill.student import add_lora
    from lcmtool.lora.formats import LCM_TARGETS

    config, lat, text_dim, pooled_dim = _unet_config(family, cuda)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**config).to(dtype)
    unet.requires_grad_(False)
    teacher = copy.deepcopy(unet) if mode == "reference" else None
    params = add_lora(unet, rank, rank, list(LCM_TARGETS))
    if family != "sd15":
        unet.enable_gradient_checkpointing()
    cond = torch.randn(bsz, 77 if cuda else 24, text_dim, device=device, dtype=dtype)
    added = added_u = None
    if pooled_dim:
        res = lat * 8
        time_ids = torch.tensor([[res, res, 0, 0, res, res]] * bsz, device=device, dtype=dtype)
        added = {"text_embeds": torch.randn(bsz, pooled_dim, device=device, dtype=dtype), "time_ids": time_ids}
        added_u = {"text_embeds": torch.zeros_like(added["text_embeds"]), "time_ids": time_ids}
    return dict(unet=unet, teacher=teacher, params=params, opt=torch.optim.AdamW(params, lr=1e-5), bsz=bsz,
                z=torch.randn(bsz, 4, lat, lat, device=device), cond=cond, uncond=torch.zeros_like(cond),
                added=added, added_u=added_u, lat=lat)


def _reference_pred_target(s: dict, z_t, t, t_prev, index, w, grid, abar, autocast):
    """The diffusers scripts' way: the student, then the separate teacher twice (cond, uncond), then the target."""
    import torch

    from lcmtool.distill import lcd

    unet, teacher = s["unet"], s["teacher"]
    kw = {"added_cond_kwargs": s["added"]} if s["added"] else {}
    kw_u = {"added_cond_kwargs": s["added_u"]} if s["added"] else {}
    with autocast():
        out = unet(z_t, t, encoder_hidden_states=s["cond"], **kw).sample.float()
    pred = lcd.consistency_output(z_t, lcd.predicted_x0(out, t, z_t, "epsilon", abar), t)
    with torch.no_grad(), autocast():
        oc = teacher(z_t, t, encoder_hidden_states=s["cond"], **kw).sample.float()
        ou = teacher(z_t, t, encoder_hidden_states=s["uncond"], **kw_u).sample.float()
        x0 = lcd.guided(lcd.predicted_x0(oc, t, z_t, "epsilon", abar), lcd.predicted_x0(ou, t, z_t, "epsilon", abar),
                        w)
        z_prev = grid.ddim_step(x0, lcd.guided(oc, ou, w), index).float()
        ot = unet(z_prev, t_prev, encoder_hidden_states=s["cond"], **kw).sample.float()
        target = lcd.consistency_output(z_prev, lcd.predicted_x0(ot, t_prev, z_prev, "epsilon", abar), t_prev)
    return pred, target


def _train_step(s: dict, mode: str, grid, abar, device: str, autocast) -> None:
    import torch

    from lcmtool.distill import lcd
    from lcmtool.distill.student import lcd_pred_target

    bsz, z = s["bsz"], s["z"]
    index = torch.randint(0, len(grid), (bsz,), device=device)
    t, t_prev = grid.start_and_target_timesteps(index)
    w = torch.rand(bsz, device=device) * 10 + 5
    z_t = lcd.add_noise(z, torch.randn_like(z), t, abar)
    if mode == "lcmtool":
        pred, target = lcd_pred_target(s["unet"], s["unet"], z_t, t, t_prev, index, w, s["cond"], s["uncond"],
                                       s["added"], s["added_u"], grid, abar, "epsilon", 10.0, autocast)
    else:
        pred, target = _reference_pred_target(s, z_t, t, t_prev, index, w, grid, abar, autocast)
    loss = lcd.distance(pred, target)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(s["params"], 1.0)
    s["opt"].step()
    s["opt"].zero_grad(set_to_none=True)


def bench_distill(families=("sd15", "sdxl"), device: str | None = None, batch: dict | None = None, steps: int = 10,
                  warmup: int = 3, rank: int = 64, modes=("lcmtool", "reference"), log=print) -> list[dict]:
    """One row per (family, mode): samples/s, ms/step, peak memory (GiB, CUDA only)."""
    import torch
    from diffusers import DDPMScheduler

    from lcmtool.demo.arch import SD15_SCHEDULER
    from lcmtool.distill import lcd

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    abar = DDPMScheduler.from_config(SD15_SCHEDULER).alphas_cumprod.double()
    grid = lcd.SkippingGrid(abar)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    rows = []
    for family in families:
        for mode in modes:
            s = _student(family, mode, device, dtype, rank, cuda, (batch or _BATCH[cuda])[family])
            for _ in range(warmup):
                _train_step(s, mode, grid, abar, device, autocast)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(steps):
                _train_step(s, mode, grid, abar, device, autocast)
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            rows.append({"bench": "distill", "family": family, "mode": mode, "device": device,
                         "arch": "real" if cuda else "tiny-demo", "batch": s["bsz"], "resolution": s["lat"] * 8,
                         "lora_rank": rank, "samples_per_s": s["bsz"] * steps / dt, "ms_per_step": 1000 * dt / steps,
                         "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
                         "gradient_checkpointing": family != "sd15"})
            log(rows[-1])
            if cuda:
                torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    bench_distill(log=lambda r: print(json.dumps(r), flush=True))
