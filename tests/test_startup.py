"""lcmtool.startup: the console command pauses the garbage collector for its heavy imports and resumes it (with
the imports frozen) before the model's weights are read; library and in-process use keep the interpreter's GC."""
import gc

import pytest
from typer.testing import CliRunner

from lcmtool import startup
from lcmtool.cli import app


@pytest.fixture
def restore_gc():
    yield
    startup._state.update(enabled=False, paused=False)
    gc.unfreeze()  # the test process's objects go back to the collector
    gc.enable()


def test_pause_and_settle_only_when_enabled(restore_gc, monkeypatch):
    startup.pause()
    assert gc.isenabled() and not startup.paused()  # library use: nothing changes
    monkeypatch.setenv("LCMTOOL_GC_PAUSE", "0")
    startup.enable()
    startup.pause()
    assert gc.isenabled() and not startup.paused()  # turned off by the environment
    monkeypatch.delenv("LCMTOOL_GC_PAUSE")
    startup.enable()
    startup.pause()
    assert not gc.isenabled() and startup.paused()
    startup.settle()
    assert gc.isenabled() and not startup.paused() and gc.get_freeze_count() > 0
    startup.pause()  # once per process
    assert gc.isenabled()


def test_command_resumes_the_collector_before_the_weights_load(restore_gc, monkeypatch, tmp_path):
    """`lcmtool sample` as the console entry runs it: paused while the body starts, collecting again (imports
    frozen) when diffusers' from_pretrained reads the weights, and after the command."""
    from diffusers import StableDiffusionPipeline

    import lcmtool.engines.sample as S

    seen = {}
    real_plan, real_fp = S.plan, StableDiffusionPipeline.from_pretrained.__func__

    def plan(*a, **k):
        seen["plan"] = gc.isenabled()
        return real_plan(*a, **k)

    def from_pretrained(cls, *a, **k):
        seen["from_pretrained"] = (gc.isenabled(), gc.get_freeze_count() > 0)
        return real_fp(cls, *a, **k)

    monkeypatch.setattr(S, "plan", plan)
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", classmethod(from_pretrained))
    gc.unfreeze()
    startup.enable()  # what cli.main does
    r = CliRunner().invoke(app, ["sample", "--model", "demo:sd", "--prompt", "a red circle", "--steps", "1",
                                 "--lora", "none", "--out", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    assert seen == {"plan": False, "from_pretrained": (True, True)}
    assert gc.isenabled() and not startup.paused()


def test_failing_command_resumes_the_collector(restore_gc, tmp_path):
    startup.enable()
    r = CliRunner().invoke(app, ["sample", "--model", "demo:sd", "--prompt", "x", "--lora",
                                 str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "not found" in r.output
    assert gc.isenabled() and not startup.paused()


@pytest.mark.parametrize("stored", ["fp32", "fp16"])
def test_text_encoders_equal_from_pretrained(stored, tmp_path):
    """The direct CLIP load (no conversion table) gives what diffusers' from_pretrained gives: weights, dtype,
    config, eval mode and outputs, for both SDXL encoders, weights stored fp32 or fp16, dtype None or fp16."""
    import shutil

    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file, save_file

    from lcmtool.demo import ASSETS
    from lcmtool.models.load import text_encoders

    folder = tmp_path / "xl"
    shutil.copytree(ASSETS / "demo-xl", folder)
    if stored == "fp16":
        for name in ("text_encoder", "text_encoder_2"):
            f = folder / name / "model.safetensors"
            save_file({k: v.half() for k, v in load_file(f).items()}, f)
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    for dtype in (None, torch.float16):
        ref, fast = StableDiffusionXLPipeline.from_pretrained(folder, dtype=dtype), text_encoders(folder, dtype)
        assert sorted(fast) == ["text_encoder", "text_encoder_2"]
        for name, model in fast.items():
            want = getattr(ref, name)
            assert type(model) is type(want) and not model.training and model.dtype == want.dtype
            a, b = want.state_dict(), model.state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
            assert model.config.to_dict() == want.config.to_dict()
            if dtype is None:  # (fp16 matmuls on CPU: the same kernels, but not worth a slow test)
                with torch.no_grad():
                    ha, hb = (m(ids, output_hidden_states=True).hidden_states[-2] for m in (want, model))
                assert torch.equal(ha, hb)


def test_text_encoders_leave_unusual_folders_to_from_pretrained(tmp_path):
    """A key that does not match, sharded weights or another class: that part is not in the dict."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from lcmtool.demo import ASSETS
    from lcmtool.models.load import text_encoders

    folder = tmp_path / "xl"
    shutil.copytree(ASSETS / "demo-xl", folder)
    f = folder / "text_encoder" / "model.safetensors"
    sd = load_file(f)
    save_file({("x." + k if i == 0 else k): v for i, (k, v) in enumerate(sd.items())}, f)  # one renamed key
    shard = folder / "text_encoder_2" / "model.safetensors"
    shard.rename(shard.with_name("model-00001-of-00001.safetensors"))
    assert text_encoders(folder) == {}
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", "T5EncoderModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    assert text_encoders(folder) == {} and text_encoders(tmp_path / "nowhere") == {}
