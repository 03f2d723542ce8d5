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


# Vectorised renderer. `render` reproduces the original per-scene loop (kept in tests/test_world_render.py as
# the oracle) bit for bit but (1) evaluates each object only in a
# small window around it (its coverage is empty elsewhere), (2) batches all objects of one shape, style and window
# size into one set of tensor ops, and (3) pools per-object subpixel counts instead of a full-resolution colour
# image: a pooled pixel is sum(colours of its ss*ss subpixels) / ss^2, and that sum of small integers is exact.
_SHAPE_INDEX = {s: i for i, s in enumerate(SHAPES)}
_STYLE_INDEX = {s: i for i, s in enumerate(STYLE_NAMES)}
_OUTLINE_INSET = 2.6  # the outline style draws fill(r) minus fill(r - 2.6)
_CHUNK_CPU = 256      # objects per batched evaluation on CPU: each [m, K, K] temporary stays <= ~15 MB
_CHUNK_ACCEL = 4096   # ... on an accelerator, where kernel launches rather than memory are the limit
_WINDOW_STEP = 6      # window sizes (pooled pixels) are rounded up to a multiple of this: fewer, larger batches


def _thresholds(rr: torch.Tensor) -> torch.Tensor:
    """[m, 5] float32 thresholds of a shape's fill(rr) from float64 radii rr: rr, rr*rr, 0.82*rr, 0.75*rr,
    0.32*rr, computed in float64 and rounded once to float32 -- exactly what happens to the reference's Python-float
    scalars when torch combines them with a float32 tensor."""
    return torch.stack([rr, rr * rr, 0.82 * rr, 0.75 * rr, 0.32 * rr], 1).to(torch.float32)


