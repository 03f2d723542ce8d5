"""The vectorised demo renderer is bit-identical to the original per-scene loop (`render_reference` below)."""
import random

import pytest
import torch

from lcmtool.demo import world
from lcmtool.demo.world import Obj, Scene


def _coverage_reference(shape: str, style: str, u: torch.Tensor, v: torch.Tensor, r: float) -> torch.Tensor:
    """The original renderer's boolean mask of a shape of radius r at offsets (u, v) from its centre, in a style."""
    def fill(rr):
        if shape == "circle":
            return u * u + v * v <= rr * rr
        if shape == "square":
            return (u.abs() <= 0.82 * rr) & (v.abs() <= 0.82 * rr)
        if shape == "triangle":  # apex up
            return (u.abs() <= 0.58 * (v + rr)) & (v <= 0.75 * rr)
        if shape == "cross":
            w = 0.32 * rr
            return ((u.abs() <= w) & (v.abs() <= rr)) | ((v.abs() <= w) & (u.abs() <= rr))
        raise ValueError(f"unknown shape {shape!r}")

    m = fill(r)
    if style == "solid":
        return m
    if style == "outline":
        return m & ~fill(r - 2.6)
    if style == "striped":
        return m & (torch.floor((u + v) / 2.5) % 2 == 0)
    raise ValueError(f"unknown style {style!r}")


def render_reference(scenes: list[Scene], device: str | torch.device = "cpu", ss: int = 4) -> torch.Tensor:
    """The original per-scene renderer (a Python loop of small torch ops, ~10x slower): the oracle that
    `world.render` must match bit for bit."""
    n = world.SIZE * ss
    coords = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / ss
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    out = torch.empty(len(scenes), 3, world.SIZE, world.SIZE, device=device)
    for i, sc in enumerate(scenes):
        img = torch.tensor(world.BACKGROUNDS[sc.background], device=device, dtype=torch.float32).view(3, 1, 1)
        img = img.expand(3, n, n).clone()
        dx, dy, ds = sc.jitter
        for o in sc.objs:
            (cx, cy), _ = world.POSITIONS[o.position]
            cov = _coverage_reference(o.shape, sc.style, xx - (cx + dx), yy - (cy + dy), world.SIZES[o.size] * (1 + ds))
            col = torch.tensor(world.COLORS[o.color], device=device, dtype=torch.float32).view(3, 1, 1)
            img = torch.where(cov, col, img)
        img = torch.nn.functional.avg_pool2d(img[None], ss)[0]
        out[i] = img / 127.5 - 1.0
    return out


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
    new, ref = world.render(scenes), render_reference(scenes)
    assert new.shape == ref.shape == (len(scenes), 3, world.SIZE, world.SIZE) and new.dtype == ref.dtype
    assert (new - ref).abs().max().item() == 0.0


@pytest.mark.parametrize("ss", [2, 3])
def test_render_matches_reference_other_supersampling(ss):
    scenes = _random_scenes(1, 24) + _odd_scenes()
    assert torch.equal(world.render(scenes, ss=ss), render_reference(scenes, ss=ss))


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
    new, ref = world.render(scenes, device="cuda"), render_reference(scenes, device="cuda")
    assert new.device.type == "cuda" and torch.equal(new, ref)
