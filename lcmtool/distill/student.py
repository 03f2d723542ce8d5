"""The student of LCD: the teacher's UNet with a peft LoRA (LCM-LoRA arXiv 2311.05556), and its one LCD pass.

One UNet in memory: the teacher is the UNet with its LoRA switched off (`adapters_off`), the student the UNet
with it on, and the target the student itself under stop-gradient, or an EMA copy of the LoRA (`swapped`).
`lora_modules` / `save_tau_lcm` export the LoRA (tau_LCM) through peft's own state dict and lcmtool.lora.io;
`add_lora_from` starts the LoRA from a file. Full LCD (`add_full`, the LCM paper's setting): the whole UNet
trains against a frozen copy, and `extract_lora` writes its change as a LoRA by SVD.
"""
from __future__ import annotations

import contextlib
import copy
import re
from collections import Counter
from pathlib import Path

import torch

from lcmtool.distill import lcd
from lcmtool.lora.io import LoraFile, LoraModule, save_lora


def conv_patterns(unet, conv_rank: int, conv_alpha: float, target_modules: list[str]) -> tuple[dict, dict]:
    """peft rank_pattern / alpha_pattern giving every targeted 3x3 (non-1x1) conv of `unet` rank conv_rank, alpha
    conv_alpha (only targeted ones: peft warns of every pattern key that matches no LoRA module)."""
    ranks, alphas = {}, {}
    if conv_rank:
        for name, mod in unet.named_modules():
            targeted = any(name == t or name.endswith("." + t) for t in target_modules)
            if targeted and isinstance(mod, torch.nn.Conv2d) and mod.kernel_size != (1, 1):
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


def add_lora_from(unet, lora: LoraFile) -> list[torch.nn.Parameter]:
    """`lora`'s UNet modules as a peft LoRA on `unet`, with the file's ranks and alphas and its factors loaded
    through peft's set_peft_model_state_dict: at step 0 the student is base + the file's delta exactly."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    modules = {n: m.loaded() for n, m in lora.modules.items() if not n.startswith(("text_encoder.", "text_encoder_2."))}
    if not modules:
        raise ValueError(f"{lora.path}: no UNet module to start from")
    rank = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
    ranks = {re.escape(n): m.rank for n, m in modules.items() if m.rank != rank}
    alphas = {re.escape(n): m.alpha for n, m in modules.items() if m.alpha != alpha}
    params = add_lora(unet, rank, alpha, sorted(modules), ranks, alphas)
    shapes = {k: v.shape for k, v in get_peft_model_state_dict(unet).items()}
    state = {}
    for n, m in modules.items():
        state[f"{n}.lora_A.weight"] = m.A.float().reshape(shapes[f"{n}.lora_A.weight"])
        state[f"{n}.lora_B.weight"] = m.B.float().reshape(shapes[f"{n}.lora_B.weight"])
    result = set_peft_model_state_dict(unet, state)
    if result.unexpected_keys:
        raise ValueError(f"{lora.path}: peft did not take {result.unexpected_keys[:3]}")
    return params


def add_full(unet, teacher_dtype) -> tuple[list[torch.nn.Parameter], torch.nn.Module]:
    """Full LCD: every UNet weight trains (fp32 master weights); -> (its parameters, a frozen teacher copy in
    `teacher_dtype`, on the UNet's device)."""
    teacher = copy.deepcopy(unet).requires_grad_(False).to(dtype=teacher_dtype).eval()
    unet.requires_grad_(True)
    unet.float()
    return list(unet.parameters()), teacher


def targeted(name: str, target_modules: list[str]) -> bool:
    """peft's rule for a list of target names: the module's path is one of them or ends with '.<one of them>'."""
    return any(name == t or name.endswith("." + t) for t in target_modules)


def fro_rank(delta: torch.Tensor, fro: float) -> int:
    """The smallest rank whose truncated SVD keeps `fro` of the Frobenius norm of `delta` ([out, ...] flattened to
    [out, in]): kohya resize_lora's sv_fro rule, sqrt(sum of the first k sigma^2 / sum of all) >= fro."""
    s2 = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1).double()) ** 2
    kept = torch.cumsum(s2, 0) / s2.sum()
    return min(int(torch.searchsorted(kept, torch.tensor(fro * fro, dtype=kept.dtype)).item()) + 1, len(s2))


# Calibrated extract (extract_calibrate): each module's input second moment plus this fraction of its mean diagonal
# times I, so that a direction the calibration never excites still counts a little (GPTQ's damping of the Hessian)
CALIBRATION_DAMP = 0.01
CALIBRATION_STEPS = (2, 4, 8)  # the LCM step counts the calibration samples at
# Inputs (a conv's: in channels x kh x kw) of at most this many features get their full second moment [d, d] (64 MB in
# fp32 at 4096); wider ones only its diagonal (each feature's mean square), which keeps SD-1.5's widest convs cheap
CALIBRATION_FULL_MAX = 4096


