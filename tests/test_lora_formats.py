"""Key formats and alphas: every format reads into the canonical form and writes back without changing a delta."""
import pytest
import torch
from safetensors.torch import save_file

from lcmtool.errors import LcmError
from lcmtool.lora import formats, synth
from lcmtool.lora import math as M
from lcmtool.lora.io import load_lora, save_lora, unet_preset
from lcmtool.models import ldm_names as sgm


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def deltas_equal(a, b, tol=1e-6):
    assert set(a.modules) == set(b.modules)
    for p in a.modules:
        assert rel(b.modules[p].delta(), a.modules[p].delta()) < tol, p


def test_alpha_variants(tmp_path):
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 32, generator=g), torch.randn(16, 4, generator=g)
    base = "lora_unet_down_blocks_0_attentions_0_proj_in"
    cases = {"missing": (None, 1.0), "int64": (torch.tensor(2, dtype=torch.int64), 0.5),
             "fp16": (torch.tensor(8.0, dtype=torch.float16), 2.0), "bf16": (torch.tensor(3.0, dtype=torch.bfloat16),
                                                                             0.75),
             "fp32_1d": (torch.tensor([6.0]), 1.5)}
    for name, (alpha, scale) in cases.items():
        sd = {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up}
        if alpha is not None:
            sd[f"{base}.alpha"] = alpha
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
        lf = load_lora(tmp_path / f"{name}.safetensors")
        m = lf.modules["down_blocks.0.attentions.0.proj_in"]
        assert lf.format == "kohya"
        assert rel(m.delta(), scale * up @ down) < 1e-6, name


def _tiny_sd15_shapes():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=768,
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)
    return synth.target_shapes(unet)


def test_round_trip_kohya_diffusers_peft_kohya(tmp_path):
    shapes = _tiny_sd15_shapes()  # linear, 1x1 and 3x3 modules
    lf = synth.synth_lora(shapes, rank=lambda p: 2 + len(p) % 3, alpha=lambda p: 1.0 + len(p) % 5, seed=1,
                          family="sd15")
    save_lora(lf, tmp_path / "a.safetensors", format="kohya")
    a = load_lora(tmp_path / "a.safetensors")
    assert a.format == "kohya" and a.family == "sd15"
    deltas_equal(lf, a)
    save_lora(a, tmp_path / "b.safetensors", format="diffusers")
    b = load_lora(tmp_path / "b.safetensors")
    assert b.format == "diffusers"
    save_lora(b, tmp_path / "adapter_model.safetensors", format="peft")
    c = load_lora(tmp_path / "adapter_model.safetensors")
    assert c.format == "peft" and (tmp_path / "adapter_config.json").is_file()
    save_lora(c, tmp_path / "d.safetensors", format="kohya")
    d = load_lora(tmp_path / "d.safetensors")
    for x in (b, c, d):
        deltas_equal(lf, x)
    # one alpha per written kohya file (see io.file_alpha) and no stale diffusers adapter metadata
    from safetensors import safe_open

    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        alphas = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}
        md = f.metadata()
    assert len(alphas) == 1 and "lora_adapter_metadata" not in md
    assert md["ss_network_module"] == "networks.lora" and md["ss_base_model_version"] == "sd_v1"


def test_diffusers_old_attn_processor_names(tmp_path):
    g = torch.Generator().manual_seed(0)
    d, u = torch.randn(4, 320, generator=g), torch.randn(320, 4, generator=g)
    stem = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    save_file({f"{stem}.to_out_lora.down.weight": d, f"{stem}.to_out_lora.up.weight": u,
               "unet.down_blocks.0.resnets.0.conv1.lora.down.weight": torch.randn(4, 320, 3, 3, generator=g),
               "unet.down_blocks.0.resnets.0.conv1.lora.up.weight": torch.randn(320, 4, 1, 1, generator=g)},
              str(tmp_path / "old.safetensors"))
    lf = load_lora(tmp_path / "old.safetensors")
    assert lf.format == "diffusers-old"
    assert set(lf.modules) == {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
                               "down_blocks.0.resnets.0.conv1"}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_real_key_sets_convert_and_merge_with_no_module_lost(tmp_path, family):
    """The exact module set of the released LCM-LoRAs (14 module kinds) on the family's meta-device UNet."""
    unet = synth.meta_unet(family)
    shapes = synth.target_shapes(unet)
    kinds = {k for p in shapes for k in synth.LCM_TARGETS if p == k or p.endswith("." + k)}
    assert kinds == set(synth.LCM_TARGETS)
    real = dict(unet.named_modules())
    # every name round-trips through kohya keys (and SGM keys for SDXL) back to a module that exists
    fmts = ["kohya", "diffusers", "peft"] + (["kohya-sgm"] if family == "sdxl" else [])
    cfg = unet_preset(family)
    for fmt in fmts:
        keys = {formats.from_canonical(p, fmt, family, cfg): p for p in shapes}
        assert len(keys) == len(shapes), fmt
        for stem, p in keys.items():
            back = formats.to_canonical(stem, fmt, cfg)
            assert back == p and back in real, (fmt, stem, back)
    # merge two rank-1 LoRAs on the full set (tiny factors, real shapes): nothing lost, fused shapes match
    a = synth.synth_lora(shapes, rank=1, seed=1, family=family)
    b = synth.synth_lora(dict(list(shapes.items())[::2]), rank=1, seed=2, family=family)
    terms = M.group_terms([(a, 0.8), (b, 1.0)])
    merged = {p: M.concat(p, t) for p, t in terms.items()}
    assert set(merged) == set(shapes)
    for p, m in merged.items():
        assert tuple(m.out_shape) == tuple(real[p].weight.shape), p


