"""The calibrated, size-budgeted SVD extract of full LCD (extract_calibrate, extract_budget_mb; issue 13): input
statistics against F.unfold and plain means, the activation-aware truncation against its closed form, the budget's
greedy allocation on known spectra, and a tiny full-LCD run that writes a file inside its budget."""
import copy
import math
from pathlib import Path

import pytest
import test_distill_run as base
import torch
import torch.nn.functional as F

from lcmtool.distill import student
from lcmtool.engines.distill import distill
from lcmtool.lora.io import load_lora


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (3, 1, 0)])
def test_conv_input_power_is_the_unfolded_patches_mean_square(kernel, stride, padding):
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(5, 7, kernel, stride=stride, padding=padding)
    x = torch.randn(3, 5, 9, 8, generator=g) * torch.arange(1, 6).float()[None, :, None, None]
    got, n = student.conv_input_power(x, conv)
    cols = F.unfold(x, kernel, padding=padding, stride=stride)  # [B, C*k*k, L], the weight's flattened order
    assert n == cols.shape[0] * cols.shape[2]
    want = cols.pow(2).sum((0, 2))
    assert torch.allclose(got, want, rtol=1e-5), (got - want).abs().max()


def test_input_moments_average_every_token_and_patch_of_targeted_modules(monkeypatch):
    """Full second moments for inputs up to CALIBRATION_FULL_MAX features, the diagonal above (here set to 20)."""
    monkeypatch.setattr(student, "CALIBRATION_FULL_MAX", 20)
    g = torch.Generator().manual_seed(1)
    net = torch.nn.Module()
    net.to_q, net.conv1, net.other = torch.nn.Linear(6, 4), torch.nn.Conv2d(3, 2, 3, padding=1), torch.nn.Linear(6, 6)
    tokens = [torch.randn(2, 5, 6, generator=g) for _ in range(2)]
    images = [torch.randn(2, 3, 4, 4, generator=g) for _ in range(2)]

    def run():
        for t, im in zip(tokens, images, strict=True):
            net.to_q(t), net.conv1(im), net.other(t)

    moments = student.input_moments(net, ["to_q", "conv1"], run)
    assert set(moments) == {"to_q", "conv1"}  # only what the extract covers
    rows = torch.cat(tokens).reshape(-1, 6)
    assert torch.allclose(moments["to_q"], rows.T @ rows / len(rows), rtol=1e-5, atol=1e-6)  # 6 <= 20: full
    cols = torch.cat([F.unfold(im, 3, padding=1) for im in images])  # 27 > 20 features: the diagonal
    assert torch.allclose(moments["conv1"], cols.pow(2).mean((0, 2)), rtol=1e-5)
    assert not net.to_q._forward_hooks  # hooks removed
    monkeypatch.setattr(student, "CALIBRATION_FULL_MAX", 64)
    full = student.input_moments(net, ["conv1"], run)["conv1"]
    flat = cols.transpose(1, 2).reshape(-1, 27)
    assert torch.allclose(full, flat.T @ flat / len(flat), rtol=1e-5, atol=1e-6)


def pair(seed=2):
    """A teacher and a student differing by a full-rank change on a Linear and a 3x3 conv, and correlated inputs
    for each (rows of `inputs[name]`: the flattened weight's input features)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.nn.Module()
    teacher.to_q, teacher.conv1 = torch.nn.Linear(16, 12), torch.nn.Conv2d(4, 10, 3)
    trained = copy.deepcopy(teacher)
    with torch.no_grad():
        trained.to_q.weight += torch.randn(12, 16, generator=g)
        trained.conv1.weight += torch.randn(10, 4, 3, 3, generator=g)
    inputs = {n: torch.randn(400, d, generator=g) @ (torch.randn(d, d, generator=g) * torch.logspace(1, -2, d))
              for n, d in (("to_q", 16), ("conv1", 36))}
    return teacher, trained, inputs


@pytest.mark.parametrize("kind", ["full", "diagonal"])
def test_calibrated_extract_is_the_weighted_truncation_and_beats_plain_svd_on_the_output(kind):
    """With input moments, each module's rank-r factors are the best rank-r fit of the change in the norm of its
    output on those inputs (damped): closed form SVD of delta @ S, then @ S^-1, with S S^T the damped moment (full)
    or its diagonal's square root. Plain SVD is worse on the outputs and better in the plain norm."""
    teacher, trained, inputs = pair()
    targets = ["to_q", "conv1"]
    moments = {n: (x.T @ x / len(x)) if kind == "full" else x.pow(2).mean(0) for n, x in inputs.items()}
    cal, _ = student.extract_lora(trained, teacher, targets, 3, moments=moments)
    plain, _ = student.extract_lora(trained, teacher, targets, 3)
    for name in targets:
        delta = (getattr(trained, name).weight - getattr(teacher, name).weight).detach().reshape(
            getattr(trained, name).weight.shape[0], -1).double()
        m = moments[name].double()
        if kind == "full":
            s = torch.linalg.cholesky(m + student.CALIBRATION_DAMP * m.diagonal().mean() * torch.eye(len(m),
                                                                                                    dtype=m.dtype))
            u, sv, vh = torch.linalg.svd(delta @ s, full_matrices=False)
            want = (u[:, :3] * sv[:3]) @ vh[:3] @ torch.linalg.inv(s)
        else:
            s = (m + student.CALIBRATION_DAMP * m.mean()).sqrt()
            u, sv, vh = torch.linalg.svd(delta * s, full_matrices=False)
            want = (u[:, :3] * sv[:3]) @ vh[:3] / s
        got = cal[name].delta().reshape(delta.shape).double()
        assert torch.allclose(got, want, atol=1e-4 * want.abs().max()), (name, (got - want).abs().max())
        pl = plain[name].delta().reshape(delta.shape).double()
        x = inputs[name].double()
        assert ((delta - got) @ x.T).norm() < 0.9 * ((delta - pl) @ x.T).norm(), name  # output error on the inputs
        assert (delta - pl).norm() < (delta - got).norm(), name
        assert cal[name].A.shape[0] == 3 and cal[name].A.shape[1:] == getattr(trained, name).weight.shape[1:]


