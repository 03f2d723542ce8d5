"""`lcmtool merge --method fuse`: theta_pre + tau'_LCM baked into the demo model's weights, written as a diffusers
folder that plain diffusers loads (and as a single-file checkpoint), equal to base + merged delta to 1e-5 in fp32."""
import json

import pytest
import torch
from typer.testing import CliRunner

from lcmtool.cli import app
from lcmtool.demo import ASSETS
from lcmtool.lora.io import load_lora

BASE = ASSETS / "demo-sd"
STYLE = ASSETS / "style-outline-demo-sd.safetensors"
LCM = ASSETS / "lcm-lora-demo-sd.safetensors"
L1, L2 = 0.8, 1.0
TOL = 1e-5

pytestmark = pytest.mark.skipif(not (BASE / "model_index.json").is_file() or not STYLE.is_file()
                                or not LCM.is_file(), reason="demo world not built")


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def expected_unet() -> dict[str, torch.Tensor]:
    """base + lambda1 * dW_style + lambda2 * dW_lcm per weight, fp32, computed from the inputs directly."""
    from diffusers import UNet2DConditionModel

    sd = {k: v.float().clone() for k, v in
          UNet2DConditionModel.from_pretrained(BASE / "unet", torch_dtype=torch.float32).state_dict().items()}
    for lf, w in ((load_lora(STYLE), L1), (load_lora(LCM), L2)):
        for p, m in lf.modules.items():
            key = p + ".weight"
            sd[key] += w * m.delta().reshape(sd[key].shape)
    return sd


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return float((got.float() - want).abs().max()) <= TOL * max(1.0, float(want.abs().max()))


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuse")
    r = run("merge", "--method", "fuse", "--model", "demo:sd", "--style", STYLE, "--lcm", LCM, "--lambda1", L1,
            "--dtype", "fp32", "--out", d / "fused", "--json")
    assert r.exit_code == 0, r.output
    return d, json.loads(r.stdout.strip().splitlines()[-1]), expected_unet()


def test_fuse_folder_equals_base_plus_merged_delta_and_loads_in_diffusers(fused):
    from diffusers import StableDiffusionPipeline

    d, rep, want = fused
    lora_modules = set(load_lora(STYLE).modules) | set(load_lora(LCM).modules)
    assert rep["format"] == "diffusers" and rep["modules"] == len(lora_modules) and rep["dtype"] == "float32"
    pipe = StableDiffusionPipeline.from_pretrained(d / "fused", safety_checker=None, requires_safety_checker=False)
    got = pipe.unet.state_dict()
    assert set(got) == set(want)
    changed = 0
    for k, v in got.items():
        assert v.dtype == torch.float32
        assert close(v, want[k]), k
        changed += k[: -len(".weight")] in lora_modules
    assert changed == len(lora_modules)
    record = json.loads((d / "fused" / "lcmtool_merge.json").read_text())
    assert record["method"] == "fuse" and [i["weight"] for i in record["inputs"]] == [L1, L2]
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_fuse_single_file_holds_the_same_unet(fused, tmp_path):
    mc = pytest.importorskip("lcmtool.models.export")
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    d, _, _ = fused
    out = tmp_path / "fused.safetensors"
    r = run("merge", "--method", "fuse", "--model", "demo:sd", "--style", STYLE, "--lcm", LCM, "--lambda1", L1,
            "--dtype", "fp32", "--format", "single-file", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    sf = load_file(str(out))
    unet = UNet2DConditionModel.from_pretrained(d / "fused" / "unet")
    want = mc.unet_to_ldm(unet.state_dict(), unet.config)
    assert want and all(torch.equal(sf[k], v) for k, v in want.items())
    assert any(k.startswith("first_stage_model.") for k in sf) and any(k.startswith("cond_stage_model.") for k in sf)


def test_fuse_bad_requests_exit_2(tmp_path):
    r = run("merge", "--method", "fuse", "--model", "demo:sd", "--style", STYLE, "--format", "kohya",
            "--out", tmp_path / "x")
    assert r.exit_code == 2 and "--format diffusers" in r.output
    (tmp_path / "notapipe").mkdir()
    (tmp_path / "notapipe" / "keep.txt").write_text("mine")
    r = run("merge", "--method", "fuse", "--model", "demo:sd", "--style", STYLE, "--out", tmp_path / "notapipe")
    assert r.exit_code == 2 and "not overwriting" in r.output
    assert (tmp_path / "notapipe" / "keep.txt").read_text() == "mine"
