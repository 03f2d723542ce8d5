"""Single-file checkpoints (LDM/SGM layout, as A1111/ComfyUI keep them) load offline, with the shipped presets.

Fixtures: the demo teachers converted diffusers -> single file by lcmtool.models.export (diffusers' own
from_single_file conversion is the oracle for the way back). Real architectures (SD-1.5, SDXL, SSD-1B) are
checked on the meta device: preset -> modules -> single-file keys -> family and derived architecture.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from lcmtool.cli import app
from lcmtool.demo import ASSETS
from lcmtool.models import export as mc
from lcmtool.models import ldm_names
from lcmtool.models import single_file as sf
from lcmtool.models.load import load_pipeline
from lcmtool.models.single_file import PRESETS, single_file_family, write_clip_tokenizer

DEMO = {"sd": ASSETS / "demo-sd", "xl": ASSETS / "demo-xl"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _folder_pipe(name: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if name == "sd":
        return StableDiffusionPipeline.from_pretrained(DEMO[name], local_files_only=True, safety_checker=None,
                                                       requires_safety_checker=False)
    return StableDiffusionXLPipeline.from_pretrained(DEMO[name], local_files_only=True)


@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    """demo:sd and demo:xl as single-file .safetensors (+ demo:sd as a weights-only .ckpt)."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for name in DEMO:
        pipe = _folder_pipe(name)
        sd = mc.to_single_file(pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
        sd = {k: v.contiguous() for k, v in sd.items()}
        save_file(sd, root / f"demo-{name}.safetensors")
        out[name] = root / f"demo-{name}.safetensors"
        if name == "sd":
            torch.save({"state_dict": sd}, root / "demo-sd.ckpt")
            out["ckpt"] = root / "demo-sd.ckpt"
    return out


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("name", ["sd", "xl"])
def test_single_file_loads_offline_with_the_folders_weights(single_files, name):
    folder = _folder_pipe(name)
    pipe, family = load_pipeline(str(single_files[name]), config_dir=DEMO[name])
    assert family == {"sd": "sd15", "xl": "sdxl"}[name]
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(folder, comp, None), getattr(pipe, comp, None)
        if a is None:
            assert b is None
            continue
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), comp
        assert all(torch.equal(sa[k], sb[k]) for k in sa), comp


@pytest.mark.parametrize("name", ["sd", "xl"])
def test_sample_single_file_gives_the_folders_image(single_files, tmp_path, name):
    common = ["--prompt", "a red circle", "--steps", "2", "--seed", "3", "--lora", "none", "--device", "cpu"]
    r1 = _cli("sample", "--model", DEMO[name], "--out", tmp_path / "folder", *common)
    r2 = _cli("sample", "--model", single_files[name], "--set", f"model_config={DEMO[name]}",
              "--out", tmp_path / "file", *common)
    assert r1.exit_code == 0, r1.output
    assert r2.exit_code == 0, r2.output
    (a,), (b,) = sorted((tmp_path / "folder").glob("*.png")), sorted((tmp_path / "file").glob("*.png"))
    diff = np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16)).max()
    assert diff <= 2  # max abs pixel difference <= 2/255


def test_ckpt_loads_through_weights_only(single_files):
    pipe, family = load_pipeline(str(single_files["ckpt"]), config_dir=DEMO["sd"])
    ref = _folder_pipe("sd").unet.state_dict()
    assert family == "sd15"
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in ref.items())


