"""distill's `teacher_data` (issue 13): LCD from noised samples of the guided teacher instead of the encoded
training images. The teacher-sample cache against diffusers' own pipeline (same noise, same scheduler config, the
cached embeddings), for both families; and a tiny run that trains on it, reuses it, and refuses bad settings."""
import json
from pathlib import Path

import pytest
import test_distill_run as base
import torch
from safetensors.torch import load_file

from lcmtool.distill import data as D
from lcmtool.engines.distill import distill
from lcmtool.errors import LcmError


def real_cache(teachers, fam: str, root: Path, n: int = 5):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(teachers / fam), dtype=torch.float32)
    source = D.open_source("demo:shapes", n, 0)
    uncond = "zeros" if fam == "xl" else "empty"
    D.build_cache(pipe, "sdxl" if fam == "xl" else "sd15", source, root, 64, True, 0, uncond, "cpu")
    return pipe


@pytest.mark.parametrize("fam", ["sd", "xl"])
def test_teacher_samples_equal_diffusers_pipeline_with_the_same_noise(teachers, tmp_path, fam):
    """Records 0-2 of a 5-record cache (count 3, chunks of 2: a chunk boundary and a cut inside the second chunk)
    are DPM-Solver++ 6 steps at CFG 3 of the teacher; diffusers' pipeline from the cached embeddings and the same
    initial noise gives the same latents."""
    from lcmtool.models.schedulers import make_scheduler

    src = tmp_path / "real"
    pipe = real_cache(teachers, fam, src)
    out = D.teacher_cache_root(src, 3.0, 6, 3)
    seen = []
    D.build_teacher_cache(pipe.unet, dict(pipe.scheduler.config), src, out, 3.0, 6, 3, seed=7, device="cpu",
                          dtype=torch.float32, chunk=2, progress=lambda done, n: seen.append((done, n)))
    assert seen == [(2, 3), (3, 3)]
    meta = json.loads((out / "meta.json").read_text())
    real = json.loads((src / "meta.json").read_text())
    assert meta["count"] == 3 and meta["captions"] == real["captions"]
    assert meta["teacher_samples"] == {"guidance": 3.0, "steps": 6, "solver": "dpmpp", "seed": 7,
                                       "source_cache": src.name}
    got = load_file(str(out / "latents-00000.safetensors"))
    ref = load_file(str(src / "latents-00000.safetensors"))
    assert torch.equal(got["caption_idx"], ref["caption_idx"][:3]) and torch.equal(got["geometry"], ref["geometry"][:3])
    text = load_file(str(src / "text.safetensors"))
    pipe.scheduler = make_scheduler("dpmpp", dict(pipe.scheduler.config))
    for start in (0, 2):
        idx = ref["caption_idx"][start:min(start + 2, 3)]
        noise = torch.randn((len(idx), 4, 8, 8), generator=torch.Generator().manual_seed(7 * 1_000_003 + start))
        kw = dict(prompt_embeds=text["prompt_embeds"][idx].float(),
                  negative_prompt_embeds=text["uncond_embeds"].float().expand(len(idx), -1, -1))
        if fam == "xl":
            kw.update(pooled_prompt_embeds=text["pooled_embeds"][idx].float(),
                      negative_pooled_prompt_embeds=text["uncond_pooled"].float().expand(len(idx), -1))
        want = pipe(num_inference_steps=6, guidance_scale=3.0, latents=noise, output_type="latent", height=64,
                    width=64, **kw).images
        have = got["latents"][start:start + len(idx)].float()
        assert (have - want).abs().max() < 2e-3 * want.abs().max() + 1e-3, (have - want).abs().max()
    # a different guidance gives different samples (the CFG scale is used)
    other = D.teacher_cache_root(src, 1.0, 6, 3)
    D.build_teacher_cache(pipe.unet, dict(pipe.scheduler.config), src, other, 1.0, 6, 3, seed=7, device="cpu",
                          dtype=torch.float32, chunk=2)
    assert not torch.allclose(load_file(str(other / "latents-00000.safetensors"))["latents"].float(),
                              got["latents"].float(), atol=1e-3)


def test_distill_on_teacher_data_trains_reuses_the_cache_and_refuses_bad_settings(teachers, cache, tmp_path):
    logs = []
    cfg = base.cfg_for(teachers, cache, tmp_path / "run", max_steps=3, num_samples=6, batch_size=4,
                       teacher_data=3.0, teacher_steps=4, teacher_samples=5, w_min=2.0, w_max=2.0)
    s = distill(cfg, log=logs.append)
    made = [str(x) for x in logs if str(x).startswith("teacher data: 5 DPM-Solver++ 4-step samples at CFG 3")]
    assert len(made) == 1, logs
    assert s["samples_cached"] == 5 and "-teacher-cfg3-dpmpp4-n5" in s["cache"]
    losses = base.losses(tmp_path / "run")
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    logs.clear()
    again = base.cfg_for(teachers, cache, tmp_path / "again", max_steps=1, num_samples=6, batch_size=4,
                         teacher_data=3.0, teacher_steps=4, teacher_samples=5)
    distill(again, log=logs.append)
    assert not any(str(x).startswith("teacher data:") for x in logs)  # the cache is reused, not rebuilt
    for bad, msg in (({"teacher_data": 0.5}, "teacher samples' CFG scale"),
                     ({"teacher_samples": 4}, "needs teacher_data")):
        with pytest.raises(LcmError, match=msg):
            distill(base.cfg_for(teachers, cache, tmp_path / "bad", **bad))
        assert not (tmp_path / "bad").exists()
