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
    ours = [("lcmtool", None), ("lcmtool_compiled", "trace")]  # CPU's default graphs: TorchScript traces
    assert got == [("dpmpp2_cfg7.5", "diffusers", 1), *(("dpmpp2_cfg7.5", p, 1) for p, _ in ours),
                   ("lcm4", "diffusers_lora_unfused", 1), ("lcm4", "diffusers_lora_fused", 1),
                   *(("lcm4", p, 1) for p, _ in ours), ("lcm4", "diffusers_lora_fused", 2),
                   *(("lcm4", p, 2) for p, _ in ours)]
    modes = dict(ours)
    for r in rows:
        assert r["outputs_match"] and r["max_abs_diff"] <= r["tolerance"] == 2e-3, r
        assert r["ms_per_image"] > 0 and r["images_per_s"] > 0
        assert r["compile_mode"] == modes.get(r["path"])
        assert (r["compile_s"] is None) == (r["path"] != "lcmtool_compiled") and (r["compile_s"] or 0) >= 0
    assert all(r["speedup_vs_diffusers"] > 0 for r in rows)
    assert all(r["speedup_vs_diffusers_unfused"] > 0 for r in rows if r["case"] == "lcm4" and r["batch"] == 1
               and r["path"].startswith("lcmtool"))
    no_graphs = bench_sample(folder, "cpu", lora=lora, batches=(1,), n=1, warm=0, dpm_steps=0, compile=False,
                             log=lambda *a: None)
    assert [r["path"] for r in no_graphs] == ["diffusers_lora_unfused", "diffusers_lora_fused", "lcmtool"]


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


def test_bench_startup_alternates_and_its_command_is_a_valid_sample_command(folder_and_lora, monkeypatch, tmp_path):
    """--startup: warm-up then alternating rounds of the bare import and the one-image command, medians and the
    ratio; the command it times is a real `lcmtool sample` command line (run here in-process on the fixture)."""
    from typer.testing import CliRunner

    import lcmtool.bench.startup as st
    from lcmtool.cli import app

    folder, _ = folder_and_lora
    calls, envs = [], []
    fake = iter([9.0, 7.0, 10.0, 11.0,  8.0, 7.5, 9.5, 12.0,  10.0, 6.0, 11.0, 10.0,  9.0, 8.0, 9.9, 11.0])

    def wall(argv, env=None):
        calls.append(argv)
        envs.append(env)
        return next(fake)

    real_wall = st._wall
    monkeypatch.setattr(st, "_wall", wall)
    rows = st.bench_startup(folder, rounds=3, log=lambda *a: None)
    kinds = [("bare" if a[1] == "-c" else "cmd") + ("-paused" if "gc.disable()" in " ".join(a) else "")
             + ("-nopause" if e else "") for a, e in zip(calls, envs, strict=True)]
    assert kinds == ["bare", "bare-paused", "cmd", "cmd-nopause"] * 4  # warm-up, then 3 rounds in alternation
    assert all(e in (None, {"LCMTOOL_GC_PAUSE": "0"}) for e in envs)
    bare, bare_paused, cmd, cmd_nopause = rows
    assert bare["wall_s_all"] == [8.0, 10.0, 9.0] and bare["wall_s"] == 9.0 and bare["ratio_vs_bare_import"] == 1.0
    assert bare_paused["wall_s"] == 7.5 and cmd["ratio_vs_bare_import_gc_paused"] == round(9.9 / 7.5, 3)
    assert cmd["wall_s_all"] == [9.5, 11.0, 9.9] and cmd["wall_s"] == 9.9 and cmd["ratio_vs_bare_import"] == 1.1
    assert cmd_nopause["path"] == "lcmtool_sample_one_image_no_gc_pause" and cmd_nopause["wall_s"] == 11.0
    argv = calls[2][3:]  # after python -m lcmtool
    argv[argv.index("--out") + 1] = str(tmp_path / "one")
    res = CliRunner().invoke(app, argv + ["--steps", "1", "--lora", "none"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "one").glob("*.png"))) == 1
    from lcmtool.errors import LcmError

    with pytest.raises(LcmError, match="exited 3"):
        real_wall([__import__("sys").executable, "-c", "raise SystemExit(3)"])
