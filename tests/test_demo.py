"""The embedded demo world: renderer, captions, held-out split, tokenizer, and the shipped teachers.

Reference images live in tests/data; regenerate them (after retraining) with LCMTOOL_REGEN=1.
"""
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lcmtool.demo import ASSETS, arch, world

DATA = Path(__file__).parent / "data"
REGEN = os.environ.get("LCMTOOL_REGEN") == "1"


def _check_reference(name: str, img: np.ndarray, max_abs: int, mean_abs: float):
    path = DATA / name
    if REGEN:
        DATA.mkdir(exist_ok=True)
        Image.fromarray(img).save(path)
    ref = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
    diff = np.abs(ref - img.astype(np.int16))
    assert diff.max() <= max_abs and diff.mean() <= mean_abs, (diff.max(), diff.mean())


def test_render_matches_reference():
    rng = random.Random(1234)
    scenes = [world.sample_scene(rng, style=s) for s in world.STYLE_NAMES for _ in range(4)]
    grid = world.to_uint8(world.render(scenes)).view(3, 4, 64, 64, 3).permute(0, 2, 1, 3, 4).reshape(192, 256, 3)
    _check_reference("render_seed1234.png", grid.numpy(), max_abs=1, mean_abs=0.01)


def test_captions_round_trip_and_heldout_split():
    rng = random.Random(0)
    train = [world.sample_scene(rng, split="train") for _ in range(3000)]
    for sc in train[:200]:
        objs, style = world.parse_caption(world.caption(sc))
        assert tuple(objs) == sc.objs and style == sc.style
    pairs = {(o.shape, o.color) for sc in train for o in sc.objs}
    assert not pairs & world.HELDOUT_PAIRS          # never rendered for training
    assert len(pairs) == 4 * 6 - 4                   # every other pair is
    held = world.heldout_prompts()
    assert len(held) == 40 and len(set(held)) == 40
    assert all((o.shape, o.color) in world.HELDOUT_PAIRS for p in held for o in world.parse_caption(p)[0])
    # the world's promised variety: >= 4 shapes, 6 colours, 5 positions, 2 sizes, 3 backgrounds, 2 styles
    assert (len(world.SHAPES), len(world.COLORS), len(world.POSITIONS), len(world.SIZES)) == (4, 6, 5, 2)
    assert len(world.BACKGROUNDS) >= 3 and len(world.STYLES) - 1 >= 2


def test_tokenizer_one_token_per_demo_word():
    tok = arch.build_tokenizer()
    for w in world.VOCAB_WORDS:
        ids = tok(w).input_ids
        assert len(ids) == 3, (w, tok.convert_ids_to_tokens(ids))  # BOS, word, EOS
    longest = world.caption(world.Scene((world.Obj("triangle", "purple", "bottom", "small"),
                                         world.Obj("triangle", "purple", "top", "large")), 0, "outline"))
    assert len(tok(longest).input_ids) <= arch.MAX_TOKENS


@pytest.mark.parametrize("fam", ["sd", "xl"])
def test_teacher_loads_in_plain_diffusers_and_matches_reference(fam):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionPipeline if fam == "sd" else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(ASSETS / f"demo-{fam}")  # no lcmtool code involved
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.sample_size == 8 and pipe.vae.config.latent_channels == 4
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.num_train_timesteps == 1000
    if fam == "xl":
        assert pipe.unet.config.addition_embed_type == "text_time"
        assert pipe.text_encoder.config.hidden_size != pipe.text_encoder_2.config.hidden_size
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    g = torch.Generator().manual_seed(0)
    img = pipe("a large red circle on the left", num_inference_steps=25, guidance_scale=7.5, generator=g,
               output_type="np").images[0]
    img = (img * 255).round().astype(np.uint8)
    # float differences between CPUs stay far below one grey level on average; a few pixels may flip by more
    _check_reference(f"teacher_{fam}_seed0.png", img, max_abs=12, mean_abs=0.5)
    # and it draws what was asked: red dominates the left half
    left = img[:, :32].reshape(-1, 3).astype(int)
    red = ((left[:, 0] > 150) & (left[:, 1] < 90) & (left[:, 2] < 90)).sum()
    assert red > 80, red


def test_shipped_weights_budget():
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.suffix in (".safetensors", ".bin"))
    # identical files (the shared VAE) are stored once by git
    seen, unique = set(), 0
    import hashlib

    for p in ASSETS.rglob("*.safetensors"):
        h = hashlib.sha256(p.read_bytes()).hexdigest()
        if h not in seen:
            seen.add(h)
            unique += p.stat().st_size
    assert unique <= 30 * 2**20, (unique, total)
