"""`lcmtool finetune` on the random-weight demo pipelines (CPU, a few steps, tiny batches)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from lcmtool.engines.finetune import finetune
from lcmtool.errors import LcmError
from lcmtool.options import FinetuneConfig


def cfg_for(teachers, cache, out, fam="sd", **kw):
    base = dict(model=str(teachers / fam), out=str(out), device="cpu", data="demo:shapes:outline", num_samples=8,
                batch_size=8, max_steps=10, lr=1e-2, warmup_steps=0, lr_schedule="constant", validation_steps=[2],
                validation_prompts=["a large red circle on the left, outline style"], log_every=1,
                cache_dir=str(cache), report_to="none")
    base.update(kw)
    return FinetuneConfig(**base)


def fixed_draw_loss(unet, cache_root: str, prediction_type: str = "epsilon") -> float:
    """The denoising loss of `unet` on 16 fixed (t, noise) draws of every cached latent (the training data)."""
    from diffusers import DDPMScheduler

    from lcmtool.distill import lcd
    from lcmtool.distill.data import LatentCache
    from lcmtool.distill.denoise import denoising_target

    abar = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod.double()
    data = LatentCache(Path(cache_root), 0)
    b = data.batch(0, len(data))
    x0, cond = b["latents"].float(), b["prompt_embeds"].float()
    kw = {}
    if "pooled_embeds" in b:
        kw["added_cond_kwargs"] = {"text_embeds": b["pooled_embeds"].float(), "time_ids": b["geometry"]}
    g = torch.Generator().manual_seed(7)
    total = 0.0
    with torch.no_grad():
        for _ in range(16):
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, 1000, (len(x0),), generator=g)
            pred = unet(lcd.add_noise(x0, noise, t, abar), t, encoder_hidden_states=cond, **kw).sample
            total += torch.nn.functional.mse_loss(pred, denoising_target(x0, noise, t, abar, prediction_type)) / 16
    return float(total)


def unet_with(teacher: Path, loras: list):
    """The teacher's UNet with LoRA files fused in by the sample engine's own path (checks included)."""
    from diffusers import UNet2DConditionModel

    from lcmtool.lora.fuse import fuse_into_unet
    from lcmtool.lora.io import load_lora

    unet = UNet2DConditionModel.from_pretrained(str(teacher / "unet"))
    if loras:
        fuse_into_unet(unet, [(load_lora(p), w) for p, w in loras])
    return unet


@pytest.mark.parametrize("fam", ["sd", "xl"])
def test_style_lora_lowers_the_loss_and_its_file_holds_the_trained_delta(teachers, cache, tmp_path, fam):
    s = finetune(cfg_for(teachers, cache, tmp_path, fam))
    before = fixed_draw_loss(unet_with(teachers / fam, []), s["cache"])
    after = fixed_draw_loss(unet_with(teachers / fam, [(s["lora"], 1.0)]), s["cache"])
    assert after < 0.8 * before, (before, after)
    assert s["steps"] == 10 and s["family"] == ("sd15" if fam == "sd" else "sdxl")
    for f in ("lora.safetensors", "validation.png", "loss.png", "config.yaml", "summary.json", "metrics.jsonl"):
        assert (tmp_path / f).is_file(), f


def test_merge_and_sample_accept_the_lora(teachers, cache, tmp_path):
    """merge(0.5 tau', 0.5 tau') is tau' exactly (concat), so sampling it gives the LoRA-alone images."""
    import numpy as np
    from PIL import Image

    from lcmtool.engines.merge import run_merge
    from lcmtool.engines.sample import sample
    from lcmtool.options import MergeConfig, SampleConfig

    s = finetune(cfg_for(teachers, cache, tmp_path / "run", max_steps=4))
    merged = tmp_path / "merged.safetensors"
    rep = run_merge(MergeConfig(style=s["lora"], lcm=s["lora"], lambda1=0.5, lambda2=0.5, out=str(merged),
                                model=None))
    assert rep["modules"] > 0 and merged.is_file()

    def images(loras, out):
        recs = sample(SampleConfig(model=str(teachers / "sd"), lora=loras, prompt="a small blue square at the top",
                                   scheduler="dpmpp", steps=4, num_images=2, device="cpu", out=str(out)),
                      progress=False)
        return [np.asarray(Image.open(r["path"]), dtype=np.int16) for r in recs]

    alone, via_merge, plain = images([s["lora"]], tmp_path / "a"), images([str(merged)], tmp_path / "m"), \
        images(["none"], tmp_path / "p")
    assert max(np.abs(a - m).max() for a, m in zip(alone, via_merge)) <= 2
    assert max(np.abs(a - p).max() for a, p in zip(alone, plain)) > 10  # the LoRA changes the images


