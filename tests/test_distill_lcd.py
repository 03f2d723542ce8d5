"""LCD math (lcmtool/distill/lcd.py) against closed forms and diffusers' LCM/DDIM/DDPM schedulers."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler

from lcmtool.demo.arch import SD15_SCHEDULER
from lcmtool.distill import lcd

SCHED = {k: v for k, v in SD15_SCHEDULER.items() if k not in ("skip_prk_steps",)}


@pytest.fixture(scope="module")
def abar():
    return DDPMScheduler.from_config(SCHED).alphas_cumprod.double()


def test_boundary_scalings_match_lcmscheduler():
    sch = LCMScheduler.from_config(SCHED)
    ts = torch.tensor([0, 1, 19, 39, 259, 499, 999])
    c_skip, c_out = lcd.scalings_for_boundary_conditions(ts)
    for i, t in enumerate(ts.tolist()):
        ref_skip, ref_out = sch.get_scalings_for_boundary_condition_discrete(t)
        assert c_skip[i].item() == pytest.approx(ref_skip, rel=1e-12, abs=1e-15)
        assert c_out[i].item() == pytest.approx(ref_out, rel=1e-12, abs=1e-15)
    # closed forms: c_skip(0) = 1, c_out(0) = 0 (the boundary condition f(x, 0) = x); at t = 999, s t = 9990
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0
    assert c_skip[-1].item() == pytest.approx(0.25 / (9990 ** 2 + 0.25), rel=1e-12)
    assert c_out[-1].item() == pytest.approx(9990 / math.sqrt(9990 ** 2 + 0.25), rel=1e-12)


def test_x0_and_eps_from_eps_and_v(abar):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g).double(), torch.randn(3, 4, 8, 8, generator=g).double()
    t = torch.tensor([19, 499, 999])
    a = abar[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
    zt = a * x0 + s * eps
    assert torch.allclose(lcd.add_noise(x0, eps, t, abar), zt, atol=1e-12)
    v = a * eps - s * x0  # v-prediction target (Salimans & Ho 2022)
    for out, kind in ((eps, "epsilon"), (v, "v_prediction")):
        assert torch.allclose(lcd.predicted_x0(out, t, zt, kind, abar), x0, atol=1e-9)
        assert torch.allclose(lcd.predicted_eps(out, t, zt, kind, abar), eps, atol=1e-9)
    with pytest.raises(ValueError):
        lcd.predicted_x0(eps, t, zt, "sample", abar)


def test_x0_matches_lcmscheduler_step_v_prediction(abar):
    """LCMScheduler.step's denoised = c_out * x0 + c_skip * z, with x0 by prediction type: the student's f."""
    for kind in ("epsilon", "v_prediction"):
        sch = LCMScheduler.from_config({**SCHED, "prediction_type": kind})
        sch.set_timesteps(4)
        t = int(sch.timesteps[1])
        g = torch.Generator().manual_seed(1)
        z, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        denoised = sch.step(out, t, z, generator=g).denoised
        tt = torch.tensor([t, t])
        ours = lcd.consistency_output(z, lcd.predicted_x0(out, tt, z, kind, abar.float()), tt)
        assert torch.allclose(ours, denoised, atol=1e-5), kind


def test_skipping_grid_and_ddim_step_match_ddimscheduler(abar):
    grid = lcd.SkippingGrid(abar, 1000, 50)
    assert grid.k == 20 and grid.timesteps[0].item() == 19 and grid.timesteps[-1].item() == 999
    assert len(grid) == 50
    index = torch.tensor([0, 7, 49])
    start, prev = grid.start_and_target_timesteps(index)
    assert start.tolist() == [19, 159, 999] and prev.tolist() == [0, 139, 979]
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    step = grid.ddim_step(x0, eps, index)
    # DDIM (eta 0) with 50 "leading" steps over 1000, set_alpha_to_one=False, steps_offset=19: t = 19..999
    ddim = DDIMScheduler.from_config({**SCHED, "steps_offset": 19, "clip_sample": False, "set_alpha_to_one": False})
    ddim.set_timesteps(50)
    for i, n in enumerate(index.tolist()):
        t = int(start[i])
        a = abar[t].sqrt().float()
        s = (1 - abar[t]).sqrt().float()
        zt = a * x0[i:i + 1] + s * eps[i:i + 1]
        ref = ddim.step(eps[i:i + 1], t, zt, eta=0.0).prev_sample
        if n == 0:  # first grid point: DDIM uses final_alpha_cumprod = alpha-bar_0 as well
            assert ddim.final_alpha_cumprod.item() == pytest.approx(abar[0].item())
        assert torch.allclose(step[i:i + 1], ref, atol=1e-5), n


def test_guided_and_distance():
    c, u = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 4.0]])
    w = torch.tensor([3.0])
    # (1 + w) cond - w uncond (Algorithm 1)
    assert torch.allclose(lcd.guided(c, u, w), 4 * c - 3 * u)
    p, q = torch.tensor([0.0, 3.0]), torch.tensor([0.0, -1.0])
    assert lcd.distance(p, q, "l2").item() == pytest.approx(8.0)
    cc = 0.001
    assert lcd.distance(p, q, "huber", cc).item() == pytest.approx((math.sqrt(16 + cc * cc) - cc) / 2)
    with pytest.raises(ValueError):
        lcd.distance(p, q, "l1")
