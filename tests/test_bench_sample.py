"""`bench_sample` smoke test on a random-weight demo folder (CPU, tiny): every row is there, every row matches.

Oracle: plain diffusers' final latents (fused peft adapter for the LCM rows, the teacher for DPM-Solver++) on the
same prompt and seeds; tolerance 2e-3 (fp32). The LoRA changes the latents by far more than that (checked), so a
path that dropped it could not match. Timings are printed, not asserted (a shared 2-core machine).
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def folder_and_lora(tmp_path_factory):
    from lcmtool.demo.arch import build_pipeline
    from lcmtool.lora.io import save_lora
    from lcmtool.lora.synth import synth_lora, target_shapes

    root = tmp_path_factory.mktemp("bench")
    pipe = build_pipeline("sd")
    pipe.save_pretrained(root / "sd")
    lora = save_lora(synth_lora(target_shapes(pipe.unet), rank=4, alpha=2, seed=1), root / "l.safetensors",
                     format="diffusers")
    return str(root / "sd"), str(lora)


def test_bench_rows_match_and_carry_every_figure(folder_and_lora):
    from lcmtool.bench.sample import bench_sample

    folder, lora = folder_and_lora
    torch.manual_seed(0)
    rows = bench_sample(folder, "cpu", lora=lora, batches=(1, 2), n=1, warm=0, dpm_steps=2, log=lambda *a: None)
    got = [(r["case"], r["path"], r["batch"]) for r in rows]
    assert got == [("dpmpp2_cfg7.5", "diffusers", 1), ("dpmpp2_cfg7.5", "lcmtool", 1),
                   ("lcm4", "diffusers_lora_unfused", 1), ("lcm4", "diffusers_lora_fused", 1), ("lcm4", "lcmtool", 1),
                   ("lcm4", "diffusers_lora_fused", 2), ("lcm4", "lcmtool", 2)]
    for r in rows:
        assert r["outputs_match"] and r["max_abs_diff"] <= r["tolerance"] == 2e-3, r
        assert r["ms_per_image"] > 0 and r["images_per_s"] > 0 and r["compile_s"] is None
    assert all(r["speedup_vs_diffusers"] > 0 for r in rows)
    assert rows[4]["speedup_vs_diffusers_unfused"] > 0


def test_bench_lora_moves_the_latents_beyond_the_tolerance(folder_and_lora):
    """The match check can fail: the LoRA's effect on LCM's final latents is far above the tolerance."""
    from lcmtool.bench.sample import PROMPT, TOLERANCE
    from lcmtool.models.load import load_pipeline
    from lcmtool.models.pipeline import FastSampler
    from lcmtool.models.schedulers import make_scheduler

    folder, lora = folder_and_lora
    pipe, _ = load_pipeline(folder, torch.float32, "cpu")
    s = FastSampler(pipe)

    def latents():
        return s([PROMPT], [""], [0], make_scheduler("lcm", pipe.scheduler.config), 4, 1.0, 64, 64, output="latent")

    teacher = latents()
    pipe.load_lora_weights(lora)
    s.weights_changed()
    s.fuse_qkv = False  # the adapter is unfused here: keep the plain attention processors
    assert float((latents() - teacher).abs().max()) > 50 * TOLERANCE["float32"]
