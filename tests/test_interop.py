"""Interop with the tools users already run (issue 17): a LoRA's text-encoder part is applied on the fused path and
by `merge --method fuse`; SDXL kohya output has the SGM names kohya's SDXL tools read; PNG infotext A1111 parses
(its LoRA hash, model hash, schedule type, <lora:...> tags); metadata kohya / ModelSpec readers expect.

Oracles are built here, independently of lcmtool's own maps: kohya-style key names written by hand, the SGM
layout of SDXL from its architecture (sgm/modules/diffusionmodules/openaimodel.py), A1111's infotext regex and
addnet hash, and base + delta computed from the raw tensors.
"""
from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lcmtool.cli import app
from lcmtool.demo import ASSETS

PROMPT = "a large red circle on the left"
FOLDERS = {"sd": ASSETS / "demo-sd", "xl": ASSETS / "demo-xl"}
LCM = {fam: ASSETS / f"lcm-lora-demo-{fam}.safetensors" for fam in FOLDERS}
STYLE = ASSETS / "style-outline-demo-sd.safetensors"
built = pytest.mark.skipif(not all((f / "model_index.json").is_file() for f in FOLDERS.values()),
                           reason="demo world not built")


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def pixels(folder) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(next(folder.glob("*.png"))).convert("RGB")).astype(np.int16)


def addnet_hash(path) -> str:
    """A1111's LoRA hash (modules/hashes.py addnet_hash_safetensors): sha256 of the bytes after the header."""
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()


def te_kohya_file(fam: str, path, scale: float = 0.3, seed: int = 0) -> dict:
    """A kohya text-encoder LoRA for the demo model's text encoders, named as sd-scripts names them:
    lora_te_ (SD-1.5) or lora_te1_ / lora_te2_ (SDXL) + text_model_encoder_layers_<i>_<self_attn_q_proj|...>.
    Returns {(encoder, module path inside its text_model): (down, up, alpha)}."""
    from transformers import CLIPTextConfig

    g = torch.Generator().manual_seed(seed)
    encoders = {"text_encoder": "lora_te_"} if fam == "sd" else {"text_encoder": "lora_te1_",
                                                                  "text_encoder_2": "lora_te2_"}
    sd, want = {}, {}
    for te, prefix in encoders.items():
        conf = CLIPTextConfig.from_pretrained(FOLDERS[fam] / te)
        h, f = conf.hidden_size, conf.intermediate_size
        for i in range(conf.num_hidden_layers):
            mods = {f"self_attn.{x}_proj": (h, h) for x in ("q", "k", "v", "out")}
            mods.update({"mlp.fc1": (f, h), "mlp.fc2": (h, f)})
            for name, (out, inp) in mods.items():
                stem = prefix + f"text_model_encoder_layers_{i}_" + name.replace(".", "_")
                down = torch.randn(4, inp, generator=g) * scale
                up = torch.randn(out, 4, generator=g) * scale
                sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = down, up
                sd[f"{stem}.alpha"] = torch.tensor(2.0)
                want[(te, f"encoder.layers.{i}.{name}")] = (down, up, 2.0)
    save_file(sd, str(path))
    return want


# ---- 1. the text-encoder part of a LoRA on the fused (default) path of sample ----

@built
@pytest.mark.parametrize("fam", ["sd", "xl"])
def test_te_lora_fused_equals_unfused_and_changes_the_image(fam, tmp_path):
    te = tmp_path / "te.safetensors"
    te_kohya_file(fam, te)
    common = ["sample", "--model", f"demo:{fam}", "--prompt", PROMPT, "--steps", 2]
    for name, extra in {"fused": ["--lora", te, "--lora", LCM[fam]],
                        "unfused": ["--lora", te, "--lora", LCM[fam], "--no-fuse"],
                        "no-te": ["--lora", LCM[fam]]}.items():
        r = cli(*common, *extra, "--out", tmp_path / name)
        assert r.exit_code == 0, r.output
    fused, unfused, plain = (pixels(tmp_path / n) for n in ("fused", "unfused", "no-te"))
    assert np.abs(fused - unfused).max() <= 2  # diffusers' own loader applies the TE part: so must the fuse
    assert np.abs(fused - plain).max() > 10  # and the TE part is visible


