"""The validation grid of a distill run samples exactly as `lcmtool sample` does (issue 12's defect: the grid built
its LCMScheduler from the teacher's own scheduler config instead of sample's pinned LCM configuration)."""
import json
import shutil

import numpy as np
import pytest
import test_distill_run as base
import torch
from PIL import Image

from lcmtool.engines.distill import distill
from lcmtool.engines.sample import sample
from lcmtool.options import SampleConfig
from lcmtool.outputs import grid as grids

PROMPTS = ["a large red circle on the left", "a small blue square at the top"]


def arr(im) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("fam", ["sd", "xl"])
def test_validation_cell_equals_lcmtool_sample_output(teachers, cache, tmp_path, monkeypatch, fam):
    from diffusers import DiffusionPipeline, LCMScheduler

    captured = []
    real_grid = grids.grid

    def grid(cells, *a, **k):
        captured.append(cells)
        return real_grid(cells, *a, **k)

    monkeypatch.setattr(grids, "grid", grid)
    seed = 1234
    # a teacher whose scheduler config carries a setting that the pinned LCM configuration overrides (LCMScheduler
    # ignores the demo configs' own differences, steps_offset and set_alpha_to_one, and the SD pipelines force
    # clip_sample off): a DDPM scheduler with dynamic thresholding, which LCMScheduler would apply to x0
    teacher = tmp_path / "teacher"
    shutil.copytree(teachers / fam, teacher / fam)
    index = teacher / fam / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "scheduler": ["diffusers", "DDPMScheduler"]}))
    conf = teacher / fam / "scheduler" / "scheduler_config.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "_class_name": "DDPMScheduler", "thresholding": True,
                                "sample_max_value": 0.5}))
    s = distill(base.cfg_for(teacher, cache, tmp_path / "run", fam, max_steps=3, lr=1e-2, save_dtype="fp32",
                             validation_steps=[2, 4], validation_prompts=PROMPTS, validation_seed=seed))
    cells = captured[-1]  # rows: prompts, columns: steps (the final grid, validation.png)
    assert len(cells) == 2 and len(cells[0]) == 2
    for r, prompt in enumerate(PROMPTS):
        for c, steps in enumerate([2, 4]):
            recs = sample(SampleConfig(model=str(teacher / fam), prompt=prompt, seed=seed + r, steps=steps,
                                       lora=[s["lora"]], device="cpu", dtype="fp32",
                                       out=str(tmp_path / f"s{r}{c}")), progress=False)
            with Image.open(recs[0]["path"]) as im:
                diff = np.abs(arr(im) - arr(cells[r][c])).max()
            assert diff <= 1, (prompt, steps, diff)  # within 1/255
    # the check can fail: without the LoRA, or with the teacher's own scheduler config (the old grid's), the
    # images differ
    base_recs = sample(SampleConfig(model=str(teacher / fam), prompt=PROMPTS[0], seed=seed, steps=2, lora=["none"],
                                    device="cpu", dtype="fp32", out=str(tmp_path / "nolora")), progress=False)
    with Image.open(base_recs[0]["path"]) as im:
        assert np.abs(arr(im) - arr(cells[0][0])).max() > 8
    pipe = DiffusionPipeline.from_pretrained(str(teacher / fam))
    pipe.load_lora_weights(s["lora"], adapter_name="lcm")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    old = pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=1.0, output_type="pil",
               generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    assert np.abs(arr(old) - arr(cells[0][0])).max() > 8
