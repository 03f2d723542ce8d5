"""Bad LoRA files and what lcmtool does with them (issues 16 and 18): every defect is exit 2 with one line that names
the file (and the first bad module), never an internal error; nothing is written for a refused input; `inspect`
describes a damaged file instead of hiding it, in valid JSON; written metadata names files, not folders.

Files are built here with safetensors' own writer (or by hand where the defect is one safetensors forbids).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lcmtool.cli import app
from lcmtool.demo import ASSETS

K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # SD-1.5: [320, 768]
C = "down_blocks.0.resnets.0.conv1"  # SD-1.5: [320, 320, 3, 3]
STYLE = ASSETS / "style-outline-demo-sd.safetensors"
demo = pytest.mark.skipif(not (ASSETS / "demo-sd" / "model_index.json").is_file(), reason="demo world not built")


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(r, *needles):
    """exit 2, one line on stderr, holding every needle."""
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def factors(dtype=torch.float32, rank=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {K: (torch.randn(rank, 768, generator=g) * 0.1, torch.randn(320, rank, generator=g) * 0.1),
            C: (torch.randn(rank, 320, 3, 3, generator=g) * 0.1, torch.randn(320, rank, 1, 1, generator=g) * 0.1)}


def kohya(path, mods=None, alpha=2.0, metadata=None, stems=None):
    """A kohya file of `mods` (module path -> (down, up)); `stems` renames the key stems."""
    sd = {}
    for p, (down, up) in (mods or factors()).items():
        stem = (stems or {}).get(p, "lora_unet_" + p.replace(".", "_"))
        sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = down.contiguous(), up.contiguous()
        sd[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path), metadata=metadata)
    return path


def diffusers(path, metadata=None, prefix="unet.", mods=None):
    sd = {}
    for p, (down, up) in (mods or factors()).items():
        sd[f"{prefix}{p}.lora_A.weight"], sd[f"{prefix}{p}.lora_B.weight"] = down.contiguous(), up.contiguous()
    save_file(sd, str(path), metadata=metadata)
    return path


def no_output(tmp_path, name="out.safetensors"):
    assert not (tmp_path / name).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], list(tmp_path.iterdir())


# ---- non-finite values (issue 16.1, 18.2) ----

def test_nan_factors_refused_by_merge_and_convert_naming_the_module(tmp_path):
    mods = factors()
    mods[C][1][0, 0, 0, 0] = math.nan
    bad = kohya(tmp_path / "nan.safetensors", mods)
    good = kohya(tmp_path / "good.safetensors", factors(seed=1))
    one_line_error(cli("merge", "--style", good, "--lcm", bad, "--out", tmp_path / "out.safetensors"),
                   "inf/NaN", C, bad)
    one_line_error(cli("convert", bad, "--format", "diffusers", "--out", tmp_path / "out.safetensors"),
                   "inf/NaN", C, bad)
    no_output(tmp_path)


def test_inspect_reports_non_finite_values_in_valid_json(tmp_path):
    mods = factors()
    mods[C] = (torch.full_like(mods[C][0], math.nan), mods[C][1])
    mods[K][1][0, 0] = math.inf
    r = cli("inspect", kohya(tmp_path / "nan.safetensors", mods), "--json")
    assert r.exit_code == 0, r.output

    def no_bare_constants(c):
        raise AssertionError(f"bare {c} in --json output")

    rep = json.loads(r.stdout, parse_constant=no_bare_constants)
    assert rep["non_finite"] == {"modules": 2, "values": 320 * 2 * 9 + 1, "first_module": K}
    assert rep["block_norms"] == {"down_blocks.0": None}  # not 0.0 (max(0.0, nan)) and not NaN


def test_all_nan_file_inspect_never_prints_zero_norms(tmp_path):
    mods = {p: (torch.full_like(d, math.nan), torch.full_like(u, math.nan)) for p, (d, u) in factors().items()}
    r = cli("inspect", kohya(tmp_path / "allnan.safetensors", mods), "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["non_finite"]["modules"] == 2 and all(v is None for v in rep["block_norms"].values())


def test_merged_result_checked_before_writing(tmp_path):
    """Finite fp32 inputs whose merged factors overflow fp16: refused, nothing written."""
    a = kohya(tmp_path / "a.safetensors", {p: (d * 1e5, u * 1e5) for p, (d, u) in factors().items()})
    b = kohya(tmp_path / "b.safetensors", {p: (d * 1e5, u * 1e5) for p, (d, u) in factors(seed=2).items()})
    one_line_error(cli("merge", "--add", f"{a}:10", "--add", f"{b}:10", "--dtype", "fp16",
                       "--out", tmp_path / "out.safetensors"), "inf/NaN")
    no_output(tmp_path)


@demo
def test_fused_result_checked_before_writing(tmp_path):
    """A LoRA whose fused weights overflow fp16: refused, no folder and no temp left."""
    sd = load_file(str(STYLE))
    save_file({k: (v.float() * 1e4 if "lora" in k else v) for k, v in sd.items()}, str(tmp_path / "huge.safetensors"),
              metadata={"format": "pt"})
    r = cli("merge", "--method", "fuse", "--model", "demo:sd", "--add", f"{tmp_path / 'huge.safetensors'}:1",
            "--dtype", "fp16", "--out", tmp_path / "fused")
    one_line_error(r, "overflows float16", "--dtype fp32")
    assert not (tmp_path / "fused").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---- unknown modules (issue 16.2) ----

def test_unknown_modules_refused_or_dropped_and_counted(tmp_path):
    stems = {K: "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_zz"}
    bad = kohya(tmp_path / "renamed.safetensors", stems=stems)
    one_line_error(cli("merge", "--add", f"{bad}:1", "--out", tmp_path / "out.safetensors"),
                   "does not exist", "attn2.to.zz", "--drop-unknown", bad)
    no_output(tmp_path)
    r = cli("merge", "--add", f"{bad}:1", "--drop-unknown", "--out", tmp_path / "out.safetensors", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["dropped_unknown"] == {"renamed.safetensors": 1} and rep["modules"] == 1
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "to_zz" in k]


@demo
def test_unknown_module_in_a_family_less_lora_refused(tmp_path):
    """The demo's LoRAs tell no family: their names are checked against --model and the SD families."""
    sd = load_file(str(STYLE))
    k = next(k for k in sd if k.endswith(".lora_A.weight"))
    stem = k[: -len(".lora_A.weight")]
    renamed = {(kk.replace(stem, "unet.no_such_block.proj") if kk.startswith(stem + ".") else kk): v
               for kk, v in sd.items()}
    save_file(renamed, str(tmp_path / "renamed.safetensors"), metadata={"format": "pt"})
    one_line_error(cli("merge", "--add", f"{tmp_path / 'renamed.safetensors'}:1", "--out",
                       tmp_path / "out.safetensors"), "no_such_block.proj", "does not exist")


