"""GPU checks of the sampling loop (`pytest -m gpu`): no host-device sync inside it; fp16 images equal diffusers'
pipeline; the compiled loop equals the eager one.

Oracle: diffusers' own pipeline call on the same components (fp16, the stock attention processors), and lcmtool's
eager loop for the compiled one. Tolerance: 2 of 255 on the uint8 images.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

PROMPTS = ["a large red circle on the left", "a small blue square"]
TOL = 2  # of 255


@pytest.fixture(scope="module", params=["sd", "xl"])
def demo(request, tmp_path_factory):
    from lcmtool.demo.arch import build_pipeline

    path = tmp_path_factory.mktemp("demo") / request.param
    build_pipeline(request.param).save_pretrained(path)
    return str(path)


def guidance(name: str) -> float:
    return 1.0 if name in ("lcm", "tcd") else 7.5


@pytest.mark.parametrize("name", ["lcm", "tcd", "dpmpp", "ddim", "euler"])
def test_denoising_loop_has_no_sync(demo, name):
    """torch's sync debug mode is 'error' from the first UNet call to the end of the last step (CFG on for the
    teacher schedulers, with negative prompts)."""
    from lcmtool.engines.sample import set_scheduler
    from lcmtool.models.load import load_pipeline
    from lcmtool.models.pipeline import FastSampler

    pipe, _ = load_pipeline(demo, torch.float16, "cuda")
    sched = set_scheduler(pipe, dict(pipe.scheduler.config), name, 4, "leading")
    s = FastSampler(pipe)
    s.prepare()
    handle = pipe.unet.register_forward_pre_hook(lambda *_: torch.cuda.set_sync_debug_mode("error"))
    try:
        latents = s.denoise(PROMPTS, ["blurry", ""], [0, 1], sched, 4, guidance(name), 64, 64,
                            eta=0.3 if name == "tcd" else None)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        handle.remove()
    assert latents.shape == (2, 4, 8, 8) and bool(torch.isfinite(latents).all())


@pytest.mark.parametrize("name", ["lcm", "dpmpp"])
def test_fp16_loop_matches_pipeline(demo, name):
    from lcmtool.engines.sample import set_scheduler
    from lcmtool.models.load import load_pipeline
    from lcmtool.models.pipeline import FastSampler

    pipe, _ = load_pipeline(demo, torch.float16, "cuda")
    sched = set_scheduler(pipe, dict(pipe.scheduler.config), name, 4, "leading")
    g = guidance(name)
    gens = [torch.Generator("cuda").manual_seed(s) for s in (0, 1)]
    ref = pipe(PROMPTS, negative_prompt=["blurry", "a cross"] if g > 1 else None, num_inference_steps=4,
               guidance_scale=g, generator=gens, output_type="np").images
    mine = FastSampler(pipe)(PROMPTS, ["blurry", "a cross"], [0, 1], sched, 4, g, 64, 64, output="uint8").numpy()
    assert int(np.abs(mine.astype(np.int16) - (ref * 255).round().astype(np.int16)).max()) <= TOL


def test_compiled_loop_matches_eager(demo):
    """torch.compile (the CUDA default mode) of UNet and VAE decode: the eager loop's images; a short last batch
    is padded to the compiled batch (no second compile); the first call's cost is reported."""
    from lcmtool.engines.sample import set_scheduler
    from lcmtool.models.load import load_pipeline
    from lcmtool.models.pipeline import FastSampler

    pipe, _ = load_pipeline(demo, torch.float16, "cuda")
    sched = set_scheduler(pipe, dict(pipe.scheduler.config), "lcm", 4, "leading")
    eager = FastSampler(pipe)
    ref = eager(PROMPTS, ["", ""], [0, 1], sched, 4, 1.0, 64, 64, output="uint8").numpy()
    fast = FastSampler(pipe, compile=True, fuse_qkv=False)  # the eager sampler fused QKV already
    fast.static_batch = 2
    out = fast(PROMPTS, ["", ""], [0, 1], sched, 4, 1.0, 64, 64, output="uint8").numpy()
    first = fast.compile_s
    one = fast(PROMPTS[:1], [""], [0], sched, 4, 1.0, 64, 64, output="uint8").numpy()
    assert int(np.abs(out.astype(np.int16) - ref.astype(np.int16)).max()) <= TOL
    assert int(np.abs(one[0].astype(np.int16) - ref[0].astype(np.int16)).max()) <= TOL
    assert first > 0 and fast.compile_s == first  # the padded batch of one reused the compiled shapes
