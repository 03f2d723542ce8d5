"""`lcmtool merge / inspect / convert` through Typer's CliRunner: results, report numbers, and bad inputs
(exit 2, one line, no output file left)."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from lcmtool.cli import app
from lcmtool.lora import synth
from lcmtool.lora.io import load_lora, save_lora

SHAPES = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (320, 768),
          "down_blocks.0.attentions.0.proj_in": (320, 320, 1, 1),
          "down_blocks.0.resnets.0.conv1": (320, 320, 3, 3),
          "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2": (320, 1280)}


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture()
def pair(tmp_path):
    style = synth.synth_lora(SHAPES, rank=4, alpha=2.0, seed=1, family="sd15")
    lcm = synth.synth_lora(dict(list(SHAPES.items())[:3]), rank=8, alpha=8.0, seed=2, family="sd15")
    save_lora(style, tmp_path / "style.safetensors")
    save_lora(lcm, tmp_path / "lcm.safetensors", format="diffusers")
    return tmp_path, style, lcm


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_merge_cli_exact_with_report(pair):
    d, style, lcm = pair
    r = run("merge", "--style", d / "style.safetensors", "--lcm", d / "lcm.safetensors", "--lambda1", "0.8",
            "--out", d / "m.safetensors", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["modules"] == 4 and rep["family"] == "sd15" and rep["rank_max"] == 12 and rep["rank_min"] == 4
    assert [i["format"] for i in rep["inputs"]] == ["kohya", "diffusers"]
    m = load_lora(d / "m.safetensors")
    for p in SHAPES:
        want = 0.8 * style.modules[p].delta() + (lcm.modules[p].delta() if p in lcm.modules else 0)
        assert rel(m.modules[p].delta(), want) < 1e-6
    with safe_open(str(d / "m.safetensors"), "pt") as f:
        md = f.metadata()
    rec = json.loads(md["lcmtool"])
    assert rec["lambda1"] == 0.8 and rec["lambda2"] == 1.0 and len(rec["inputs"][0]["sha256"]) == 64
    # ranks 12 (merged) and 4 (only in style): kohya's "Dynamic", the max in lcmtool's own record (issue 16.7)
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora" and md["ss_network_dim"] == "Dynamic"
    assert json.loads(md["lcmtool.ranks"])["max"] == 12
    assert "lora_adapter_metadata" not in md


def test_merge_cli_add_svd_and_blocks(pair):
    d, style, lcm = pair
    r = run("merge", "--add", f"{d / 'style.safetensors'}:-0.5", "--add", f"{d / 'lcm.safetensors'}:1",
            "--method", "svd", "--rank", "3", "--out", d / "s.safetensors", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    m = load_lora(d / "s.safetensors")
    errs = []
    for p in SHAPES:
        want = -0.5 * style.modules[p].delta() + (lcm.modules[p].delta() if p in lcm.modules else 0)
        errs.append(rel(m.modules[p].delta(), want))
        assert m.modules[p].rank == 3
    assert abs(rep["svd_rel_error"]["max"] - max(errs)) < 1e-4
    r = run("merge", "--style", d / "style.safetensors", "--lcm", d / "lcm.safetensors", "--lambda2-blocks",
            "up=0.5,down=2", "--out", d / "b.safetensors")
    assert r.exit_code == 0, r.output
    m = load_lora(d / "b.safetensors")
    p = "down_blocks.0.resnets.0.conv1"
    assert rel(m.modules[p].delta(), 0.8 * style.modules[p].delta() + 2 * lcm.modules[p].delta()) < 1e-6


def test_inspect_and_convert(pair):
    d, style, _ = pair
    r = run("inspect", d / "style.safetensors", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["format"] == "kohya" and rep["family"] == "sd15" and rep["modules"] == 4 and rep["rank"] == {"4": 4}
    want = sum(float(m.delta().norm()) ** 2 for p, m in style.modules.items() if p.startswith("down_blocks.0"))
    assert abs(rep["block_norms"]["down_blocks.0"] - want ** 0.5) < 1e-4 * want ** 0.5
    r = run("convert", d / "style.safetensors", "--format", "peft", "--out", d / "p.safetensors", "--json")
    assert r.exit_code == 0, r.output
    p = load_lora(d / "p.safetensors")
    assert p.format == "peft"
    for k, m in style.modules.items():
        assert rel(p.modules[k].delta(), m.delta()) < 1e-6


def _bad(tmp_path, args, needle):
    out = tmp_path / "out.safetensors"
    r = run(*args, "--out", out)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.output
    assert not out.exists() and not list(tmp_path.glob(".out.safetensors*"))


def test_bad_inputs_exit_2_one_line_no_output(pair):
    d, _, _ = pair
    good = d / "style.safetensors"
    _bad(d, ["merge", "--style", d / "nope.safetensors", "--lcm", good], "not found")
    data = good.read_bytes()
    (d / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    _bad(d, ["merge", "--style", d / "trunc.safetensors", "--lcm", good], "not a readable safetensors")
    (d / "junk.safetensors").write_bytes(b"\x00" * 100)
    _bad(d, ["merge", "--style", d / "junk.safetensors", "--lcm", good], "not a readable safetensors")
    save_file({"conv_in.weight": torch.zeros(4, 4)}, str(d / "model.safetensors"))
    _bad(d, ["merge", "--style", d / "model.safetensors", "--lcm", good], "not a LoRA")
    xl = synth.synth_lora({"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (640, 2048)}, rank=2,
                          family="sdxl")
    save_lora(xl, d / "xl.safetensors")
    _bad(d, ["merge", "--style", d / "xl.safetensors", "--lcm", good], "different model families")
    clash = synth.synth_lora({"down_blocks.0.resnets.0.conv1": (320, 64, 3, 3)}, rank=2, family="sd15")
    save_lora(clash, d / "clash.safetensors")
    _bad(d, ["merge", "--style", d / "clash.safetensors", "--lcm", good], "shape conflict in module")
    _bad(d, ["merge", "--style", good, "--lcm", good, "--lambda1", "abc"], "lambda1")
    _bad(d, ["merge", "--add", f"{good}:x"], "must be a number")


def test_resolved_config_written_beside_merge_output(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from lcmtool.cli import app
    from lcmtool.demo import ASSETS

    out = tmp_path / "m.safetensors"
    r = CliRunner().invoke(app, ["merge", "--style", str(ASSETS / "style-outline-demo-sd.safetensors"),
                                 "--lambda1", "0.5", "--out", str(out)])
    assert r.exit_code == 0, r.output
    cfg = yaml.safe_load((tmp_path / "m.yaml").read_text())
    assert cfg["lambda1"] in (0.5, "0.5") and cfg["method"] == "concat" and cfg["out"] == str(out)


def test_written_metadata_holds_no_local_folders(tmp_path):
    """Issue 16 item 6: a resolved config in LoRA metadata names local files by their names only."""
    from lcmtool.lora.metadata import portable_values

    f = tmp_path / "teacher"
    f.mkdir()
    rec = {"model": str(f), "out": "/abs/run/dir", "data": "demo:shapes", "rel": "runs/x", "n": 3,
           "nested": {"resume": str(f), "prompts": ["a/b is text"]}}
    got = portable_values(rec)
    assert got == {"model": "teacher", "out": "dir", "data": "demo:shapes", "rel": "runs/x", "n": 3,
                   "nested": {"resume": "teacher", "prompts": ["a/b is text"]}}