# ---- malformed fields (issue 16.3, 18.1, 18.3, 18.6, 18.9) ----

@pytest.mark.parametrize("md,needle", [({"lora_alpha": "big"}, "lora_alpha must be a finite number"),
                                       ({"lora_alpha": True}, "lora_alpha must be a finite number"),
                                       ({"lora_alpha": 4, "alpha_pattern": {"(": 2}}, "not a regular expression"),
                                       ({"alpha_pattern": {"to_k": "x"}}, "must be a finite number")])
def test_bad_alpha_metadata_exit_2_in_every_command(tmp_path, md, needle):
    bad = diffusers(tmp_path / "bad.safetensors", metadata={"lora_adapter_metadata": json.dumps(md)})
    one_line_error(cli("merge", "--add", f"{bad}:1", "--out", tmp_path / "out.safetensors"), needle, bad)
    one_line_error(cli("inspect", bad), needle)
    one_line_error(cli("convert", bad, "--out", tmp_path / "out.safetensors"), needle)
    no_output(tmp_path)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64])
def test_non_float_factors_refused(tmp_path, dtype):
    mods = {p: ((d * 10).to(dtype), (u * 10).to(dtype)) for p, (d, u) in factors().items()}
    bad = kohya(tmp_path / "int.safetensors", mods)
    one_line_error(cli("merge", "--add", f"{bad}:0.3", "--out", tmp_path / "out.safetensors"), "floating point", bad)
    one_line_error(cli("convert", bad, "--format", "diffusers", "--out", tmp_path / "out.safetensors"),
                   "floating point")
    no_output(tmp_path)


