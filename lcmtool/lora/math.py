"""Task arithmetic over LoRAs (paper eq. 3: tau'_LCM = lambda1 * tau' + lambda2 * tau_LCM), pure tensor math.

A term is (LoraModule, weight). Every function computes in fp32 and returns factors in fp32. Bad input (shapes
that do not agree, a rank below 1) is a ValueError; the engines turn it into the user-facing LcmError.
"""
from __future__ import annotations

import math

import torch

from lcmtool.lora.io import LoraFile, LoraModule

Term = tuple[LoraModule, float]


def _flat(m: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out, r], A [r, in*kh*kw]) in fp32 (a lazy module's factors are read now)."""
    m = m.loaded()
    return m.B.float().reshape(m.B.shape[0], m.rank), m.A.float().reshape(m.rank, -1)


def comparable(shape: tuple) -> tuple:
    """A weight shape with a 1x1 conv's kernel dims dropped: a 1x1 conv and its linear twin compare equal."""
    return tuple(shape[:2]) if len(shape) == 4 and tuple(shape[2:]) == (1, 1) else tuple(shape)


def check_terms(name: str, terms: list[Term]) -> tuple[list[Term], tuple]:
    """Drop zero-weight terms; all terms must modify a weight of one shape (1x1 conv == linear). -> (terms, shape)."""
    shape = None
    for m, _ in terms:
        s = tuple(m.out_shape)
        s_cmp = comparable(s)
        if shape is None:
            shape, shape_cmp = s, s_cmp
        elif s_cmp != shape_cmp:
            raise ValueError(f"shape conflict in module '{name}': {list(shape)} vs {list(s)}")
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
        raise ValueError(f"the svd rank must be at least 1, got {rank}")
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
