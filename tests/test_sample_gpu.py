"""GPU checks of the sample engine (`pytest -m gpu`): no host-device sync inside the denoising loop."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@pytest.fixture(scope="module", params=["sd", "xl"])
def demo(request, tmp_path_factory):
    from lcmtool.demo.arch import build_pipeline

    path = tmp_path_factory.mktemp("demo") / request.param
    build_pipeline(request.param).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("name", ["lcm", "tcd", "dpmpp", "ddim", "euler"])
def test_denoising_loop_has_no_sync(demo, name):
    """torch's sync debug mode is 'error' from the first UNet call to the end of the last step."""
    from lcmtool.engines.sample import Job, generate, set_scheduler
    from lcmtool.models.load import load_pipeline

    pipe, _ = load_pipeline(demo, torch.float16, "cuda")
    set_scheduler(pipe, dict(pipe.scheduler.config), name, 4, "leading")
    handle = pipe.unet.register_forward_pre_hook(lambda *_: torch.cuda.set_sync_debug_mode("error"))

    def end_of_step(p, i, t, kw):
        if i == len(p.scheduler._host_timesteps) - 1:
            torch.cuda.set_sync_debug_mode(0)
        return kw

    jobs = [Job("a large red circle on the left", "", 0), Job("a small blue square", "", 1)]
    try:
        images, _ = generate(pipe, jobs, name, 4, 1.0 if name in ("lcm", "tcd") else 7.5, 64, 64, "cuda",
                             callback_on_step_end=end_of_step)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        handle.remove()
    assert len(images) == 2