def test_sgm_block_map_matches_diffusers(tmp_path):
    """Our SGM map agrees with diffusers' _maybe_map_sgm_blocks_to_diffusers on the SDXL layout."""
    from types import SimpleNamespace

    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    cfg = unet_preset("sdxl")
    shapes = synth.target_shapes(synth.meta_unet("sdxl"))
    sd = {formats.from_canonical(p, "kohya-sgm", "sdxl", cfg) + ".lora_down.weight": p for p in shapes}
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(sd), SimpleNamespace(layers_per_block=2))
    # diffusers keeps '_' delimiters and the sgm list names (renamed later by _convert_unet_lora_key)
    ren = {"input_blocks": "down_blocks", "middle_block": "mid_block", "output_blocks": "up_blocks",
           "in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
           "skip_connection": "conv_shortcut", "downsamplers_0_op": "downsamplers_0_conv"}
    got = set()
    for k in mapped:
        for a, b in ren.items():
            k = k.replace(a, b)
        got.add(k)
    assert got == {"lora_unet_" + p.replace(".", "_") + ".lora_down.weight" for p in shapes}
    assert sgm.sgm_to_diffusers("input_blocks.3.0.op", cfg) == "down_blocks.0.downsamplers.0.conv"


def test_sdxl_diffusers_names_plus_sgm_names_one_entry_per_weight(tmp_path):
    shapes = synth.target_shapes(synth.meta_unet("sdxl"))
    sub = dict(list(shapes.items())[::5])
    lcm = synth.synth_lora(sub, rank=2, seed=1, family="sdxl")
    style = synth.synth_lora(sub, rank=3, alpha=1.5, seed=2, family="sdxl")
    save_lora(lcm, tmp_path / "lcm.safetensors", format="kohya-diffusers")
    save_lora(style, tmp_path / "style.safetensors", format="kohya-sgm")
    a, b = load_lora(tmp_path / "lcm.safetensors"), load_lora(tmp_path / "style.safetensors")
    assert (a.format, b.format) == ("kohya", "kohya-sgm") and a.family == b.family == "sdxl"
    assert set(a.modules) == set(b.modules) == set(sub)
    terms = M.group_terms([(a, 1.0), (b, 0.8)])
    assert all(len(t) == 2 for t in terms.values())
    for p, t in terms.items():
        assert rel(M.concat(p, t).delta(), a.modules[p].delta() + 0.8 * b.modules[p].delta()) < 1e-6


def test_refused_variants_and_non_lora(tmp_path):
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 2)},
              str(tmp_path / "loha.safetensors"))
    with pytest.raises(LcmError, match="LoHa"):
        load_lora(tmp_path / "loha.safetensors")
    save_file({"conv_in.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(LcmError, match="not a LoRA"):
        load_lora(tmp_path / "model.safetensors")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_peft_bad_adapter_config_is_lcm_error(tmp_path, text):
    """A broken adapter_config.json beside a peft file used to escape as a JSONDecodeError / AttributeError."""
    g = torch.Generator().manual_seed(0)
    stem = "base_model.model.down_blocks.0.attentions.0.proj_in"
    save_file({f"{stem}.lora_A.weight": torch.randn(4, 32, generator=g),
               f"{stem}.lora_B.weight": torch.randn(16, 4, generator=g)}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(LcmError, match="adapter_config.json"):
        load_lora(tmp_path / "adapter_model.safetensors")


def test_sgm_block_map_built_once_per_config(monkeypatch):
    """The name maps are memoised per UNet config (they were rebuilt for every module name)."""
    cfg = dict(unet_preset("sdxl"), _test_key="memo")  # a config no other test has memoised
    calls = []
    real = sgm.block_map
    monkeypatch.setattr(sgm, "block_map", lambda c: calls.append(1) or real(c))
    names = ["down_blocks.1.attentions.0.proj_in", "up_blocks.0.resnets.1.conv1", "mid_block.resnets.0.conv2"]
    for n in names:
        assert sgm.sgm_to_diffusers(sgm.diffusers_to_sgm(n, cfg), cfg) == n
    assert len(calls) == 1
