"""Scores of generated demo images against their prompts: attribute accuracies and FD-demo.

FD-demo is FID's formula (Heusel et al. 2017) in the demo classifier's penultimate feature space:
    FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)),
with Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2), a symmetric PSD matrix, so two eigh calls suffice.
"""
from __future__ import annotations

import random

import torch

from lcmtool.demo import classifier as clf
from lcmtool.demo import world
from lcmtool.errors import LcmError

REFS_PER_PROMPT = 4  # rendered references per generated image for FD-demo


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_from_stats(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1^(1/2) S2 S1^(1/2))), in float64; clamps rounding negatives."""
    mu1, s1, mu2, s2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, s1, mu2, s2))
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    fd = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean
    return max(float(fd), 0.0)


def stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (like np.cov) of features [N, D], float64; N >= 2."""
    f = torch.as_tensor(feats, dtype=torch.float64)
    if f.shape[0] < 2:
        raise LcmError(f"FD needs at least 2 images, got {f.shape[0]}")
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def frechet_distance(feats1: torch.Tensor, feats2: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N1, D], [N2, D]."""
    return frechet_from_stats(*stats(feats1), *stats(feats2))


def parse_prompt(prompt: str) -> tuple[list[world.Obj], str]:
    try:
        return world.parse_caption(prompt)
    except ValueError as e:
        raise LcmError(f"prompt is not a demo caption: {prompt!r} ({e})") from None


def reference_scenes(prompts: list[str], refs_per_prompt: int = REFS_PER_PROMPT, seed: int = 0) -> list[world.Scene]:
    """`refs_per_prompt` scenes per prompt occurrence, seeded by (seed, prompt, occurrence, k): the same
    prompt list gives the same references in any order. Background random, jitter as in world.sample_scene."""
    seen: dict[str, int] = {}
    scenes = []
    for p in prompts:
        objs, style = parse_prompt(p)
        occ = seen[p] = seen.get(p, -1) + 1
        for k in range(refs_per_prompt):
            rng = random.Random(f"lcmtool-fd:{seed}:{p}:{occ}:{k}")
            jit = (rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5), rng.uniform(-0.08, 0.08))
            scenes.append(world.Scene(tuple(objs), rng.randrange(len(world.BACKGROUNDS)), style, jit))
    return scenes


def reference_features(model, prompts: list[str], refs_per_prompt: int = REFS_PER_PROMPT, seed: int = 0,
                       device: str = "cpu") -> torch.Tensor:
    return clf.features(model, clf.render(reference_scenes(prompts, refs_per_prompt, seed), device=device))


def attribute_scores(pred: dict[str, torch.Tensor], prompts: list[str]) -> dict:
    """Accuracies of classifier predictions against prompts. Per object of the prompt: shape, colour and size
    are right when the prediction AT ITS POSITION matches. Per image: position is right when the set of
    positions predicted non-empty equals the prompt's; style (only when some prompt has a style trigger,
    else None; solid prompts count then too) when the predicted style matches."""
    ok = {"shape": [], "color": [], "size": []}
    pos_ok, style_ok, any_style = [], [], False
    for i, p in enumerate(prompts):
        objs, style = parse_prompt(p)
        seen, got_style = clf.decode(pred, i)
        for o in objs:
            got = seen.get(o.position)
            ok["shape"].append(got is not None and got[0] == o.shape)
            ok["color"].append(got is not None and got[1] == o.color)
            ok["size"].append(got is not None and got[2] == o.size)
        pos_ok.append(set(seen) == {o.position for o in objs})
        style_ok.append(got_style == style)
        any_style |= style != "solid"

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    return {"shape_acc": mean(ok["shape"]), "color_acc": mean(ok["color"]), "size_acc": mean(ok["size"]),
            "position_acc": mean(pos_ok), "style_acc": mean(style_ok) if any_style else None}


def score(images: torch.Tensor, prompts: list[str], model, refs_per_prompt: int = REFS_PER_PROMPT,
          seed: int = 0) -> dict:
    """Score images [N, 3, 64, 64] in [-1, 1] against their prompts: n, shape/color/size/position/style
    accuracies (attribute_scores) and fd (FD-demo against refs_per_prompt rendered references per image)."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, world.SIZE, world.SIZE):
        raise LcmError(f"images must be [N, 3, {world.SIZE}, {world.SIZE}], got {list(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise LcmError(f"{images.shape[0]} images but {len(prompts)} prompts")
    device = next(model.parameters()).device
    out = {"n": len(prompts)}
    feats, pred = clf.features_and_predict(model, images)  # one pass of the classifier for both
    out.update(attribute_scores(pred, prompts))
    ref = reference_features(model, prompts, refs_per_prompt, seed, device=str(device))
    # FD-demo needs a covariance: one image still gets its accuracies, and fd null
    out["fd"] = frechet_distance(feats, ref) if images.shape[0] >= 2 else None
    out["fd_refs"] = ref.shape[0]
    return out