# ---- 2. merge --method fuse with a text-encoder part (transformers 5: CLIPTextModel has no text_model level,
#         CLIPTextModelWithProjection keeps it; demo:xl has one of each) ----

@built
def test_fuse_with_te_writes_base_plus_delta(tmp_path):
    import transformers

    te = tmp_path / "te.safetensors"
    want = te_kohya_file("xl", te, scale=0.1, seed=3)
    w = 0.7
    r = cli("merge", "--method", "fuse", "--model", "demo:xl", "--add", f"{te}:{w}", "--dtype", "fp32",
            "--out", tmp_path / "fused", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["modules"] == len(want)
    checked = 0
    for name, cls in (("text_encoder", "CLIPTextModel"), ("text_encoder_2", "CLIPTextModelWithProjection")):
        base = getattr(transformers, cls).from_pretrained(FOLDERS["xl"] / name).state_dict()
        got = getattr(transformers, cls).from_pretrained(tmp_path / "fused" / name).state_dict()
        assert set(base) == set(got)
        for key, v in got.items():
            stem = key.removeprefix("text_model.").removesuffix(".weight")
            expect = base[key].float()
            if (name, stem) in want and key.endswith(".weight"):
                down, up, alpha = want[(name, stem)]
                expect = expect + w * (alpha / down.shape[0]) * (up @ down)
                checked += 1
            assert float((v.float() - expect).abs().max()) <= 1e-5 * max(1.0, float(expect.abs().max())), key
    assert checked == len(want)


# ---- 3. SDXL kohya output: SGM names (kohya's sdxl_merge_lora.py, A1111, civitai) ----

def sgm_sdxl_names() -> set[str]:
    """The SGM module names of SDXL's UNet for the 14 LCM-LoRA module kinds, from its architecture: model_channels
    320, channel_mult (1, 2, 4), num_res_blocks 2, transformer_depth (0, 2, 10), middle depth 10. A ResBlock is
    in_layers.2 / out_layers.3 (convs), emb_layers.1 (linear) and a skip_connection where its channels change
    (every output block: it concatenates a skip); a SpatialTransformer is proj_in / proj_out and per block attn1,
    attn2 (to_q, to_k, to_v, to_out.0), ff.net.0.proj, ff.net.2; Downsample is `op`, Upsample `conv`."""
    names: set[str] = set()

    def res(p, skip):
        names.update({f"{p}.in_layers.2", f"{p}.out_layers.3", f"{p}.emb_layers.1"} | ({f"{p}.skip_connection"}
                                                                                       if skip else set()))

    def st(p, depth):
        names.update({f"{p}.proj_in", f"{p}.proj_out"})
        for d in range(depth):
            b = f"{p}.transformer_blocks.{d}"
            names.update(f"{b}.{a}.{x}" for a in ("attn1", "attn2") for x in ("to_q", "to_k", "to_v", "to_out.0"))
            names.update({f"{b}.ff.net.0.proj", f"{b}.ff.net.2"})

    ch, depth = (320, 640, 1280), (0, 2, 10)
    i, prev = 1, 320
    for level in range(3):
        for _ in range(2):
            res(f"input_blocks.{i}.0", prev != ch[level])
            if depth[level]:
                st(f"input_blocks.{i}.1", depth[level])
            prev, i = ch[level], i + 1
        if level < 2:
            names.add(f"input_blocks.{i}.0.op")
            i += 1
    res("middle_block.0", False)
    st("middle_block.1", 10)
    res("middle_block.2", False)
    i = 0
    for level in reversed(range(3)):
        for j in range(3):
            res(f"output_blocks.{i}.0", True)
            k = 2 if depth[level] else 1
            if depth[level]:
                st(f"output_blocks.{i}.1", depth[level])
            if level > 0 and j == 2:
                names.add(f"output_blocks.{i}.{k}.conv")
            i += 1
    return names


def kohya_te_names() -> set[str]:
    """kohya's SDXL text-encoder LoRA names: CLIP ViT-L (12 layers) as te1, OpenCLIP bigG (32) as te2."""
    mods = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")
    return {f"lora_te{t}_text_model_encoder_layers_{i}_{m}" for t, n in ((1, 12), (2, 32)) for i in range(n)
            for m in mods}


@pytest.fixture(scope="module")
def sdxl_lora(tmp_path_factory):
    """A rank-1 LoRA on SDXL's 14 LCM module kinds and both text encoders' attention / MLP, in diffusers format."""
    from lcmtool.lora import fit, synth
    from lcmtool.lora.io import save_lora

    shapes = synth.target_shapes(synth.meta_unet("sdxl"))
    shapes.update({p: s for p, s in fit.family_shapes("sdxl").items() if re.search(r"(self_attn|mlp)\.\w+$", p)})
    d = tmp_path_factory.mktemp("sdxl")
    lf = synth.synth_lora(shapes, rank=1, seed=5, dtype=torch.float16, family="sdxl")
    save_lora(lf, d / "in.safetensors", format="diffusers")
    return d, lf


def _stems(path) -> set[str]:
    keys = load_file(str(path)).keys()
    return {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}


def test_sdxl_kohya_output_has_sgm_names_convert_and_merge(sdxl_lora):
    d, lf = sdxl_lora
    unet_table = {"lora_unet_" + n.replace(".", "_") for n in sgm_sdxl_names()}
    table = unet_table | kohya_te_names()
    r = cli("convert", d / "in.safetensors", "--format", "kohya", "--out", d / "conv.safetensors", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["format"] == "kohya-sgm"
    r = cli("merge", "--add", f"{d / 'in.safetensors'}:0.5", "--out", d / "merged.safetensors", "--json")
    assert r.exit_code == 0, r.output
    for out in ("conv", "merged"):
        stems = _stems(d / f"{out}.safetensors")
        assert len(stems) == len(lf.modules) == len(table)
        assert stems == table, sorted(stems ^ table)[:5]  # every key maps in the kohya-style SGM table
        with safe_open(str(d / f"{out}.safetensors"), "pt") as f:
            md = f.metadata()
        assert md["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
        assert md["modelspec.resolution"] == "1024x1024" and md["ss_base_model_version"] == "sdxl_base_v1-0"
    # diffusers block names only on request
    r = cli("convert", d / "in.safetensors", "--format", "kohya-diffusers", "--out", d / "diff.safetensors")
    assert r.exit_code == 0, r.output
    stems = _stems(d / "diff.safetensors")
    assert not stems & unet_table and any(s.startswith("lora_unet_down_blocks_1_attentions_0") for s in stems)
    with safe_open(str(d / "diff.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.implementation"] == "diffusers"


# ---- 4. PNG infotext as A1111 writes and reads it ----

RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111 infotext_utils.re_param
RE_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")  # A1111 extra_networks.re_extra_net


def a1111_parse(text: str) -> tuple[str, dict]:
    """parse_generation_parameters, reduced: prompt lines, then the 'Key: value, ...' line."""
    *lines, last = text.strip().split("\n")
    fields = {}
    for k, v in RE_PARAM.findall(last):
        fields[k] = json.loads(v) if v[:1] == '"' and v[-1:] == '"' else v
    return "\n".join(ln for ln in lines if not ln.startswith("Negative prompt:")), fields


@built
def test_png_infotext_hashes_tags_and_exact_prompt(tmp_path):
    from lcmtool.engines.evaluate import png_prompt
    from lcmtool.outputs.png import read_png_meta

    # a single-file checkpoint (for A1111's model hash) and two LoRAs: one lcmtool wrote, one it did not
    r = cli("merge", "--method", "fuse", "--model", "demo:sd", "--add", f"{LCM['sd']}:1", "--format", "single-file",
            "--dtype", "fp32", "--out", tmp_path / "model.safetensors")
    assert r.exit_code == 0, r.output
    r = cli("merge", "--add", f"{STYLE}:1", "--out", tmp_path / "style-ours.safetensors")
    assert r.exit_code == 0, r.output
    ours = tmp_path / "style-ours.safetensors"
    with safe_open(str(ours), "pt") as f:
        md = f.metadata()
    assert md["sshs_model_hash"] == addnet_hash(ours) and md["modelspec.hash_sha256"] == "0x" + addnet_hash(ours)
    r = cli("sample", "--model", tmp_path / "model.safetensors", "--tokenizer", FOLDERS["sd"] / "tokenizer",
            "--height", 64, "--width", 64, "--prompt", PROMPT, "--scheduler", "dpmpp", "--steps", 2,
            "--set", "timestep_spacing=trailing", "--lora", f"{STYLE}:0.8", "--lora", f"{ours}:0.25",
            "--out", tmp_path / "png")
    assert r.exit_code == 0, r.output
    png = next((tmp_path / "png").glob("*.png"))
    meta = read_png_meta(png)
    prompt, fields = a1111_parse(meta["parameters"])
    assert RE_EXTRA_NET.findall(prompt) == [("lora", "style-outline-demo-sd:0.8"), ("lora", "style-ours:0.25")]
    assert RE_EXTRA_NET.sub("", prompt).strip() == PROMPT
    hashes = dict(h.split(": ") for h in fields["Lora hashes"].split(", "))
    assert hashes == {"style-outline-demo-sd": addnet_hash(STYLE)[:12], "style-ours": addnet_hash(ours)[:12]}
    assert fields["Model hash"] == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()[:10]
    assert fields["Model"] == "model" and fields["Schedule type"] == "Simple" and fields["Sampler"] == "DPM++ 2M"
    assert (fields["Steps"], fields["Seed"], fields["Size"]) == ("2", "0", "64x64")
    assert meta["lcmtool"]["prompt"] == PROMPT and png_prompt(png) == PROMPT  # eval reads the exact prompt
    assert str(tmp_path) not in json.dumps(meta["lcmtool"])  # files by name and hash, no local folders


# ---- 5. metadata kohya and ModelSpec readers expect ----

def test_metadata_dynamic_ranks_modelspec_and_no_local_paths(tmp_path):
    from lcmtool.lora import metadata as md_
    from lcmtool.lora import synth
    from lcmtool.lora.io import save_lora

    shapes = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (320, 768),
              "down_blocks.0.resnets.0.conv1": (320, 320, 3, 3)}
    a = synth.synth_lora(shapes, rank=lambda p: 4 if "conv" in p else 8, alpha=2.0, seed=1, family="sd15")
    save_lora(a, tmp_path / "a.safetensors")
    r = cli("merge", "--add", f"{tmp_path / 'a.safetensors'}:1", "--out", tmp_path / "m.safetensors")
    assert r.exit_code == 0, r.output
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["ss_network_dim"] == "Dynamic" and md["ss_network_alpha"] == "8"  # one alpha per written file
    ranks = json.loads(md["lcmtool.ranks"])
    assert ranks["max"] == 8 and ranks["modules"] == {p: (4 if "conv" in p else 8) for p in shapes}
    assert md["modelspec.sai_model_spec"] == "1.0.1" and md["modelspec.resolution"] == "512x512"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora" and md["modelspec.implementation"] == "diffusers"
    assert md["modelspec.implementation_version"].startswith("lcmtool/")
    assert json.loads(md["lcmtool"])["inputs"][0]["path"] == "a.safetensors"
    assert not any(str(tmp_path) in v for v in md.values())
    # kohya's convention for alphas that differ by module, and for one rank
    assert md_.kohya_metadata({"x": 4, "y": 4}, {"x": 1.0, "y": 2.0}, None)["ss_network_alpha"] == "Dynamic"
    assert md_.kohya_metadata({"x": 4, "y": 4}, {"x": 1.0, "y": 1.0}, "sdxl")["ss_network_dim"] == "4"


@built
def test_shipped_files_carry_no_local_paths_and_true_ranks():
    for fam in FOLDERS:
        with safe_open(str(LCM[fam]), "pt") as f:
            md = f.metadata()
        text = json.dumps(md)
        assert "/tmp/" not in text and "runs/" not in text and "/work/" not in text
        # the largest rank: 16 in the XL LoRA, 32 in the SD extract (conv_in and the time embedding)
        assert md["ss_network_dim"] == "Dynamic" and json.loads(md["lcmtool.ranks"])["max"] == {"sd": 32, "xl": 16}[fam]
        assert md["sshs_model_hash"] == addnet_hash(LCM[fam])
        vae = json.loads((FOLDERS[fam] / "vae" / "config.json").read_text())
        assert "_name_or_path" not in vae