def test_a_module_without_calibration_inputs_keeps_the_plain_svd():
    teacher, trained, inputs = pair(4)
    targets = ["to_q", "conv1"]
    plain, _ = student.extract_lora(trained, teacher, targets, 3)
    for moments in ({"conv1": inputs["conv1"].pow(2).mean(0)}, {"to_q": torch.zeros(16, 16),
                                                                 "conv1": inputs["conv1"].pow(2).mean(0)}):
        cal, _ = student.extract_lora(trained, teacher, targets, 3, moments=moments)
        assert torch.allclose(cal["to_q"].delta(), plain["to_q"].delta(), atol=1e-5)
        assert not torch.allclose(cal["conv1"].delta(), plain["conv1"].delta(), atol=1e-3)


def test_budget_ranks_take_sigma_squared_per_value_largest_first_within_caps():
    spectra = {"a": torch.tensor([4.0, 3.0, 2.0, 1.0]), "b": torch.tensor([10.0, 1.0, 0.5])}
    costs, caps = {"a": 10, "b": 100}, {"a": 4, "b": 3}
    # rank 1 each costs 110; then a's 9/10, 4/10, 1/10 per value, then b's 1/100, 0.25/100
    assert student.budget_ranks(spectra, costs, caps, 110) == {"a": 1, "b": 1}
    assert student.budget_ranks(spectra, costs, caps, 130) == {"a": 3, "b": 1}
    assert student.budget_ranks(spectra, costs, caps, 239) == {"a": 4, "b": 1}
    assert student.budget_ranks(spectra, costs, caps, 240) == {"a": 4, "b": 2}
    assert student.budget_ranks(spectra, costs, caps, 10**6) == {"a": 4, "b": 3}
    assert student.budget_ranks(spectra, costs, {"a": 2, "b": 3}, 10**6) == {"a": 2, "b": 3}  # caps hold
    # b's second direction does not fit 235 - 140 = 95 values, but nothing cheaper is left: a stays at 4
    assert student.budget_ranks(spectra, costs, caps, 235) == {"a": 4, "b": 1}
    with pytest.raises(ValueError, match="rank 1 on every module"):
        student.budget_ranks(spectra, costs, caps, 109)


def test_extract_with_a_budget_stores_at_most_that_many_values():
    teacher, trained, inputs = pair(3)
    power = {n: x.pow(2).mean(0) for n, x in inputs.items()}
    targets = ["to_q", "conv1"]
    costs = {"to_q": 12 + 16, "conv1": 10 + 36}
    for budget in (costs["to_q"] + costs["conv1"], 300, 600):
        mods, _ = student.extract_lora(trained, teacher, targets, 8, moments=power, budget=budget)
        stored = sum(m.A.numel() + m.B.numel() for m in mods.values())
        assert stored <= budget and stored == sum(costs[n] * m.rank for n, m in mods.items())
        assert stored > budget - max(costs.values())  # nothing that fits is left out (caps 8 not reached here)
    assert student.extract_values(trained, targets) == sum(costs.values())


def test_full_lcd_calibrated_budget_extract_fits_and_loads(teachers, cache, tmp_path):
    """extract_calibrate + extract_budget_mb on a tiny full-LCD run: the file's factors fit the budget at fp16,
    ranks differ between modules, and the run logged its calibration; a budget below rank 1 everywhere fails
    before training with one line."""
    from lcmtool.errors import LcmError

    logs = []
    cfg = base.cfg_for(teachers, cache, tmp_path / "run", lora_rank=0, extract_rank=16, extract_budget_mb=0.15,
                       extract_calibrate=3, max_steps=2, num_samples=4, batch_size=4, lr=2e-4)
    s = distill(cfg, log=logs.append)
    lf = load_lora(s["lora"])
    stored = sum(m.loaded().A.numel() + m.loaded().B.numel() for m in lf.modules.values())
    assert stored * 2 <= 0.15e6 and stored * 2 > 0.15e6 - 4096
    ranks = {m.rank for m in lf.modules.values()}
    assert len(ranks) > 2 and max(ranks) <= 16
    assert any("calibrating the extract on 3 training captions" in str(x) for x in logs), logs[-5:]
    small = base.cfg_for(teachers, cache, tmp_path / "small", lora_rank=0, extract_rank=16, extract_budget_mb=0.001)
    with pytest.raises(LcmError, match="is below the .* MB that rank 1 on every extracted module takes"):
        distill(small)
    assert not Path(tmp_path / "small").exists()
    assert math.isfinite(s["final_loss"])
