"""Demo evaluator: the shipped classifier reads held-out renders, score() and FD-demo match oracles, CLI."""
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from typer.testing import CliRunner

from lcmtool.cli import app
from lcmtool.demo import classifier as clf
from lcmtool.demo import metrics, world
from lcmtool.errors import LcmError


@pytest.fixture(scope="module")
def model():
    return clf.load_classifier()


def styled_prompts():
    """All 40 held-out prompts in each style, plus two-object prompts (the same pairs side by side)."""
    out = []
    for style in world.STYLE_NAMES:
        out += world.heldout_prompts(style)
    rng = random.Random(3)
    for _ in range(20):
        sc = world.sample_scene(rng, "heldout", style=rng.choice(world.STYLE_NAMES), two_prob=1.0)
        out.append(world.caption(sc))
    return out


def render_prompts(prompts, seed):
    """Rendered images of prompts with jitter and backgrounds drawn from `seed` (not the FD references' seeds)."""
    rng = random.Random(seed)
    scenes = []
    for p in prompts:
        objs, style = world.parse_caption(p)
        jit = (rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5), rng.uniform(-0.08, 0.08))
        scenes.append(world.Scene(tuple(objs), rng.randrange(len(world.BACKGROUNDS)), style, jit))
    return clf.render(scenes)


def test_classifier_reads_heldout_pairs(model):
    rng = random.Random(2024)
    scenes = [world.sample_scene(rng, "heldout", style=rng.choice(world.STYLE_NAMES), two_prob=0.5)
              for _ in range(256)]
    acc = clf.accuracy(clf.predict(model, clf.render(scenes)), clf.targets(scenes))
    for attr in ("shape", "color", "position", "style", "size"):
        assert acc[attr] >= 0.98, acc
    meta = clf.classifier_metadata()
    assert all(meta["heldout_acc"][a] >= 0.98 for a in ("shape", "color", "position", "style")), meta
    assert sum(p.numel() for p in model.parameters()) <= 400_000
    assert clf.DEFAULT_PATH.stat().st_size <= 2 * 1024 * 1024


def test_features_and_predict_shapes(model):
    x = render_prompts(world.heldout_prompts()[:3], seed=0)
    assert clf.features(model, x).shape == (3, model.config["dim"])
    pred = clf.predict(model, x)
    assert pred["shape"].shape == (3, 5) and pred["style"].shape == (3,)
    objs, style = clf.decode(pred, 0)
    assert objs == {"left": ("circle", "yellow", "small")} and style == "solid"  # heldout_prompts()[0]
    feats, pred1 = clf.features_and_predict(model, x)  # one pass gives both, the same
    assert torch.equal(feats, clf.features(model, x))
    assert all(torch.equal(pred1[k], pred[k]) for k in pred)


def test_score_right_vs_wrong_prompts(model):
    prompts = styled_prompts()
    images = render_prompts(prompts, seed=11)
    right = metrics.score(images, prompts, model)
    assert right["n"] == len(prompts) == 140
    for k in ("shape_acc", "color_acc", "size_acc", "position_acc", "style_acc"):
        assert right[k] >= 0.97, right
    # wrong colours: every object's colour moved one step along COLOR_NAMES
    nxt = {c: world.COLOR_NAMES[(i + 1) % 6] for i, c in enumerate(world.COLOR_NAMES)}
    wrong_prompts = [" ".join(nxt.get(w, w) for w in p.split(" ")) for p in prompts]
    wrong = metrics.score(images, wrong_prompts, model)
    assert wrong["color_acc"] <= 0.05, wrong
    assert wrong["shape_acc"] >= 0.97 and wrong["position_acc"] >= 0.97  # only colours are wrong
    assert right["fd"] < 10.0 and wrong["fd"] > 15 * right["fd"], (right["fd"], wrong["fd"])  # 5.9 vs 190
    # wrong styles: solid prompts read as outline etc.
    rot = {"solid": "outline", "outline": "striped", "striped": "solid"}
    style_wrong = [world.caption(world.Scene(tuple(world.parse_caption(p)[0]), 0, rot[world.parse_caption(p)[1]]))
                   for p in prompts]
    assert metrics.attribute_scores(clf.predict(model, images), style_wrong)["style_acc"] <= 0.05
    # no style trigger anywhere: style_acc is not applicable
    solid = world.heldout_prompts()
    assert metrics.score(render_prompts(solid, seed=5), solid, model)["style_acc"] is None


