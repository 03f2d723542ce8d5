"""The standard denoising loss of fine-tuning (DDPM, Ho et al. 2020; v-prediction, Salimans & Ho 2022)."""
from __future__ import annotations

import torch


def denoising_target(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                     prediction_type: str) -> torch.Tensor:
    """What the UNet regresses at z_t = alpha x0 + sigma eps: eps (epsilon) or v = alpha eps - sigma x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type != "v_prediction":
        raise ValueError(f"prediction type {prediction_type!r} is not epsilon or v_prediction")
    abar = alphas_cumprod.to(x0.device)[timesteps.to(x0.device).long()].to(torch.float32)
    abar = abar.reshape(-1, *([1] * (x0.ndim - 1)))
    return abar.sqrt() * noise - (1 - abar).sqrt() * x0
