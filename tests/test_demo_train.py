"""The demo recipe runs end to end in --quick mode and writes pipelines that plain diffusers loads."""
import json

import pytest
import torch

from lcmtool.demo import train


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    assert train.lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert train.lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert train.lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert train.lr_at(100, 1.0, 10, 100) == pytest.approx(0.1)


def test_quick_recipe_vae_teacher_style(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    recipe = json.loads(json.dumps(train.RECIPE))
    monkeypatch.setattr(train, "RECIPE", recipe)
    out, work = tmp_path / "assets", tmp_path / "work"
    train.main(["--quick", "--stage", "vae", "--out", str(out), "--work", str(work), "--device", "cpu"])
    info = json.loads((work / "vae" / "train.json").read_text())
    assert info["steps"] == 3 and info["scaling_factor"] > 0
    train.main(["--quick", "--stage", "teacher-sd", "--out", str(out), "--work", str(work), "--device", "cpu"])
    pipe = StableDiffusionPipeline.from_pretrained(out / "demo-sd")
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    assert (out / "demo-sd" / "loss.png").stat().st_size > 0
    assert pipe.vae.config.scaling_factor == pytest.approx(info["scaling_factor"])
