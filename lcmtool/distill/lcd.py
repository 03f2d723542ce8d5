"""Pure latent consistency distillation math (LCM paper Algorithm 1; LCM-LoRA arXiv 2311.05556 sec. 3).

Tensors in, tensors out: no model code here. Names follow the papers and diffusers' LCMScheduler / the
diffusers `train_lcm_distill_*` scripts, whose conventions a released LCM-LoRA must match to sample
correctly with stock LCMScheduler, ComfyUI and A1111.
"""
from __future__ import annotations

import torch

SIGMA_DATA = 0.5         # LCMScheduler.get_scalings_for_boundary_condition_discrete: self.sigma_data = 0.5
TIMESTEP_SCALING = 10.0  # LCMScheduler config default `timestep_scaling=10.0`


def scalings_for_boundary_conditions(timestep: torch.Tensor, sigma_data: float = SIGMA_DATA,
                                     timestep_scaling: float = TIMESTEP_SCALING) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip(t), c_out(t) of the consistency boundary condition f(z, t) = c_skip z + c_out x0 (LCM eq. 9)."""
    scaled = timestep_scaling * timestep.double() if torch.is_tensor(timestep) else timestep_scaling * timestep
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5
    return c_skip, c_out


def _bcast(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[timesteps] shaped [B, 1, 1, ...] to broadcast against `like` (float32 or better)."""
    out = values.to(like.device)[timesteps.to(like.device).long()]
    if like.dtype in (torch.float16, torch.bfloat16):
        out = out.float()  # schedule values stay fp32 even for half-precision samples
    elif like.is_floating_point():
        out = out.to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def predicted_x0(model_output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor, prediction_type: str,
                 alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x0 from the model output: eps -> (z - sigma eps) / alpha; v -> alpha z - sigma v (alpha = sqrt(abar))."""
    alpha = _bcast(alphas_cumprod.sqrt(), timesteps, sample)
    sigma = _bcast((1 - alphas_cumprod).sqrt(), timesteps, sample)
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    elif prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output
    else:
        raise ValueError(f"unsupported prediction type {prediction_type!r} (expected epsilon or v_prediction)")


def predicted_eps(model_output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor, prediction_type: str,
                  alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """eps from the model output: eps -> itself; v -> alpha v + sigma z."""
    if prediction_type == "epsilon":
        return model_output
    elif prediction_type == "v_prediction":
        alpha = _bcast(alphas_cumprod.sqrt(), timesteps, sample)
        sigma = _bcast((1 - alphas_cumprod).sqrt(), timesteps, sample)
        return alpha * model_output + sigma * sample
    else:
        raise ValueError(f"unsupported prediction type {prediction_type!r} (expected epsilon or v_prediction)")


class SkippingGrid:
    """The DDIM solver grid of LCD: N solver steps over T training steps, skipping interval k = T // N.

    t_n = (n + 1) k - 1 for n = 0..N-1 (t = 19, 39, ..., 999 for T=1000, N=50), exactly as diffusers'
    DDIMSolver in train_lcm_distill_*.py; the step from t_n to t_n - k lands on the previous grid point.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50):
        if num_train_timesteps % num_ddim_timesteps:
            raise ValueError(f"num_ddim_timesteps {num_ddim_timesteps} must divide {num_train_timesteps}")
        self.k = num_train_timesteps // num_ddim_timesteps
        self.alphas_cumprod = alphas_cumprod.double()
        self.timesteps = torch.arange(1, num_ddim_timesteps + 1, dtype=torch.long) * self.k - 1
        # alpha-bar at the step's destination t_{n-1} (alpha-bar_0 for the first grid point: x0 itself)
        prev = torch.cat([self.alphas_cumprod[:1], self.alphas_cumprod[self.timesteps[:-1]]])
        self.alphas_cumprod_prev = prev

    def __len__(self) -> int:
        return len(self.timesteps)

    def start_and_target_timesteps(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t_{n+k} (where the student sees the noisy latent) and t_n = max(t_{n+k} - k, 0) (the target's)."""
        start = self.timesteps.to(index.device)[index]
        return start, (start - self.k).clamp(min=0)

    def ddim_step(self, pred_x0: torch.Tensor, pred_eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """One deterministic DDIM step (eta 0) from t_{n+k} to t_n: sqrt(abar') x0 + sqrt(1 - abar') eps."""
        abar_prev = _bcast(self.alphas_cumprod_prev, index, pred_x0)
        return abar_prev.sqrt() * pred_x0 + (1 - abar_prev).sqrt() * pred_eps


def add_noise(z: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """z_t ~ N(alpha(t) z, sigma(t)^2 I), as DDPMScheduler.add_noise."""
    alpha = _bcast(alphas_cumprod.sqrt(), timesteps, z)
    sigma = _bcast((1 - alphas_cumprod).sqrt(), timesteps, z)
    return alpha * z + sigma * noise


def guided(cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Classifier-free guided teacher: (1 + w) cond - w uncond = cond + w (cond - uncond) (Algorithm 1 line 6)."""
    w = w.reshape(-1, *([1] * (cond.ndim - 1))).to(cond.dtype)
    return cond + w * (cond - uncond)


def consistency_output(sample: torch.Tensor, pred_x0: torch.Tensor, timesteps: torch.Tensor,
                       timestep_scaling: float = TIMESTEP_SCALING) -> torch.Tensor:
    """f(z_t, t) = c_skip(t) z_t + c_out(t) x0(z_t, t) with the boundary scalings above."""
    c_skip, c_out = scalings_for_boundary_conditions(timesteps, timestep_scaling=timestep_scaling)
    shape = (-1, *([1] * (sample.ndim - 1)))
    c_skip = c_skip.to(sample.device, torch.float32).reshape(shape)
    c_out = c_out.to(sample.device, torch.float32).reshape(shape)
    return c_skip * sample.float() + c_out * pred_x0.float()


def distance(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "huber",
             huber_c: float = 0.001) -> torch.Tensor:
    """d(., .) of Algorithm 1: pseudo-Huber sqrt(d^2 + c^2) - c (mean over elements) or L2 (MSE)."""
    diff = pred.float() - target.float()
    if loss_type == "huber":
        return (torch.sqrt(diff ** 2 + huber_c ** 2) - huber_c).mean()
    elif loss_type == "l2":
        return (diff ** 2).mean()
    else:
        raise ValueError(f"unknown loss type {loss_type!r} (expected huber or l2)")


def sample_guidance(generator: torch.Generator, n: int, w_min: float, w_max: float) -> torch.Tensor:
    """w ~ U[w_min, w_max] (Algorithm 1 line 4)."""
    return torch.rand(n, generator=generator) * (w_max - w_min) + w_min


def draw(generator: torch.Generator, grid: SkippingGrid, shape: tuple, w_min: float, w_max: float):
    """Algorithm 1 lines 3-4 for a batch of latents of `shape`, in this order from `generator`: n ~ U{0..N-1} on
    the skipping grid, w ~ U[w_min, w_max], the noise; -> (index, t_{n+k}, t_n, w, noise)."""
    n = shape[0]
    index = torch.randint(0, len(grid), (n,), generator=generator)
    t_start, t_prev = grid.start_and_target_timesteps(index)
    w = sample_guidance(generator, n, w_min, w_max)
    return index, t_start, t_prev, w, torch.randn(shape, generator=generator)
