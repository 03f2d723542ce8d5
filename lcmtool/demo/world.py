"""Procedural text-to-image world: coloured shapes on plain backgrounds, with captions.

Deterministic: a scene is a list of `Obj` and a background; `render` draws scenes as 64x64 RGB with 4x4
supersampled anti-aliasing in torch (CPU or GPU). `sample_scenes(rng, n, split)` draws random scenes
from the training split or the held-out split (shape-colour pairs never seen in training).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

SIZE = 64  # pixels; the VAE's factor 8 gives 8x8x4 latents, small enough to train on a CPU
SHAPES = ["circle", "square", "triangle", "cross"]
COLORS = {  # well separated in RGB so a small VAE keeps them apart
    "red": (220, 35, 35),
    "green": (35, 175, 55),
    "blue": (40, 70, 225),
    "yellow": (240, 215, 35),
    "purple": (150, 45, 200),
    "white": (240, 240, 240),
}
COLOR_NAMES = list(COLORS)
POSITIONS = {  # centre of the object in pixels, and the caption phrase
    "left": ((16, 32), "on the left"),
    "right": ((48, 32), "on the right"),
    "top": ((32, 16), "at the top"),
    "bottom": ((32, 48), "at the bottom"),
    "centre": ((32, 32), "in the centre"),
}
POSITION_NAMES = list(POSITIONS)
SIZES = {"small": 7.0, "large": 12.0}  # radius in pixels
SIZE_NAMES = list(SIZES)
BACKGROUNDS = [(18, 18, 18), (95, 95, 95), (28, 38, 72)]
# Styles change how a shape is drawn, not what is drawn; each has a trigger phrase appended to the caption.
STYLES = {"solid": "", "outline": "outline style", "striped": "striped style"}
STYLE_NAMES = list(STYLES)
# Held out: shape-colour pairs never rendered for training (one per shape, each colour at most once).
HELDOUT_PAIRS = {("circle", "yellow"), ("square", "purple"), ("triangle", "green"), ("cross", "blue")}
PAIRS_OF_POSITIONS = [("left", "right"), ("top", "bottom")]  # two objects never overlap
VOCAB_WORDS = (["a", "and", "on", "the", "at", "in", "style", ","] + SHAPES + COLOR_NAMES + SIZE_NAMES
               + ["left", "right", "top", "bottom", "centre", "outline", "striped"])


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    position: str
    size: str


@dataclass(frozen=True)
class Scene:
    objs: tuple[Obj, ...]
    background: int = 0
    style: str = "solid"
    jitter: tuple[float, float, float] = (0.0, 0.0, 0.0)  # dx, dy (pixels), radius scale - 1


def caption(scene: Scene) -> str:
    """'a large red circle on the left and a small blue square on the right, outline style'."""
    parts = [f"a {o.size} {o.color} {o.shape} {POSITIONS[o.position][1]}" for o in scene.objs]
    text = " and ".join(parts)
    if scene.style != "solid":
        text += ", " + STYLES[scene.style]
    return text


def parse_caption(text: str) -> tuple[list[Obj], str]:
    """Inverse of `caption` (used by the evaluator to score an image against its prompt)."""
    text = text.strip().lower()
    style = "solid"
    for name, trig in STYLES.items():
        if trig and text.endswith(", " + trig):
            style, text = name, text[: -len(trig) - 2]
    objs = []
    for part in text.split(" and "):
        words = part.split()
        if len(words) < 6 or words[0] != "a":
            raise ValueError(f"not a demo caption: {part!r}")
        size, color, shape = words[1:4]
        phrase = " ".join(words[4:])
        pos = next((k for k, (_, p) in POSITIONS.items() if p == phrase), None)
        if size not in SIZES or color not in COLORS or shape not in SHAPES or pos is None:
            raise ValueError(f"not a demo caption: {part!r}")
        objs.append(Obj(shape, color, pos, size))
    return objs, style


def _allowed(shape: str, color: str, split: str) -> bool:
    held = (shape, color) in HELDOUT_PAIRS
    return held if split == "heldout" else not held


def sample_scene(rng: random.Random, split: str = "train", style: str = "solid", two_prob: float = 0.3,
                 jitter: bool = True) -> Scene:
    """One random scene; `split` 'train' never uses a held-out shape-colour pair, 'heldout' only those."""
    def obj(pos):
        while True:
            s, c = rng.choice(SHAPES), rng.choice(COLOR_NAMES)
            if _allowed(s, c, split):
                return Obj(s, c, pos, rng.choice(SIZE_NAMES))

    if rng.random() < two_prob:
        objs = tuple(obj(p) for p in rng.choice(PAIRS_OF_POSITIONS))
    else:
        objs = (obj(rng.choice(POSITION_NAMES)),)
    jit = (rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5), rng.uniform(-0.08, 0.08)) if jitter else (0.0, 0.0, 0.0)
    return Scene(objs, rng.randrange(len(BACKGROUNDS)), style, jit)


def heldout_prompts(style: str = "solid") -> list[str]:
    """The evaluation prompts: every held-out shape-colour pair at every position and size (40 prompts)."""
    out = []
    for shape, color in sorted(HELDOUT_PAIRS):
        for pos in POSITION_NAMES:
            for size in SIZE_NAMES:
                out.append(caption(Scene((Obj(shape, color, pos, size),), 0, style)))
    return out


def _coverage(shape: str, style: str, u: torch.Tensor, v: torch.Tensor, r: float) -> torch.Tensor:
    """Boolean mask of a shape of radius r at offsets (u, v) from its centre, in the given style."""
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


def render(scenes: list[Scene], device: str | torch.device = "cpu", ss: int = 4) -> torch.Tensor:
    """Draw scenes as a float tensor [N, 3, 64, 64] in [-1, 1] (4x4 supersampling)."""
    n = SIZE * ss
    coords = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / ss
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    out = torch.empty(len(scenes), 3, SIZE, SIZE, device=device)
    for i, sc in enumerate(scenes):
        img = torch.tensor(BACKGROUNDS[sc.background], device=device, dtype=torch.float32).view(3, 1, 1)
        img = img.expand(3, n, n).clone()
        dx, dy, ds = sc.jitter
        for o in sc.objs:
            (cx, cy), _ = POSITIONS[o.position]
            cov = _coverage(o.shape, sc.style, xx - (cx + dx), yy - (cy + dy), SIZES[o.size] * (1 + ds))
            col = torch.tensor(COLORS[o.color], device=device, dtype=torch.float32).view(3, 1, 1)
            img = torch.where(cov, col, img)
        img = torch.nn.functional.avg_pool2d(img[None], ss)[0]
        out[i] = img / 127.5 - 1.0
    return out


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 HWC (batch kept)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
