"""Oracle: diffusers load_lora_weights + fuse_lora of our merged file == set_adapters([lcm, style], [l2, l1]) +
fuse_lora of the inputs, to 1e-5 in fp32, on small random UNets (SD-1.5 layout; SDXL layout with SGM names)."""
import copy
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file

from lcmtool.engines.merge import MergeConfig, run_merge
from lcmtool.lora import formats, synth
from lcmtool.lora.fuse import fuse_into_unet
from lcmtool.lora.io import load_lora, unet_preset

L1, L2 = 0.8, 1.0
TOL = 1e-5


def write_raw_kohya(lf_modules, path, fmt="kohya", cfg=None):
    """Write per-module alphas as they are (our writer normalises them; real files do not)."""
    sd = {}
    for p, m in lf_modules.items():
        stem = formats.from_canonical(p, fmt, "sdxl", cfg)
        sd[stem + ".lora_down.weight"], sd[stem + ".lora_up.weight"] = m.A, m.B
        sd[stem + ".alpha"] = torch.tensor(m.alpha)
    save_file(sd, str(path))


def make_inputs(shapes, seed):
    names = sorted(shapes)
    # Ranks and alphas differ between the files and from module to module. diffusers reads a kohya file's
    # attention-module alphas as the file's most common alpha (its alpha_pattern names never match them), so
    # inputs keep that alpha on attention modules: then the oracle reads the inputs right.
    style = synth.synth_lora(shapes, rank=lambda p: 2 + names.index(p) % 3,
                             alpha=lambda p: 3.0 if ".attn" in p else (1.0, 3.0, 8.0)[names.index(p) % 3], seed=seed)
    lcm_shapes = {p: s for i, (p, s) in enumerate(sorted(shapes.items())) if i % 5}  # some modules only in style
    lcm = synth.synth_lora(lcm_shapes, rank=lambda p: (4, 6)[names.index(p) % 2],
                           alpha=lambda p: 4.0 if ".attn" in p else (4.0, 2.5)[names.index(p) % 2], seed=seed + 1)
    for lf, common in ((style, 3.0), (lcm, 4.0)):
        assert Counter(m.alpha for m in lf.modules.values()).most_common(1)[0][0] == common
    assert len(set(m.rank for m in style.modules.values())) > 1 and len(set(m.alpha for m in lcm.modules.values())) > 1
    return style, lcm


def base_weights(unet):
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in unet.state_dict().items() if "lora_" not in k}


def check(pipe_cls, unet, tmp_path, style_fmt, cfg=None):
    from peft.tuners.tuners_utils import BaseTunerLayer

    shapes = synth.target_shapes(unet)
    style, lcm = make_inputs(shapes, 1)
    write_raw_kohya(style.modules, tmp_path / "style.safetensors", style_fmt, cfg)
    write_raw_kohya(lcm.modules, tmp_path / "lcm.safetensors")

    def pipe(u):
        kw = dict(vae=None, text_encoder=None, tokenizer=None, unet=u, scheduler=None)
        if pipe_cls.__name__ == "StableDiffusionXLPipeline":
            kw.update(text_encoder_2=None, tokenizer_2=None)
        else:
            kw.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        return pipe_cls(**kw)

    # oracle: both inputs as peft adapters with weights [lambda2, lambda1], fused
    u1 = copy.deepcopy(unet)
    p1 = pipe(u1)
    p1.load_lora_weights(str(tmp_path / "style.safetensors"), adapter_name="style")
    p1.load_lora_weights(str(tmp_path / "lcm.safetensors"), adapter_name="lcm")
    p1.set_adapters(["lcm", "style"], [L2, L1])
    p1.fuse_lora()
    # ours: one merged kohya file, loaded and fused by diffusers
    rep = run_merge(MergeConfig(style=str(tmp_path / "style.safetensors"), lcm=str(tmp_path / "lcm.safetensors"),
                                lambda1=L1, lambda2=L2, out=str(tmp_path / "merged.safetensors")))
    assert rep["modules"] == len(shapes)
    u2 = copy.deepcopy(unet)
    p2 = pipe(u2)
    p2.load_lora_weights(str(tmp_path / "merged.safetensors"), adapter_name="merged")
    # every key used: each merged module became a peft layer holding exactly our factors
    merged = load_lora(tmp_path / "merged.safetensors")
    layers = {n: m for n, m in u2.named_modules() if isinstance(m, BaseTunerLayer)}
    assert set(layers) == set(merged.modules)
    for n, m in merged.modules.items():
        assert torch.equal(layers[n].lora_A["merged"].weight.reshape(m.A.shape), m.A)
    p2.fuse_lora()
    # and our own fuse of the two inputs
    u3 = copy.deepcopy(unet)
    fuse_into_unet(u3, [(load_lora(tmp_path / "style.safetensors"), L1), (load_lora(tmp_path / "lcm.safetensors"),
                                                                             L2)])
    w0, w1, w2, w3 = (base_weights(u) for u in (unet, u1, u2, u3))
    moved = max(float((w1[k] - w0[k]).abs().max()) for k in w0)
    assert moved > 1e-2  # the LoRAs did change the UNet
    for k in w0:
        assert torch.allclose(w2[k], w1[k], atol=TOL, rtol=0), k
        assert torch.allclose(w3[k], w1[k], atol=TOL, rtol=0), k


def test_oracle_sd15_layout(tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=16,
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)
    check(StableDiffusionPipeline, unet, tmp_path, "kohya")


@pytest.mark.filterwarnings("ignore")
def test_oracle_sdxl_layout_style_with_sgm_names(tmp_path):
    """Same block layout as SDXL (so the SGM names map as in a real SDXL file), tiny widths."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    sdxl = unet_preset("sdxl")
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16, 16), layers_per_block=2,
                                norm_num_groups=8, down_block_types=tuple(sdxl["down_block_types"]),
                                up_block_types=tuple(sdxl["up_block_types"]), transformer_layers_per_block=(1, 1, 2),
                                cross_attention_dim=16, attention_head_dim=4, use_linear_projection=True)
    check(StableDiffusionXLPipeline, unet, tmp_path, "kohya-sgm", sdxl)
