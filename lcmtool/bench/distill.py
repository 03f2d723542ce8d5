"""Training-speed bench for LCD: samples/s and peak memory of our step vs the plain reference loop.

Ours (trainer.lcd_pred_target): one UNet in memory, the teacher is the UNet with its LoRA off, run once on cond and
uncond concatenated. Reference (as the diffusers train_lcm_distill_lora_*.py scripts): a separate frozen teacher
UNet, called twice (cond, then uncond), then the target with the student under no_grad. Both run the same
student forward/backward and AdamW step. On CUDA: real SD-1.5 (512 px) / SDXL (1024 px) architectures with random
weights from lcmtool/presets; on CPU: the tiny demo architectures (the numbers then only check the plumbing).
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


def bench_distill(families=("sd15", "sdxl"), device: str | None = None, batch: dict | None = None, steps: int = 10,
                  warmup: int = 3, rank: int = 64, modes=("lcmtool", "reference"), log=print) -> list[dict]:
    """One row per (family, mode): samples/s, ms/step, peak memory (GiB, CUDA only)."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    from lcmtool.demo.arch import SD15_SCHEDULER
    from lcmtool.distill import lcd
    from lcmtool.engines.distill import LCM_LORA_TARGETS, lcd_pred_target

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    batch = batch or ({"sd15": 16, "sdxl": 4} if cuda else {"sd15": 4, "sdxl": 4})
    dtype = torch.bfloat16 if cuda else torch.float32
    abar = DDPMScheduler.from_config(SD15_SCHEDULER).alphas_cumprod.double()
    grid = lcd.SkippingGrid(abar)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def run(family: str, mode: str) -> dict:
        config, lat, text_dim, pooled_dim = _unet_config(family, cuda)
        bsz = batch[family]
        torch.manual_seed(0)
        with torch.device(device):
            unet = UNet2DConditionModel(**config).to(dtype)
        unet.requires_grad_(False)
        teacher = copy.deepcopy(unet) if mode == "reference" else None
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=LCM_LORA_TARGETS))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        if family != "sd15":
            unet.enable_gradient_checkpointing()
        opt = torch.optim.AdamW(params, lr=1e-5)
        z = torch.randn(bsz, 4, lat, lat, device=device)
        cond = torch.randn(bsz, 77 if cuda else 24, text_dim, device=device, dtype=dtype)
        uncond = torch.zeros_like(cond)
        added = added_u = None
        if pooled_dim:
            res = lat * 8
            time_ids = torch.tensor([[res, res, 0, 0, res, res]] * bsz, device=device, dtype=dtype)
            added = {"text_embeds": torch.randn(bsz, pooled_dim, device=device, dtype=dtype), "time_ids": time_ids}
            added_u = {"text_embeds": torch.zeros_like(added["text_embeds"]), "time_ids": time_ids}

        def step():
            index = torch.randint(0, len(grid), (bsz,), device=device)
            t, t_prev = grid.start_and_target_timesteps(index)
            w = torch.rand(bsz, device=device) * 10 + 5
            z_t = lcd.add_noise(z, torch.randn_like(z), t, abar)
            if mode == "lcmtool":
                pred, target = lcd_pred_target(unet, unet, z_t, t, t_prev, index, w, cond, uncond, added, added_u,
                                               grid, abar, "epsilon", 10.0, autocast)
            else:
                kw = {"added_cond_kwargs": added} if added else {}
                kw_u = {"added_cond_kwargs": added_u} if added else {}
                with autocast():
                    out = unet(z_t, t, encoder_hidden_states=cond, **kw).sample.float()
                pred = lcd.consistency_output(z_t, lcd.predicted_x0(out, t, z_t, "epsilon", abar), t)
                with torch.no_grad(), autocast():
                    oc = teacher(z_t, t, encoder_hidden_states=cond, **kw).sample.float()
                    ou = teacher(z_t, t, encoder_hidden_states=uncond, **kw_u).sample.float()
                    x0 = lcd.guided(lcd.predicted_x0(oc, t, z_t, "epsilon", abar),
                                    lcd.predicted_x0(ou, t, z_t, "epsilon", abar), w)
                    z_prev = grid.ddim_step(x0, lcd.guided(oc, ou, w), index).float()
                    ot = unet(z_prev, t_prev, encoder_hidden_states=cond, **kw).sample.float()
                    target = lcd.consistency_output(z_prev, lcd.predicted_x0(ot, t_prev, z_prev, "epsilon", abar),
                                                    t_prev)
            loss = lcd.distance(pred, target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        row = {"bench": "distill", "family": family, "mode": mode, "device": device,
               "arch": "real" if cuda else "tiny-demo", "batch": bsz, "resolution": lat * 8, "lora_rank": rank,
               "samples_per_s": bsz * steps / dt, "ms_per_step": 1000 * dt / steps,
               "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
               "gradient_checkpointing": family != "sd15"}
        return row

    rows = []
    for family in families:
        for mode in modes:
            rows.append(run(family, mode))
            log(rows[-1])
            if cuda:
                torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    bench_distill(log=lambda r: print(json.dumps(r), flush=True))