def test_references_are_deterministic_and_order_free():
    ps = world.heldout_prompts()[:5]
    a = metrics.reference_scenes(ps, 3)
    b = metrics.reference_scenes(ps[::-1], 3)
    assert len(a) == 15 and set(a) == set(b)
    assert len(set(a)) == 15  # jitter/background differ between references


def test_frechet_identical_and_closed_forms():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(300, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g, dtype=torch.float64)
    assert 0.0 <= metrics.frechet_distance(f, f) <= 1e-6
    # 1-D Gaussians: FD = (m1 - m2)^2 + (s1 - s2)^2
    assert metrics.frechet_from_stats([1.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(5.0, abs=1e-9)
    # diagonal: sum over dims of the 1-D formula
    m1, m2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([0.5, 1.0, 0.0])
    v1, v2 = torch.tensor([1.0, 9.0, 0.25]), torch.tensor([4.0, 1.0, 0.25])
    want = float(((m1 - m2) ** 2).sum() + ((v1.sqrt() - v2.sqrt()) ** 2).sum())
    assert metrics.frechet_from_stats(m1, torch.diag(v1), m2, torch.diag(v2)) == pytest.approx(want, abs=1e-9)
    # samples of those diagonal Gaussians converge to the closed form
    x = m1 + v1.sqrt() * torch.randn(200_000, 3, generator=g)
    y = m2 + v2.sqrt() * torch.randn(200_000, 3, generator=g)
    assert metrics.frechet_distance(x, y) == pytest.approx(want, rel=0.02)
    # full, non-commuting covariances: Tr sqrt(S1 S2) = sum sqrt(eig(S1 S2)) (real, >= 0) as the oracle
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(6, 6, generator=g, dtype=torch.float64)
    s1, s2 = a @ a.T + 0.1 * torch.eye(6), b @ b.T + 0.1 * torch.eye(6)
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    ev = np.linalg.eigvals(s1.numpy() @ s2.numpy())
    oracle = float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2)) - 2 * np.sqrt(ev.real).sum()
    assert metrics.frechet_from_stats(mu1, s1, mu2, s2) == pytest.approx(oracle, rel=1e-9, abs=1e-9)


def write_pngs(folder, prompts, seed=0, jsonl=True, chunk=None):
    folder.mkdir(parents=True, exist_ok=True)
    arr = world.to_uint8(render_prompts(prompts, seed)).numpy()
    lines = []
    for i, (a, p) in enumerate(zip(arr, prompts, strict=True)):
        info = PngImagePlugin.PngInfo()
        if chunk == "parameters":
            info.add_text("parameters", p + "\nSteps: 4, Sampler: lcm")
        elif chunk == "lcmtool":
            info.add_text("lcmtool", json.dumps({"prompt": p, "seed": i}))
        path = folder / f"{i:05d}.png"
        Image.fromarray(a).save(path, pnginfo=info)
        lines.append(json.dumps({"path": path.name, "prompt": p, "seed": i}))
    if jsonl:
        (folder / "samples.jsonl").write_text("\n".join(lines + [json.dumps({"summary": True})]) + "\n")


KEYS = {"n", "shape_acc", "color_acc", "position_acc", "size_acc", "style_acc", "fd", "classifier_heldout_acc"}


@pytest.mark.parametrize("chunk", [None, "parameters", "lcmtool"])
def test_cli_json(tmp_path, chunk):
    prompts = world.heldout_prompts("striped")[:6] + world.heldout_prompts()[:6]
    write_pngs(tmp_path / "s", prompts, jsonl=chunk is None, chunk=chunk)
    if chunk == "lcmtool":  # a comparison grid beside the samples carries a record without a prompt: skipped
        info = PngImagePlugin.PngInfo()
        info.add_text("lcmtool", json.dumps({"rows": [], "runs": []}))
        Image.new("RGB", (200, 120)).save(tmp_path / "s" / "grid.png", pnginfo=info)
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "s"), "--json"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert KEYS <= set(res)
    assert res["n"] == 12 and res["shape_acc"] == res["color_acc"] == res["position_acc"] == 1.0
    assert res["style_acc"] == 1.0 and res["fd"] >= 0
    assert res["classifier_heldout_acc"]["shape"] >= 0.98
    if chunk is None:  # a .jsonl given directly reads the same
        r2 = CliRunner().invoke(app, ["eval", str(tmp_path / "s" / "samples.jsonl"), "--json"])
        assert json.loads(r2.stdout) == {**res, "source": str(tmp_path / "s" / "samples.jsonl")}


