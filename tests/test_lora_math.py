"""Merge math (paper eq. 3) per module in fp32: exact concat, svd truncation, and why factors are never averaged."""
import torch

from lcmtool.lora import math as M
from lcmtool.lora.io import LoraModule

REL = 1e-6


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def mod(shape, r, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn((r, *shape[1:]), generator=g, dtype=torch.float64).float()
    B = torch.randn((shape[0], r, *([1, 1] if len(shape) == 4 else [])), generator=g, dtype=torch.float64).float()
    return LoraModule(A=A, B=B, alpha=alpha)


SHAPES = {"linear": (24, 40), "conv1x1": (24, 40, 1, 1), "conv3x3": (16, 8, 3, 3)}


def test_concat_equals_weighted_sum_of_deltas_linear_and_conv():
    for kind, shape in SHAPES.items():
        style, lcm = mod(shape, 4, 2.0, 1), mod(shape, 8, 13.0, 2)
        for l1, l2 in [(0.8, 1.0), (-0.5, 1.0), (1.3, -0.7)]:
            m = M.concat(kind, [(style, l1), (lcm, l2)])
            want = l1 * style.delta() + l2 * lcm.delta()
            assert m.rank == 12 and m.alpha == 12.0
            assert tuple(m.delta().shape) == shape
            assert rel(m.delta(), want) < REL, kind


def test_module_in_one_input_keeps_its_own_term_and_zero_lambda_drops():
    style = mod((24, 40), 4, 1.0, 3)
    m = M.concat("x", [(style, 0.8)])
    assert rel(m.delta(), 0.8 * style.delta()) < REL
    assert M.concat("x", [(style, 0.0)]) is None
    lcm = mod((24, 40), 8, 8.0, 4)
    m0 = M.concat("x", [(style, 0.0), (lcm, 1.0)])  # lambda1 = 0 gives exactly tau_LCM
    assert m0.rank == 8 and torch.equal(m0.delta(), lcm.delta())


def test_linearity_and_sign():
    style, lcm = mod((16, 16), 4, 3.0, 5), mod((16, 16), 6, 6.0, 6)
    l1, l2 = 0.8, -1.5
    both = M.concat("x", [(style, l1), (lcm, l2)]).delta()
    parts = (l1 * M.concat("x", [(style, 1.0), (lcm, 0.0)]).delta()
             + l2 * M.concat("x", [(style, 0.0), (lcm, 1.0)]).delta())
    assert rel(both, parts) < REL
    neg = M.concat("x", [(style, -1.0)]).delta()
    assert rel(neg, -style.delta()) < REL


def test_naive_factor_averaging_is_wrong():
    """Adding A and B separately gives (B1+B2)(A1+A2) = dW1 + dW2 + B1 A2 + B2 A1: cross terms, and scaling both
    factors by lambda scales the delta by lambda^2. This is why lcmtool concatenates along the rank."""
    style, lcm = mod((16, 16), 4, 4.0, 7), mod((16, 16), 4, 4.0, 8)
    want = 0.8 * style.delta() + 1.0 * lcm.delta()
    naive = (0.8 * style.B + lcm.B) @ (0.8 * style.A + lcm.A)
    assert rel(naive, want) > 0.3
    assert rel(M.concat("x", [(style, 0.8), (lcm, 1.0)]).delta(), want) < REL


def test_linear_meets_1x1_conv_twin():
    lin, conv = mod((24, 40), 4, 4.0, 9), mod((24, 40, 1, 1), 2, 1.0, 10)
    m = M.concat("proj_in", [(lin, 1.0), (conv, 0.5)])
    want = lin.delta().reshape(24, 40, 1, 1) + 0.5 * conv.delta()
    assert rel(m.delta(), want) < REL


def test_shape_conflict_is_an_error():
    import pytest

    # pure math raises ValueError; the merge engine words it as an LcmError (test_lora_cli: "shape conflict")
    with pytest.raises(ValueError, match="shape conflict in module 'q'"):
        M.concat("q", [(mod((8, 8), 2, 2.0, 1), 1.0), (mod((8, 16), 2, 2.0, 2), 1.0)])


def test_svd_full_rank_exact_and_reported_error_is_true_error():
    for kind, shape in SHAPES.items():
        style, lcm = mod(shape, 4, 2.0, 11), mod(shape, 8, 16.0, 12)
        terms = [(style, 0.8), (lcm, 1.0)]
        want = 0.8 * style.delta() + lcm.delta()
        full, err = M.svd(kind, terms, rank=12)
        assert err < 1e-6 and rel(full.delta(), want) < 1e-5, kind
        low, err = M.svd(kind, terms, rank=5)
        assert low.rank == 5
        true = rel(low.delta(), want)
        assert abs(err - true) < 1e-5, (kind, err, true)
        # Eckart-Young: the truncation is the best rank-5 approximation of the exact sum
        s = torch.linalg.svdvals(want.reshape(shape[0], -1).double())
        assert abs(err - float(s[5:].norm() / s.norm())) < 1e-5
