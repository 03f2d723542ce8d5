"""Task arithmetic over LoRAs (paper eq. 3: tau'_LCM = lambda1 * tau' + lambda2 * tau_LCM), pure tensor math.

A term is (LoraModule, weight). Every function computes in fp32 and returns factors in fp32.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from lcmtool.errors import LcmError
from lcmtool.lora.io import LoraFile, LoraModule

Term = tuple[LoraModule, float]


def _flat(m: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out, r], A [r, in*kh*kw]) in fp32 (a lazy module's factors are read now)."""
    m = m.loaded()
    return m.B.float().reshape(m.B.shape[0], m.rank), m.A.float().reshape(m.rank, -1)


def check_terms(name: str, terms: list[Term]) -> tuple[list[Term], tuple]:
    """Drop zero-weight terms; all terms must modify a weight of one shape (1x1 conv == linear). -> (terms, shape)."""
    shape = None
    for m, _ in terms:
        s = tuple(m.out_shape)
        s_cmp = s[:2] if len(s) == 4 and s[2:] == (1, 1) else s
        if shape is None:
            shape, shape_cmp = s, s_cmp
        elif s_cmp != shape_cmp:
            raise LcmError(f"shape conflict in module '{name}': {list(shape)} vs {list(s)}")
        if len(s) > len(shape):
            shape = s  # prefer the conv shape [out, in, 1, 1] when a 1x1 conv meets its linear twin
    return [(m, w) for m, w in terms if w != 0.0], shape


def concat(name: str, terms: list[Term]) -> LoraModule | None:
    """Exact merge by concatenation along the rank: sum_i w_i * dW_i = B' @ A' with alpha' = r' (scale 1).

    c_i = w_i * alpha_i / r_i; B' = [sqrt|c_i| B_i], A' = [sign(c_i) sqrt|c_i| A_i]. The scale is carried by the
    factors and alpha' equals the merged rank, so every loader that reads alpha / lora_down.shape[0] per module
    gets exactly 1. Returns None when every weight is zero.
    """
    terms, shape = check_terms(name, terms)
    if not terms:
        return None
    bs, as_ = [], []
    for m, w in terms:
        b, a = _flat(m)
        c = w * m.scale
        s = math.sqrt(abs(c))
        bs.append(b * s)
        as_.append(a * (s if c >= 0 else -s))
    B, A = torch.cat(bs, dim=1), torch.cat(as_, dim=0)
    r = A.shape[0]
    if len(shape) == 4:
        A, B = A.reshape(r, *shape[1:]), B.reshape(shape[0], r, 1, 1)
    return LoraModule(A=A, B=B, alpha=float(r))


