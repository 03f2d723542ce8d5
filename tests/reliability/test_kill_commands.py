"""SIGKILL the real commands (lcmtool merge, convert, merge --method fuse, sample, compare, in subprocesses) at a
seeded random moment while they write: the output is the old one or the complete new one, its .yaml says the
same version once the next run has looked (fileio.clean_stale), and after the next run nothing else is left.
CI: one merge trial; `-m slow`: the other commands and more trials."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from harness import cli_env
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from lcmtool import fileio
from lcmtool.cli import app
from lcmtool.demo import ASSETS

pytestmark = pytest.mark.skipif(not (ASSETS / "demo-sd" / "model_index.json").is_file(),
                                reason="the demo assets are not built (make demo-models)")
STYLE, LCM = ASSETS / "style-outline-demo-sd.safetensors", ASSETS / "lcm-lora-demo-sd.safetensors"
P = "a large red circle on the left"


def merge_args(out: Path, lam: str) -> list[str]:
    return ["merge", "--style", str(STYLE), "--lcm", str(LCM), "--lambda1", lam, "--out", str(out)]


def fuse_args(out: Path, lam: str) -> list[str]:
    return merge_args(out, lam) + ["--method", "fuse"]


def convert_args(out: Path, fmt: str) -> list[str]:
    return ["convert", str(LCM), "--format", fmt, "--out", str(out)]


def compare_args(out: Path, runs: str) -> list[str]:
    return ["compare", "--prompt", P, "--runs", runs, "--out", str(out)]


# name: (args(out, version), old, new, output name); a version is what differs between the old and new runs
COMMANDS = {"merge": (merge_args, "0.2", "0.8", "m.safetensors"),
            "convert": (convert_args, "diffusers", "kohya", "c.safetensors"),
            "fuse": (fuse_args, "0.2", "0.8", "fused"),
            "compare": (compare_args, "lcm:1", "lcm:2", "g.png")}


def ok(args: list[str]) -> None:
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output[-2000:]


def fingerprint(path: Path):
    """What a complete output holds, independent of where it was written."""
    if path.suffix == ".safetensors":
        return {k: hashlib.sha256(v.float().numpy().tobytes()).hexdigest() for k, v in load_file(str(path)).items()}
    if path.suffix == ".png":  # a compare grid: its columns (the pixels carry each run's own timings)
        with Image.open(path) as im:
            im.load()  # a truncated PNG raises here
            return [(r["scheduler"], r["steps"]) for r in json.loads(im.text["lcmtool"])["runs"]]
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()  # a pipeline folder's weights
            for f in sorted(path.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """(command, version) -> the fingerprint of its complete output, written elsewhere (made when first asked)."""
    root = tmp_path_factory.mktemp("refs")

    class Refs(dict):
        def __missing__(self, key):
            name, v = key
            args, _, _, fname = COMMANDS[name]
            ok(args(root / name / v / fname, v))
            self[key] = fingerprint(root / name / v / fname)
            return self[key]

    return Refs()


def kill_while_writing(args: list[str], folder: Path, rng: random.Random) -> int:
    """Start `lcmtool ARGS`; once a temp of ours appears in `folder`, wait 0-50 ms and SIGKILL it."""
    p = subprocess.Popen([sys.executable, "-m", "lcmtool", *args], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=cli_env(), start_new_session=True)
    deadline = time.time() + 300
    while p.poll() is None and time.time() < deadline:
        if any(n.startswith(".lcmtool-") for n in os.listdir(folder)):
            break
        time.sleep(0.001)
    time.sleep(rng.uniform(0, 0.05))
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    return p.wait()


def trial(name: str, refs: dict, d: Path, seed: int) -> str:
    args, old, new, fname = COMMANDS[name]
    rng = random.Random(seed)
    out = d / fname
    ok(args(out, old))  # the old output and its .yaml
    rc = kill_while_writing(args(out, new), d, rng)
    fileio.clean_stale(d)  # what the next run does before it writes: finishes a published pair, drops temps
    got = fingerprint(out)
    version = old if got == refs[name, old] else new if got == refs[name, new] else None
    assert version is not None, f"{name}: the output is neither the old nor the complete new one (rc {rc})"
    conf = yaml.safe_load(out.with_suffix(".yaml").read_text())
    said = {"merge": conf.get("lambda1"), "fuse": conf.get("lambda1"), "convert": conf.get("format"),
            "compare": ",".join(conf.get("runs") or [])}[name]
    assert str(said) == version, f"{name}: a {version} output beside the config of {said}"
    ok(args(out, new))  # the next run
    assert sorted(os.listdir(d)) == sorted([fname, out.with_suffix(".yaml").name]), os.listdir(d)
    return version


def test_kill_merge_cli(refs, tmp_path):
    trial("merge", refs, tmp_path / "t", seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("name,seed", [("merge", 1), ("merge", 2), ("merge", 3), ("convert", 0), ("convert", 1),
                                       ("convert", 2), ("fuse", 0), ("fuse", 1), ("compare", 0), ("compare", 1)])
def test_kill_commands_cli(refs, tmp_path, name, seed):
    trial(name, refs, tmp_path / "t", seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_sample_cli(tmp_path, seed):
    """Sample writes a PNG per image: after the kill every PNG there is whole, and the next run into the same
    folder leaves nothing but PNGs and sample.yaml."""
    d = tmp_path / "s"
    args = ["sample", "--prompt", P, "--num-images", "6", "--batch-size", "1", "--steps", "2", "--out", str(d)]
    d.mkdir()
    kill_while_writing(args, d, random.Random(seed))
    fileio.clean_stale(d)
    for f in d.glob("*.png"):
        with Image.open(f) as im:
            im.load()  # a truncated PNG raises here
            assert json.loads(im.text["lcmtool"])["prompt"] == P
    ok(args)
    left = [n for n in os.listdir(d) if not n.endswith(".png") and n != "sample.yaml"]
    assert not left, left
