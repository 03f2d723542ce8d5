"""The demo recipe runs end to end in --quick mode and writes pipelines that plain diffusers loads."""
import json

import demo_models as train  # tools/demo_models.py (pytest pythonpath: tools)
import pytest
import torch


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
    # the VAE's record ships beside the weights
    assert json.loads((out / "vae.train.json").read_text())["steps"] == 3 and (out / "vae.loss.png").exists()


def test_waves_split_the_recipe_into_commands(tmp_path, monkeypatch):
    """--waves 1 then --waves 2 (what the lent GPU runs as separate calls) is the recipe's first two waves;
    timings.json keeps one entry per command; a bad --waves is an argparse error (exit 2)."""
    monkeypatch.setattr(train, "RECIPE", json.loads(json.dumps(train.RECIPE)))
    out, work = tmp_path / "assets", tmp_path / "work"
    common = ["--quick", "--out", str(out), "--work", str(work), "--device", "cpu"]
    work.mkdir()
    (work / "timings.json").write_text("{not json")  # a damaged record from an earlier run is started afresh
    train.main(["--stage", "all", "--waves", "1", *common])
    assert (work / "vae" / "config.json").exists() and not (out / "demo-sd").exists()
    train.main(["--stage", "all", "--waves", "2", *common])
    assert (out / "demo-sd" / "model_index.json").exists() and (out / "demo-xl" / "model_index.json").exists()
    runs = json.loads((work / "timings.json").read_text())["runs"]
    assert [r["waves"] for r in runs] == [[1], [2]]
    assert set(runs[1]["timings_s"]) == {"teacher-sd", "teacher-xl", "total"}
    fresh = tmp_path / "fresh"
    for bad in ("4", "0", "x", ""):
        with pytest.raises(SystemExit) as e:
            train.main(["--stage", "all", "--waves", bad, "--quick", "--out", str(fresh / "a"), "--work",
                        str(fresh / "w"), "--device", "cpu"])
        assert e.value.code == 2
    assert not fresh.exists()  # refused before anything is written


def test_cache_latents_tokenizes_like_the_whole_list():
    from lcmtool.demo import arch

    tok = arch.build_tokenizer()
    scenes, caps = train.render_dataset(200, seed=5)

    class Enc:  # a stand-in VAE: only the token ids are checked here
        config = type("C", (), {"scaling_factor": 1.0})

        def encode(self, x):
            return type("O", (), {"latent_dist": type("D", (), {"mode": lambda self: x[:, :, :8, :8]})()})()

    lat, ids = train.cache_latents(Enc(), (scenes, caps), tok, "cpu", chunk=64)
    ref = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    assert lat.shape == (200, 3, 8, 8) and len(set(caps)) < 200
    assert torch.equal(ids, ref)


def test_parallel_stages_run_as_subprocesses_and_failures_name_the_stage(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    out, work = tmp_path / "assets", tmp_path / "work"
    common = ["--out", str(out), "--work", str(work), "--device", "cpu", "--quick"]
    work.mkdir()
    timings = {}
    with pytest.raises(SystemExit, match="teacher-sd"):  # no VAE yet: the stage fails, its log is shown
        train.run_parallel(["teacher-sd"], common, work, timings)
    assert (work / "teacher-sd.log").stat().st_size > 0
    monkeypatch.setattr(train, "RECIPE", json.loads(json.dumps(train.RECIPE)))
    train.main(["--quick", "--stage", "vae", *common[:-1]])
    train.run_parallel(["teacher-sd", "teacher-xl"], common, work, timings)
    assert set(timings) == {"teacher-sd", "teacher-xl"} and all(v > 0 for v in timings.values())
    StableDiffusionPipeline.from_pretrained(out / "demo-sd")
    StableDiffusionXLPipeline.from_pretrained(out / "demo-xl")
    assert json.loads((out / "demo-xl" / "train.json").read_text())["steps"] == 3


def test_parallel_stages_are_stopped_when_the_parent_is_interrupted(tmp_path, monkeypatch):
    import subprocess
    import sys

    started, real_popen = [], subprocess.Popen

    def popen(cmd, **kw):  # stand-in stages that would run for a minute
        started.append(real_popen([sys.executable, "-c", "import time; time.sleep(60)"], **kw))
        return started[-1]

    def log(msg):
        if msg.startswith("running"):
            raise KeyboardInterrupt

    monkeypatch.setattr(train.subprocess, "Popen", popen)
    monkeypatch.setattr(train, "log", log)
    with pytest.raises(KeyboardInterrupt):
        train.run_parallel(["teacher-sd", "teacher-xl"], [], tmp_path, {})
    assert len(started) == 2 and all(p.poll() is not None for p in started)