class Payload:  # an arbitrary object: torch's weights_only unpickler must refuse it
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("kind", ["corrupt", "not-sd", "pickle"])
def test_bad_files_exit_2_with_one_line(tmp_path, kind):
    if kind == "corrupt":
        path = tmp_path / "broken.safetensors"
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(64))
    elif kind == "not-sd":
        path = tmp_path / "classifier.safetensors"
        save_file({"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}, path)
    else:
        path = tmp_path / "evil.ckpt"
        with open(path, "wb") as f:
            torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload()}, f, pickle_module=pickle)
    res = _cli("sample", "--model", path, "--prompt", "a", "--out", tmp_path / "out", "--device", "cpu")
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    expect = {"corrupt": "not a readable safetensors", "not-sd": "not a Stable Diffusion",
              "pickle": "weights_only"}[kind]
    assert expect in res.output
    assert not list((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else True


def _meta_single_file(family: str):
    """The real architecture of a preset, built on the meta device, as single-file names -> shapes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = PRESETS / family
    cfg = {c: json.loads((folder / c / "config.json").read_text())
           for c in ("unet", "vae", "text_encoder", "text_encoder_2") if (folder / c).is_dir()}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        te = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])) if "text_encoder_2" in cfg else None
    sd = mc.to_single_file(unet, vae, te, te2)
    return {k: tuple(v.shape) for k, v in sd.items()}, unet, cfg


@pytest.mark.parametrize("family", ["sd15", "sdxl", "ssd1b"])
def test_family_and_architecture_from_real_keys(family):
    from diffusers import UNet2DConditionModel

    shapes, unet, cfg = _meta_single_file(family)
    assert single_file_family(shapes) == family
    # landmarks of the published layouts
    if family == "sd15":
        assert shapes["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] == (49408, 768)
        assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in shapes
    else:
        assert shapes["conditioner.embedders.1.model.text_projection"] == (1280, 1280)
        assert shapes["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
        assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
    # keys -> architecture -> the same modules, shape for shape
    derived = sf.derive_unet(shapes, cfg["unet"], family)
    with torch.device("meta"):
        again = UNet2DConditionModel.from_config(derived)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in unet.state_dict().items()}
    assert sf.derive_vae(shapes, cfg["vae"]) == cfg["vae"] | {"use_quant_conv": True, "use_post_quant_conv": True}
    prefix = ldm_names.CLIP_SD15 if family == "sd15" else ldm_names.CLIP_L_XL
    assert sf.derive_clip(shapes, prefix, cfg["text_encoder"]) == cfg["text_encoder"]
    if family != "sd15":
        te2 = cfg["text_encoder_2"]
        assert sf.derive_clip(shapes, ldm_names.CLIP_G_XL, te2, open_clip=True) == te2
        assert derived["addition_time_embed_dim"] == 256


def test_ssd1b_up_path_is_read_from_keys():
    """An SSD-1B-like file whose up path differs from the mirrored down path still gets a UNet that fits it."""
    from diffusers import UNet2DConditionModel

    base = json.loads((PRESETS / "ssd1b" / "unet" / "config.json").read_text())
    asym = dict(base, transformer_layers_per_block=[[1, 1], [2, 2], [4, 4]],
                reverse_transformer_layers_per_block=[[4, 4, 2], [2, 1, 1], [1, 1, 1]])
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(asym)
    shapes = {k: tuple(v.shape) for k, v in mc.unet_to_ldm(unet.state_dict(), unet.config).items()}
    derived = sf.derive_unet(shapes, base, "ssd1b")
    assert derived["reverse_transformer_layers_per_block"] == [[4, 4, 2], [2, 1, 1], [1, 1, 1]]
    with torch.device("meta"):
        again = UNet2DConditionModel.from_config(derived)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in unet.state_dict().items()}


def test_shipped_clip_tokenizer_is_clips(tmp_path):
    from transformers import CLIPTokenizer

    write_clip_tokenizer(tmp_path)
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert len(tok) == 49408
    # CLIP ViT-L/14's ids for this prompt (as in SD-1.5 / SDXL tokenizers)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_tiny_file_without_config_fails_in_one_clear_line(single_files):
    from lcmtool.errors import LcmError

    with pytest.raises(LcmError, match="tokenizer has 49408 tokens") as e:
        load_pipeline(str(single_files["sd"]))
    assert "\n" not in str(e.value)


def test_presets_match_the_unet_files():
    for family, name in (("sd15", "sd15_unet.json"), ("sdxl", "sdxl_unet.json"), ("ssd1b", "ssd1b_unet.json")):
        assert json.loads((PRESETS / family / "unet" / "config.json").read_text()) == \
            json.loads((PRESETS / name).read_text())
    assert Path(PRESETS / "clip-tokenizer" / "merges.txt.gz").is_file()


def _preset_shaped(family: str):
    """A tiny random model whose unknowable numbers follow the presets' rules (8 heads / 64 per head, 32 groups)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    clip = dict(vocab_size=49408, max_position_embeddings=77, num_hidden_layers=1, bos_token_id=0, eos_token_id=2,
                pad_token_id=1)
    vae = AutoencoderKL(block_out_channels=[32, 32], layers_per_block=1, norm_num_groups=32,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    if family == "sd15":
        unet = UNet2DConditionModel(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=32,
                                    attention_head_dim=8, cross_attention_dim=64,
                                    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
        te = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=1,
                                          hidden_act="quick_gelu", **clip))
        return mc.to_single_file(unet, vae, te), unet
    unet = UNet2DConditionModel(block_out_channels=[64, 128], layers_per_block=1, norm_num_groups=32,
                                attention_head_dim=[1, 2], cross_attention_dim=192, transformer_layers_per_block=[1, 2],
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=64 + 6 * 8,
                                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
    te = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=1,
                                      hidden_act="quick_gelu", **clip))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=128, intermediate_size=256, num_attention_heads=2,
                                                     projection_dim=64, hidden_act="gelu", **clip))
    return mc.to_single_file(unet, vae, te, te2), unet


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_presets_alone_load_a_preset_shaped_file(tmp_path, family):
    """No config folder: presets + keys give the architecture, the shipped CLIP BPE the tokenizer; it samples."""
    sd, unet = _preset_shaped(family)
    path = tmp_path / f"tiny-{family}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    pipe, fam = load_pipeline(str(path))
    assert fam == family
    assert len(pipe.tokenizer) == 49408
    got = pipe.unet.state_dict()
    assert all(torch.equal(v, got[k]) for k, v in unet.state_dict().items())
    heads = pipe.unet.config.attention_head_dim
    assert heads == (8 if family == "sd15" else [1, 2])
    res = _cli("sample", "--model", path, "--prompt", "a photo of a cat", "--steps", "1", "--height", "64",
               "--width", "64", "--out", tmp_path / "out", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