@pytest.mark.parametrize("dtype,name", [(torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")])
def test_writers_write_the_requested_float_dtype(tmp_path, dtype, name):
    src = kohya(tmp_path / "in.safetensors")
    for cmd in (["convert", src, "--format", "diffusers"], ["merge", "--add", f"{src}:0.5"]):
        out = tmp_path / f"{cmd[0]}-{name}.safetensors"
        r = cli(*cmd, "--dtype", name, "--out", out)
        assert r.exit_code == 0, r.output
        sd = load_file(str(out))
        assert {v.dtype for k, v in sd.items() if not k.endswith(".alpha")} == {dtype}


def test_rank_0_factors_refused(tmp_path):
    mods = factors()
    mods[K] = (torch.zeros(0, 768), torch.zeros(320, 0))
    bad = kohya(tmp_path / "r0.safetensors", mods)
    for args in (["merge", "--add", f"{bad}:1", "--out", tmp_path / "out.safetensors"], ["inspect", bad],
                 ["convert", bad, "--out", tmp_path / "out.safetensors"]):
        one_line_error(cli(*args), "empty factors", K)
    no_output(tmp_path)


def test_duplicate_header_keys_refused(tmp_path):
    """The safetensors format forbids a name twice; a JSON reader would keep the last one silently."""
    good = kohya(tmp_path / "good.safetensors")
    data = good.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].decode().rstrip()
    key = f'"lora_unet_{K.replace(".", "_")}.alpha"'
    i = header.index(key)
    entry = header[i:header.index("}", i) + 1]
    dup = (header[:-1] + "," + entry + "}").encode()
    dup += b" " * (-len(dup) % 8)
    bad = tmp_path / "dup.safetensors"
    bad.write_bytes(len(dup).to_bytes(8, "little") + dup + data[8 + n:])
    for args in (["inspect", bad], ["merge", "--add", f"{bad}:1", "--out", tmp_path / "out.safetensors"]):
        one_line_error(cli(*args), "duplicate key", bad)
    no_output(tmp_path)


@pytest.mark.parametrize("kind", ["empty", "parameter", "double dot"])
def test_empty_or_parameter_module_paths_refused(tmp_path, kind):
    mods = factors()
    if kind == "empty":
        bad = kohya(tmp_path / "bad.safetensors", mods, stems={K: "lora_unet_"})
        needle = "module path '' is empty"
    elif kind == "parameter":
        bad = diffusers(tmp_path / "bad.safetensors", mods={f"{C}.weight": mods[C], K: mods[K]})
        needle = f"'{C}.weight' is empty or names a parameter"
    else:
        bad = diffusers(tmp_path / "bad.safetensors", mods={"down_blocks..0.proj_in": mods[C], K: mods[K]})
        needle = "is empty or names a parameter"
    one_line_error(cli("merge", "--add", f"{bad}:1", "--out", tmp_path / "out.safetensors"), needle, bad)
    no_output(tmp_path)


def test_errors_in_a_two_input_merge_name_the_file(tmp_path):
    good = kohya(tmp_path / "good.safetensors")
    sd = load_file(str(kohya(tmp_path / "tmp.safetensors", factors(seed=3))))
    del sd[f"lora_unet_{C.replace('.', '_')}.lora_up.weight"]
    save_file(sd, str(tmp_path / "half.safetensors"))
    line = one_line_error(cli("merge", "--style", good, "--lcm", tmp_path / "half.safetensors", "--out",
                              tmp_path / "out.safetensors"), "has no up weight")
    assert str(tmp_path / "half.safetensors") in line and str(good) not in line
    conflict = kohya(tmp_path / "conflict.safetensors", {K: (torch.zeros(2, 768), torch.zeros(640, 2))})
    line = one_line_error(cli("merge", "--style", good, "--lcm", conflict, "--out", tmp_path / "out.safetensors"),
                          "shape conflict", K)
    assert str(good) in line and str(conflict) in line


# ---- metadata (issue 16.6, 16.7) ----

@demo
def test_written_metadata_names_no_local_folder(tmp_path):
    src = kohya(tmp_path / "in.safetensors")
    r = cli("merge", "--add", f"{src}:1", "--out", tmp_path / "m.safetensors")
    assert r.exit_code == 0, r.output
    r = cli("convert", src, "--out", tmp_path / "c.safetensors")
    assert r.exit_code == 0, r.output
    r = cli("merge", "--method", "fuse", "--model", "demo:sd", "--style", STYLE, "--out", tmp_path / "fused")
    assert r.exit_code == 0, r.output
    r = cli("merge", "--method", "fuse", "--model", "demo:sd", "--style", STYLE, "--format", "single-file",
            "--out", tmp_path / "fused.safetensors")
    assert r.exit_code == 0, r.output
    texts = {}
    for name in ("m", "c", "fused"):
        with safe_open(str(tmp_path / f"{name}.safetensors"), "pt") as f:
            texts[name] = json.dumps(f.metadata())
    for p in (tmp_path / "fused").rglob("*.json"):
        texts[str(p)] = p.read_text()
    for name, text in texts.items():
        for folder in (str(tmp_path), str(ASSETS), "/tmp/", "/home/", "/root/"):
            assert folder not in text, (name, folder)
    rec = json.loads(json.loads(texts["m"])["lcmtool"])
    assert rec["inputs"][0]["path"] == "in.safetensors" and len(rec["inputs"][0]["sha256"]) == 64
    md = json.loads(texts["m"])
    from lcmtool import __version__

    assert md["modelspec.implementation_version"] == f"lcmtool/{__version__}"
    assert json.loads(texts["fused"])["modelspec.architecture"] == "stable-diffusion-v1"


def test_mixed_rank_metadata_is_true(tmp_path):
    mods = factors()
    mods[C] = factors(rank=6)[C]
    r = cli("convert", kohya(tmp_path / "mixed.safetensors", mods), "--out", tmp_path / "out.safetensors")
    assert r.exit_code == 0, r.output
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        md = f.metadata()
        dims = sorted({f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("lora_down.weight")})
    assert dims == [2, 6] and md["ss_network_dim"] == "Dynamic"
    rec = json.loads(md["lcmtool.ranks"])
    assert rec["max"] == 6 and rec["min"] == 2 and rec["modules"] == {K: 2, C: 6}