def svd(name: str, terms: list[Term], rank: int) -> tuple[LoraModule | None, float]:
    """Best rank-`rank` approximation (Eckart-Young) of sum_i w_i * dW_i, without forming dW.

    Stack B_s = [c_i B_i] (out x R) and A_s = [A_i] (R x in): dW = B_s A_s. QR both: B_s = Qb Rb, A_s^T = Qa Ra,
    so dW = Qb (Rb Ra^T) Qa^T and the SVD of the small R x R core gives the SVD of dW. Returns the module (alpha =
    its rank) and the relative Frobenius error ||dW - dW_k|| / ||dW|| (0 when dW = 0).
    """
    terms, shape = check_terms(name, terms)
    if not terms:
        return None, 0.0
    if rank < 1:
        raise LcmError(f"--rank must be at least 1, got {rank}")
    bs, as_ = [], []
    for m, w in terms:
        b, a = _flat(m)
        bs.append(b * (w * m.scale))
        as_.append(a)
    Bs, As = torch.cat(bs, dim=1), torch.cat(as_, dim=0)
    Qb, Rb = torch.linalg.qr(Bs, mode="reduced")
    Qa, Ra = torch.linalg.qr(As.T, mode="reduced")
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    k = min(rank, int(S.shape[0]))
    total = float(S.double().pow(2).sum())
    err = math.sqrt(float(S[k:].double().pow(2).sum()) / total) if total > 0 else 0.0
    sq = S[:k].sqrt()
    B = (Qb @ U[:, :k]) * sq  # out x k
    A = sq[:, None] * (Vh[:k] @ Qa.T)  # k x in
    if len(shape) == 4:
        A, B = A.reshape(k, *shape[1:]), B.reshape(shape[0], k, 1, 1)
    return LoraModule(A=A.contiguous(), B=B.contiguous(), alpha=float(k)), err


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def merge_modules(terms: dict[str, list[Term]], method: str, rank: int | None = None,
                  dtype: torch.dtype | None = None, workers: int | None = None
                  ) -> tuple[dict[str, LoraModule], dict[str, float]]:
    """`concat` or `svd` of every module of `terms` -> (merged modules in `terms` order, svd errors per module).

    Consumes `terms` (entries are popped as they are handed out), so an input module's factors are freed as soon
    as its merge is done when `terms` holds the only reference. Each merged module is cast to `dtype` (None keeps
    fp32) right away: holding every merged module in fp32 would double the peak memory.

    Speed: the modules are spread over `workers` threads (default: the usable cores), each running torch with one
    intra-op thread. The per-module ops (QR of ~1k-20k x 128 factors, a 128 x 128 SVD) are too small for two
    OpenMP threads to share well, and on a machine shared with other jobs every OpenMP barrier waits for a
    descheduled thread; independent single-threaded modules keep both cores busy with no barriers. The math is
    exactly `concat` / `svd` per module.
    """
    if method not in ("concat", "svd"):
        raise LcmError(f"unknown merge method '{method}' (concat | svd)")
    if method == "svd" and (rank is None or rank < 1):
        raise LcmError(f"--rank must be at least 1, got {rank}")
    workers = workers or _cpu_count()

    def one(name: str, ts: list[Term]) -> tuple[LoraModule | None, float]:
        if method == "concat":
            m, err = concat(name, ts), 0.0
        else:
            m, err = svd(name, ts, rank)
        if m is not None and dtype is not None:
            m = LoraModule(A=m.A.to(dtype), B=m.B.to(dtype), alpha=m.alpha)
        return m, err

    order = list(terms)
    results: dict[str, tuple[LoraModule | None, float]] = {}
    if workers <= 1:
        for p in order:
            results[p] = one(p, terms.pop(p))
    else:
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            ex = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,))
            try:
                futs = {p: ex.submit(one, p, terms.pop(p)) for p in order}
                for p in order:  # in order, so an error names the first bad module as the serial loop would
                    results[p] = futs.pop(p).result()
            finally:  # on an error, drop the queued modules instead of merging them for nothing
                ex.shutdown(wait=True, cancel_futures=True)
        finally:
            torch.set_num_threads(prev)
    merged = {p: m for p, (m, _) in results.items() if m is not None}
    errs = {p: e for p, (_, e) in results.items()} if method == "svd" else {}
    return merged, errs


def weighted_delta(name: str, terms: list[Term]) -> torch.Tensor | None:
    """sum_i w_i * dW_i in fp32, in the base weight's shape (None when every weight is zero)."""
    terms, shape = check_terms(name, terms)
    if not terms:
        return None
    out = None
    for m, w in terms:
        d = (w * m.delta()).reshape(shape)
        out = d if out is None else out.add_(d)
    return out


def group_terms(loras: list[tuple[LoraFile, float]]) -> dict[str, list[Term]]:
    """module path -> [(module, weight), ...] over all inputs, first-seen order."""
    out: dict[str, list[Term]] = {}
    for lf, w in loras:
        for p, m in lf.modules.items():
            out.setdefault(p, []).append((m, w))
    return out


def fuse_into_module(root: torch.nn.Module, loras: list[tuple[LoraFile, float]], prefix: str = "") -> int:
    """W += sum_i w_i * dW_i for every module path starting with `prefix` (prefix stripped), fp32 math, in place.

    LcmError names the first module missing in `root` or whose weight shape does not match. Returns the count.
    """
    n = 0
    for path, terms in group_terms(loras).items():
        if prefix and not path.startswith(prefix):
            continue
        if not prefix and path.startswith(("text_encoder.", "text_encoder_2.")):
            continue
        sub = path[len(prefix):]
        try:
            mod = root.get_submodule(sub)
        except AttributeError:
            raise LcmError(f"LoRA module '{path}' does not exist in this model") from None
        weight = getattr(mod, "weight", None)
        if weight is None:
            raise LcmError(f"LoRA module '{path}' has no weight to change in this model")
        d = weighted_delta(path, terms)
        if d is None:
            continue
        if d.numel() != weight.numel() or (d.shape[:2] != weight.shape[:2]):
            raise LcmError(f"LoRA module '{path}' changes a {list(d.shape)} weight but the model's is "
                           f"{list(weight.shape)}")
        with torch.no_grad():
            weight.copy_((weight.float() + d.reshape(weight.shape).to(weight.device)).to(weight.dtype))
        n += 1
    return n


def fuse_into_unet(unet: torch.nn.Module, loras: list[tuple[LoraFile, float]]) -> None:
    """Add weight * delta of every UNet module of every LoRA to `unet` in place (text-encoder modules skipped)."""
    fuse_into_module(unet, loras)
