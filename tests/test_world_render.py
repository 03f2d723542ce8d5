"""The vectorised demo renderer is bit-identical to the original per-scene loop (`world._render_reference`)."""
import random

import pytest
import torch

from lcmtool.demo import world
from lcmtool.demo.world import Obj, Scene


def _random_scenes(seed: int, n: int) -> list[Scene]:
    rng = random.Random(seed)
    return [world.sample_scene(rng, split=("train", "heldout")[i % 2], style=world.STYLE_NAMES[i // 2 % 3],
                               two_prob=0.5, jitter=i % 5 != 0) for i in range(n)]


def _odd_scenes() -> list[Scene]:
    """Outside sample_scene's range: no object, overlapping objects (later drawn over earlier), 3 objects, large
    or integer jitter, objects partly off the canvas, a negative background index."""
    a, b = Obj("circle", "red", "left", "large"), Obj("square", "blue", "left", "small")
    c, d = Obj("cross", "white", "centre", "large"), Obj("triangle", "yellow", "centre", "large")
    out = [Scene((), 1), Scene((a,), -1, "outline", (0, 0, 0))]
    for st in world.STYLE_NAMES:
        out += [Scene((a, b), 1, st, (0.3, -0.7, 0.05)), Scene((c, d, b), 2, st, (-1.1, 0.4, -0.06)),
                Scene((d, a), 0, st, (-13.0, 9.5, 0.4)), Scene((c,), 2, st, (25.0, -20.0, -0.5))]
    return out


def test_render_matches_reference_exactly():
    scenes = _random_scenes(0, 300) + _odd_scenes()
    assert {len(s.objs) for s in scenes} >= {1, 2} and {s.style for s in scenes} == set(world.STYLE_NAMES)
    new, ref = world.render(scenes), world._render_reference(scenes)
    assert new.shape == ref.shape == (len(scenes), 3, world.SIZE, world.SIZE) and new.dtype == ref.dtype
    assert (new - ref).abs().max().item() == 0.0


@pytest.mark.parametrize("ss", [2, 3])
def test_render_matches_reference_other_supersampling(ss):
    scenes = _random_scenes(1, 24) + _odd_scenes()
    assert torch.equal(world.render(scenes, ss=ss), world._render_reference(scenes, ss=ss))


def test_render_empty():
    out = world.render([])
    assert out.shape == (0, 3, world.SIZE, world.SIZE)


def test_chunking_does_not_change_results(monkeypatch):
    scenes = _random_scenes(2, 400) + _odd_scenes()
    full = world.render(scenes)
    pieces = torch.cat([world.render(scenes[i:i + 37]) for i in range(0, len(scenes), 37)])
    assert torch.equal(full, pieces)
    monkeypatch.setattr(world, "_CHUNK_CPU", 7)  # far below the size of every batch of objects
    assert torch.equal(world.render(scenes), full)


def test_render_rejects_unknown_shape_and_style():
    with pytest.raises(ValueError, match="shape"):
        world.render([Scene((Obj("hexagon", "red", "left", "large"),))])
    with pytest.raises(ValueError, match="style"):
        world.render([Scene((Obj("circle", "red", "left", "large"),), 0, "wavy")])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_render_matches_reference_on_gpu():
    scenes = _random_scenes(3, 300) + _odd_scenes()
    new, ref = world.render(scenes, device="cuda"), world._render_reference(scenes, device="cuda")
    assert new.device.type == "cuda" and torch.equal(new, ref)