def test_cli_table(tmp_path):
    write_pngs(tmp_path / "s", world.heldout_prompts()[:4])
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert "shape_acc" in r.stdout and "1.000" in r.stdout and "n/a" in r.stdout


def test_cli_bad_inputs(tmp_path):
    run = CliRunner().invoke
    (tmp_path / "empty").mkdir()
    write_pngs(tmp_path / "noprompt", world.heldout_prompts()[:2], jsonl=False)
    write_pngs(tmp_path / "bad", world.heldout_prompts()[:2])
    (tmp_path / "bad" / "samples.jsonl").write_text(
        json.dumps({"path": "00000.png", "prompt": "a huge red circle on the left"}) + "\n")
    write_pngs(tmp_path / "ok", world.heldout_prompts()[:2])
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"path": "00000.png", "prompt": "caf\xe9"}\n')
    cases = {
        "missing": [str(tmp_path / "nope")],
        "empty": [str(tmp_path / "empty")],
        "noprompt": [str(tmp_path / "noprompt")],
        "bad prompt": [str(tmp_path / "bad")],
        "broken jsonl": [str(tmp_path / "broken.jsonl")],
        "jsonl not utf-8": [str(tmp_path / "latin1.jsonl")],
        "classifier": [str(tmp_path / "ok"), "--classifier", str(tmp_path / "none.safetensors")],
        "not a classifier": [str(tmp_path / "ok"), "--classifier", str(tmp_path / "ok" / "00000.png")],
        "device": [str(tmp_path / "ok"), "--device", "tpu9"],
    }
    for name, args in cases.items():
        r = run(app, ["eval", *args, "--json"])
        assert r.exit_code == 2, (name, r.output)
        assert r.stdout == "", name
        assert len(r.stderr.strip().splitlines()) == 1 and "error:" in r.stderr, (name, r.stderr)


def test_score_rejects_mismatch(model):
    x = render_prompts(world.heldout_prompts()[:2], seed=0)
    with pytest.raises(LcmError):
        metrics.score(x, world.heldout_prompts()[:3], model)
    with pytest.raises(LcmError):
        metrics.score(x, ["a red circle", "x"], model)


def test_train_classifier_deterministic(tmp_path):
    logs = []
    r1 = clf.train_classifier(str(tmp_path / "a.safetensors"), steps=2, batch=8, seed=5, log=logs.append, eval_n=8)
    r2 = clf.train_classifier(str(tmp_path / "b.safetensors"), steps=2, batch=8, seed=5, log=logs.append, eval_n=8)
    assert set(r1) == {"heldout_acc", "steps", "seconds"} and r1["heldout_acc"] == r2["heldout_acc"]
    a = clf.load_classifier(tmp_path / "a.safetensors").state_dict()
    b = clf.load_classifier(tmp_path / "b.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert clf.classifier_metadata(tmp_path / "a.safetensors")["steps"] == "2"
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_one_image_gets_accuracies_and_null_fd(tmp_path):
    import json
    import random
    import subprocess
    import sys

    from PIL import Image

    from lcmtool.demo import world

    sc = world.sample_scene(random.Random(3), two_prob=0)
    Image.fromarray(world.to_uint8(world.render([sc]))[0].numpy()).save(tmp_path / "0.png")
    (tmp_path / "samples.jsonl").write_text(json.dumps({"path": "0.png", "prompt": world.caption(sc)}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "lcmtool", "eval", str(tmp_path), "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["n"] == 1 and res["fd"] is None and res["shape_acc"] == 1.0 and res["color_acc"] == 1.0