def _fill_batch(shape: str, u: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The shapes' fill for m objects at once: u [m, 1, K], v [m, K, 1], t [m, 5, 1, 1] from `_thresholds`."""
    r, r2, s, h, w = t.unbind(1)
    if shape == "circle":
        return u * u + v * v <= r2
    if shape == "square":
        return (u.abs() <= s) & (v.abs() <= s)
    if shape == "triangle":  # apex up
        return (u.abs() <= 0.58 * (v + r)) & (v <= h)
    if shape == "cross":
        au, av = u.abs(), v.abs()
        return ((au <= w) & (av <= r)) | ((av <= w) & (au <= r))
    raise ValueError(f"unknown shape {shape!r}")


def _coverage_batch(shape: str, style: str, u: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A shape's coverage in a style for m objects at once -> bool [m, K, K]; t [m, 10, 1, 1]: thresholds of r,
    then of r - 2.6."""
    m = _fill_batch(shape, u, v, t[:, :5])
    if style == "solid":
        return m
    if style == "outline":
        return m & ~_fill_batch(shape, u, v, t[:, 5:])
    if style == "striped":
        return m & (torch.floor((u + v) / 2.5) % 2 == 0)
    raise ValueError(f"unknown style {style!r}")


def render(scenes: list[Scene], device: str | torch.device = "cpu", ss: int = 4) -> torch.Tensor:
    """Draw scenes as a float tensor [N, 3, 64, 64] in [-1, 1] (4x4 supersampling)."""
    device = torch.device(device)
    count = len(scenes)
    if count == 0:
        return torch.empty(0, 3, SIZE, SIZE, device=device)
    # one pass over the Python objects; everything after it is batched tensor work
    bgs, rows, groups = [], [], []  # rows: scene, shape, style, cx, cy, dx, dy, size, ds, r, g, b, bg r, g, b
    for i, sc in enumerate(scenes):
        bg = BACKGROUNDS[sc.background]
        bgs.append(bg)
        if not sc.objs:
            continue
        style = _STYLE_INDEX.get(sc.style)
        if style is None:
            raise ValueError(f"unknown style {sc.style!r}")
        dx, dy, ds = sc.jitter
        if len(sc.objs) > 1:
            groups.append((len(rows), len(sc.objs)))
        for o in sc.objs:
            shape = _SHAPE_INDEX.get(o.shape)
            if shape is None:
                raise ValueError(f"unknown shape {o.shape!r}")
            (cx, cy), _ = POSITIONS[o.position]
            rows.append((i, shape, style, cx, cy, dx, dy, SIZES[o.size], ds, *COLORS[o.color], *bg))
    bg32 = torch.tensor(bgs, dtype=torch.float32)
    acc = (bg32 * (ss * ss)).to(device).view(count, 3, 1, 1).expand(count, 3, SIZE, SIZE).contiguous()
    if rows:
        _draw_objects(acc, torch.tensor(rows, dtype=torch.float64), groups, device, ss)
    # acc holds each pooled pixel's exact subpixel colour sum; divide like avg_pool2d (a true division: a device
    # tensor, not a Python scalar, which CUDA would turn into a multiplication by its reciprocal)
    return acc.div_(torch.tensor(float(ss * ss), device=device)).div_(127.5).sub_(1.0).to(torch.get_default_dtype())


def _draw_objects(acc: torch.Tensor, rows: torch.Tensor, groups: list[tuple[int, int]], device: torch.device,
                  ss: int) -> None:
    """Add each object's (colour - background) * (its subpixel count) to the pooled sums `acc` [N, 3, 64, 64]."""
    sid, shape, style = rows[:, 0].long(), rows[:, 1].long(), rows[:, 2].long()
    cx, cy = rows[:, 3] + rows[:, 5], rows[:, 4] + rows[:, 6]  # float64, as the reference's cx + dx
    r = rows[:, 7] * (1 + rows[:, 8])
    # every shape lies within |u|, |v| <= 1.015 |r| (the triangle's base is the widest): a window of kp pooled
    # pixels from (x0, y0) holds all of it, so the object's coverage is empty outside the window
    ext = 1.02 * r.abs() + 0.25
    kp = ((torch.ceil(2 * ext).long() + 1 + _WINDOW_STEP - 1) // _WINDOW_STEP * _WINDOW_STEP).clamp(max=SIZE)
    x0 = torch.minimum(torch.floor(cx - ext).long().clamp(min=0), SIZE - kp)
    y0 = torch.minimum(torch.floor(cy - ext).long().clamp(min=0), SIZE - kp)
    params = torch.cat([cx[:, None].float(), cy[:, None].float(), _thresholds(r), _thresholds(r - _OUTLINE_INSET),
                        rows[:, 9:12].float() - rows[:, 12:15].float()], 1)  # 2 + 5 + 5 + 3 (colour delta)
    # a later object of the same scene is drawn over an earlier one; where their extents meet, the earlier one's
    # count leaves out the later one's subpixels (never the case for sample_scene's scenes)
    occluders: dict[int, list[int]] = {}
    pairs = torch.tensor([(k, j) for first, n in groups for k in range(first, first + n - 1)
                          for j in range(k + 1, first + n)], dtype=torch.long).view(-1, 2)
    pk, pj = pairs[:, 0], pairs[:, 1]
    near = ((cx[pk] - cx[pj]).abs() <= ext[pk] + ext[pj]) & ((cy[pk] - cy[pj]).abs() <= ext[pk] + ext[pj])
    for k, j in pairs[near].tolist():
        occluders.setdefault(k, []).append(j)

    n = SIZE * ss
    coords = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / ss  # the reference's grid
    params_d = params.to(device)
    idx_d = torch.stack([sid, x0, y0], 1).to(device)
    ctx = (acc, coords, params_d, idx_d, ss, device)
    chunk = _CHUNK_CPU if device.type == "cpu" else _CHUNK_ACCEL
    free = torch.ones(len(rows), dtype=torch.bool)
    free[list(occluders)] = False
    key = (shape * len(STYLE_NAMES) + style) * (SIZE + 1) + kp
    free_idx = torch.nonzero(free)[:, 0]
    key_free = key[free_idx]
    order = free_idx[torch.argsort(key_free, stable=True)]
    keys, counts = torch.unique_consecutive(key[order], return_counts=True)
    order_d = order.to(device)
    start = 0
    for k, c in zip(keys.tolist(), counts.tolist()):
        (sh, st), size = divmod(k // (SIZE + 1), len(STYLE_NAMES)), k % (SIZE + 1)
        for a in range(start, start + c, chunk):
            _draw_batch(ctx, order_d[a:min(a + chunk, start + c)], size, SHAPES[sh], STYLE_NAMES[st])
        start += c
    for k, js in occluders.items():
        sel = torch.tensor([k], device=device)
        occ = [(SHAPES[int(shape[j])], j) for j in js]
        _draw_batch(ctx, sel, int(kp[k]), SHAPES[int(shape[k])], STYLE_NAMES[int(style[k])], occ)


def _draw_batch(ctx: tuple, sel: torch.Tensor, kp: int, shape: str, style: str,
                occluders: list[tuple[str, int]] = ()) -> None:
    """Rasterise the objects `sel` (same shape, style and window size kp) in their windows and add them to acc."""
    acc, coords, params, idx, ss, device = ctx
    m, k = len(sel), kp * ss
    p, ix = params[sel], idx[sel]
    ar = torch.arange(k, device=device)
    xw, yw = coords[ix[:, 1:2] * ss + ar], coords[ix[:, 2:3] * ss + ar]  # [m, K] subpixel centres of the windows
    cov = _coverage_batch(shape, style, (xw - p[:, 0:1])[:, None, :], (yw - p[:, 1:2])[:, :, None],
                          p[:, 2:12, None, None])
    for occ_shape, j in occluders:  # single objects only
        q = params[j:j + 1]
        cov &= ~_coverage_batch(occ_shape, style, (xw - q[:, 0:1])[:, None, :], (yw - q[:, 1:2])[:, :, None],
                                q[:, 2:12, None, None])
    ct = torch.uint8 if ss * ss < 256 else torch.int32  # subpixel counts per pooled pixel, exact: [m, kp, kp]
    cnt = cov.view(m, k, kp, ss).to(ct).sum(3, dtype=ct).view(m, kp, ss, kp).sum(2, dtype=ct)
    vals = cnt[:, None] * p[:, 12:15, None, None]  # [m, 3, kp, kp]
    arp = torch.arange(kp, device=device)
    flat = (((ix[:, 0, None, None, None] * 3 + torch.arange(3, device=device)[None, :, None, None]) * SIZE
             + (ix[:, 2, None, None, None] + arp[:, None])) * SIZE + (ix[:, 1, None, None, None] + arp))
    acc.view(-1).index_add_(0, flat.reshape(-1), vals.reshape(-1))


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 HWC (batch kept)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