def extracted(unet, target_modules: list[str]):
    """(path, module) of every Linear / Conv2d of `unet` that `target_modules` picks (what extract_lora covers)."""
    for name, mod in unet.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and targeted(name, target_modules):
            yield name, mod


def conv_input_power(x: torch.Tensor, conv: torch.nn.Conv2d) -> tuple[torch.Tensor, int]:
    """Sum over the batch and output positions of x^2 per (in channel, ky, kx): the diagonal of the second moment
    of `conv`'s unfolded input patches (F.unfold's order, the flattened weight's) without unfolding; -> (sum, n)."""
    import torch.nn.functional as F

    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ph, pw = conv.padding if isinstance(conv.padding, tuple) else (conv.padding, conv.padding)
    x2 = F.pad(x.float().pow(2), (pw, pw, ph, ph))
    ho = (x2.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (x2.shape[3] - dw * (kw - 1) - 1) // sw + 1
    out = x2.new_zeros(x.shape[1], kh, kw)
    for i in range(kh):
        for j in range(kw):
            win = x2[:, :, i * dh: i * dh + (ho - 1) * sh + 1: sh, j * dw: j * dw + (wo - 1) * sw + 1: sw]
            out[:, i, j] = win.sum((0, 2, 3))
    return out.reshape(-1), x.shape[0] * ho * wo


def input_rows(x: torch.Tensor, mod) -> torch.Tensor:
    """`mod`'s input as rows of its flattened weight's input features: tokens of a Linear, a conv's unfolded patches."""
    import torch.nn.functional as F

    if isinstance(mod, torch.nn.Conv2d):
        cols = F.unfold(x.float(), mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.float().reshape(-1, x.shape[-1])


def input_moments(unet, target_modules: list[str], run) -> dict[str, torch.Tensor]:
    """The second moment E[x x^T] of the inputs of every module extract_lora covers while `run()` drives `unet`
    (forward hooks; over every token of a Linear, every input patch of a conv, in the flattened weight's feature
    order): [d, d] for d <= CALIBRATION_FULL_MAX features, else its diagonal [d]. fp32, CPU."""
    sums, counts, hooks = {}, {}, []

    def hook(name):
        def record(mod, args, _out):
            x = args[0].detach()
            d = mod.weight[0].numel()
            if d <= CALIBRATION_FULL_MAX:  # a conv's patches one image at a time (an SDXL batch would be GBs)
                s, n = 0, 0
                for xi in (x.split(1) if isinstance(mod, torch.nn.Conv2d) else (x,)):
                    rows = input_rows(xi, mod)
                    s, n = s + rows.T @ rows, n + rows.shape[0]
            elif isinstance(mod, torch.nn.Conv2d):
                s, n = conv_input_power(x, mod)
            else:
                s, n = x.float().pow(2).reshape(-1, d).sum(0), x[..., 0].numel()
            sums[name] = sums[name] + s if name in sums else s
            counts[name] = counts.get(name, 0) + n
        return record

    for name, mod in extracted(unet, target_modules):
        hooks.append(mod.register_forward_hook(hook(name)))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return {n: (sums[n].double() / counts[n]).float().cpu() for n in sums}


def whitening(moment: torch.Tensor) -> torch.Tensor:
    """The factor S of the damped second moment M + CALIBRATION_DAMP * mean(diag M) * I = S S^T: lower-triangular
    (Cholesky) for a full [d, d] moment, the square roots [d] for a diagonal one. ||delta S||_F^2 is then the
    layer's mean squared output change E||delta x||^2 (plus the damping term)."""
    m = moment.double()
    if m.ndim == 1:
        return (m + CALIBRATION_DAMP * m.mean()).sqrt()
    return torch.linalg.cholesky(m + CALIBRATION_DAMP * m.diagonal().mean() * torch.eye(len(m), dtype=m.dtype))


def whiten(delta: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """delta [out, d] @ S (S from `whitening`)."""
    return (delta.double() * s if s.ndim == 1 else delta.double() @ s).float()


def unwhiten(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """a [r, d] @ S^-1: the down factor of the unweighted change."""
    if s.ndim == 1:
        return (a.double() / s).float()
    return torch.linalg.solve_triangular(s, a.double(), upper=False, left=False).float()


def budget_ranks(spectra: dict[str, torch.Tensor], costs: dict[str, int], caps: dict[str, int],
                 budget: int) -> dict[str, int]:
    """Ranks for a size budget, allocated globally: every module keeps its first singular direction, then the others
    are taken by sigma^2 per stored value (cost: out + in values per rank), largest first, while they fit `budget`
    values, at most `caps[module]` per module; -> {module: rank}. ValueError when rank 1 everywhere does not fit."""
    ranks = {n: 1 for n in spectra}
    used = sum(costs[n] for n in spectra)
    if used > budget:
        raise ValueError(f"rank 1 on every module needs {used} values, over the budget of {budget}")
    gains = [(float(s[i]) ** 2 / costs[n], n) for n, s in spectra.items() for i in range(1, min(caps[n], len(s)))]
    for _, n in sorted(gains, key=lambda g: -g[0]):
        if used + costs[n] <= budget:  # a module's later directions cost the same, so they stay in order
            ranks[n] += 1
            used += costs[n]
    return ranks


def extract_lora(student, teacher, target_modules: list[str], rank: int, conv_rank: int = 0,
                 fro: float = 0.0, moments: dict[str, torch.Tensor] | None = None,
                 budget: int = 0) -> tuple[dict[str, LoraModule], float]:
    """The change student - teacher of every targeted Linear / Conv2d weight as a low-rank LoRA; -> (modules, worst
    relative Frobenius error, in the calibrated norm when `moments` are given). Norms and biases are not in a LoRA.

    Rank: `rank` (`conv_rank` for convs with a kernel larger than 1x1 when given); with `fro` > 0 each module's
    fro_rank, at most that; with `budget` > 0 (values stored, both factors) budget_ranks over every module, at most
    that. With `moments` (input_moments of the student, a calibration), the SVD is of delta @ S (`whitening`), so the
    truncation keeps what changes the layer's output on the calibration inputs (activation-aware SVD), and the down
    factor is multiplied by S^-1. lcmtool.lora.math.svd of the (whitened) delta, written as one term B = I,
    A = delta."""
    from lcmtool.lora.math import svd

    base = dict(teacher.named_modules())
    deltas, whites, caps = {}, {}, {}
    for name, mod in extracted(student, target_modules):
        delta = mod.weight.detach().float().cpu() - base[name].weight.detach().float().cpu()
        if not delta.any():
            continue
        caps[name] = conv_rank if conv_rank and delta.ndim == 4 and delta.shape[-2:] != (1, 1) else rank
        moment = (moments or {}).get(name)
        if moment is not None and float(moment.diagonal().mean() if moment.ndim == 2 else moment.mean()) > 0:
            # (a module the calibration never ran, or fed only zeros, keeps the plain SVD)
            whites[name] = whitening(moment)
            delta = whiten(delta.reshape(delta.shape[0], -1), whites[name]).reshape(delta.shape)
        deltas[name] = delta
    if budget:
        spectra = {n: torch.linalg.svdvals(d.reshape(d.shape[0], -1).double()) for n, d in deltas.items()}
        costs = {n: d.shape[0] + d[0].numel() for n, d in deltas.items()}
        caps = budget_ranks(spectra, costs, caps, budget)
    out, worst = {}, 0.0
    for name, delta in deltas.items():
        r = min(caps[name], fro_rank(delta, fro)) if fro else caps[name]
        eye = torch.eye(delta.shape[0]).reshape(delta.shape[0], delta.shape[0], *([1] * (delta.ndim - 2)))
        m, err = svd(name, [(LoraModule(A=delta, B=eye, alpha=float(delta.shape[0])), 1.0)], r)
        if name in whites:
            a = unwhiten(m.A.reshape(m.A.shape[0], -1), whites[name]).reshape(m.A.shape)
            m = LoraModule(A=a.contiguous(), B=m.B, alpha=m.alpha)
        out[name], worst = m, max(worst, err)
    return out, worst


def extract_values(unet, target_modules: list[str]) -> int:
    """Values a rank-1 extract of every module extract_lora covers stores (out + in per module)."""
    return sum(m.weight.shape[0] + m.weight[0].numel() for _, m in extracted(unet, target_modules))


def save_unet(unet, folder: Path, dtype) -> None:
    """`unet` as a diffusers model folder (safetensors, `dtype`), published atomically (it is cast in place)."""
    from lcmtool.fileio import atomic_dir

    with atomic_dir(folder) as tmp:
        unet.to("cpu", dtype).save_pretrained(str(tmp), safe_serialization=True)


def make_optimizer(params, cfg):
    """AdamW over `params` and diffusers' warm-up schedule (cfg: a DistillConfig)."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    return opt, lr_schedule(opt, cfg.warmup_steps, cfg.lr_schedule, cfg.max_steps)


def lr_schedule(optimizer, warmup_steps: int, kind: str = "constant", max_steps: int = 0):
    """diffusers.optimization's linear warm-up then constant or cosine decay (over max_steps + 1 steps),
    advanced by one step: optimizer step s (1-based) trains at lr * lambda(s), so that no step runs at lr 0
    (diffusers' warm-up starts at 0, its cosine ends at 0)."""
    import warnings

    from diffusers.optimization import get_scheduler

    name = {"constant": "constant_with_warmup", "cosine": "cosine"}[kind]
    sched = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps + 1)
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


def save_tau_lcm(unet, path: Path, fmt: str, family: str, dtype, metadata: dict,
                 modules: dict[str, LoraModule] | None = None) -> str:
    """Write tau_LCM atomically via lcmtool.lora.io in `fmt` (kohya by default): `unet`'s peft LoRA, or `modules`
    (e.g. extract_lora's); metadata values that are not strings are written as JSON. -> the format."""
    import json

    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()}
    save_lora(modules if modules is not None else lora_modules(unet), path, format=fmt, family=family, metadata=meta,
              dtype=dtype)
    return fmt