def test_full_writes_a_pipeline_that_plain_diffusers_loads(teachers, cache, tmp_path):
    from diffusers import StableDiffusionPipeline

    s = finetune(cfg_for(teachers, cache, tmp_path, full=True, lr=1e-3, max_steps=6))
    pipe = StableDiffusionPipeline.from_pretrained(s["pipeline"], torch_dtype=torch.float32)
    teacher = StableDiffusionPipeline.from_pretrained(str(teachers / "sd"), torch_dtype=torch.float32)
    assert fixed_draw_loss(pipe.unet, s["cache"]) < 0.8 * fixed_draw_loss(teacher.unet, s["cache"])
    blob = torch.load(Path(s["checkpoint"]) / "training.pt", weights_only=True)["lora"]
    for p, q in zip(pipe.unet.parameters(), blob, strict=True):  # the folder holds the trained weights (fp16)
        torch.testing.assert_close(p, q.half().float(), rtol=0, atol=0)
    image = pipe("a large red circle on the left", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_resume_continues_the_straight_run(teachers, cache, tmp_path):
    straight = finetune(cfg_for(teachers, cache, tmp_path / "a", max_steps=4))
    finetune(cfg_for(teachers, cache, tmp_path / "b", max_steps=2))
    resumed = finetune(cfg_for(teachers, cache, tmp_path / "b", max_steps=4, resume="latest"))
    a = torch.load(Path(straight["checkpoint"]) / "training.pt", weights_only=True)["lora"]
    b = torch.load(Path(resumed["checkpoint"]) / "training.pt", weights_only=True)["lora"]
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(teachers, cache, tmp_path, monkeypatch):
    """The shared loop (training.run_loop) under fresh_folder: a fresh run folder goes when the run fails before any
    checkpoint; one with a checkpoint stays (it can be resumed)."""
    import lcmtool.engines.finetune as ft

    real_step, calls = ft.train_step, []

    def failing(run, state, stop):
        calls.append(state.step)
        if state.step >= 2:
            raise RuntimeError("boom")
        return real_step(run, state, stop)

    monkeypatch.setattr(ft, "train_step", failing)
    with pytest.raises(RuntimeError, match="boom"):
        finetune(cfg_for(teachers, cache, tmp_path / "none", checkpoint_every=100))
    assert calls == [0, 1, 2] and not (tmp_path / "none").exists()
    with pytest.raises(RuntimeError, match="boom"):
        finetune(cfg_for(teachers, cache, tmp_path / "kept", checkpoint_every=1))
    assert list((tmp_path / "kept" / "checkpoints").glob("step-*"))


def test_bad_inputs_are_one_line_errors(teachers, cache, tmp_path):
    with pytest.raises(LcmError, match="unknown demo data"):
        finetune(cfg_for(teachers, cache, tmp_path, data="demo:shapes:wavy"))
    with pytest.raises(LcmError, match="--full writes a diffusers pipeline"):
        finetune(cfg_for(teachers, cache, tmp_path, full=True, format="peft"))

