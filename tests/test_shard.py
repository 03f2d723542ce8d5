"""Sampling split across 2 CPU processes (torchrun, gloo), reruns and a killed run (issue 14).

Oracle: the single-process run of the same command: the same file names, the same pixels (max abs difference
<= 2 of 255), every image once.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

PROMPTS = ["a large red circle on the left", "a small blue square at the top", "a large white triangle in the centre"]
TOL = 2  # of 255
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def demo_sd(tmp_path_factory):
    from lcmtool.demo.arch import build_pipeline

    path = tmp_path_factory.mktemp("demo") / "sd"
    build_pipeline("sd").save_pretrained(path)
    return str(path)


def sample_cmd(model: str, prompts: Path, out: Path, *extra) -> list[str]:
    return ["-m", "lcmtool", "sample", "--model", model, "--prompts", str(prompts), "--num-images", "2", "--steps",
            "1", "--lora", "none", "--batch-size", "2", "--device", "cpu", "--json", "--out", str(out), *extra]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    port = free_port()
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                                  str(port)] if nproc > 1 else [])
    r = subprocess.run(launch + args, capture_output=True, text=True, env=ENV, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def records(r) -> list[dict]:
    return [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]


def in_process(args: list[str]):
    """The same command in this process (CliRunner): no second interpreter start-up."""
    from typer.testing import CliRunner

    from lcmtool.cli import app

    res = CliRunner().invoke(app, args[2:])
    assert res.exit_code == 0, res.output
    return res


def pixels(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_two_processes_write_every_image_once_and_rerun_skips(demo_sd, tmp_path):
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(PROMPTS) + "\n")
    two = records(run(sample_cmd(demo_sd, pf, tmp_path / "two"), nproc=2))
    one = {Path(r["path"]).name: r for r in records(in_process(sample_cmd(demo_sd, pf, tmp_path / "one")))}
    # rank 0 prints every rank's lines, each once; the names are the single-process run's
    assert len(two) == 6 and sorted(Path(r["path"]).name for r in two) == sorted(one)
    assert sorted((r["prompt"], r["seed"]) for r in two) == sorted((p, s) for p in PROMPTS for s in (0, 1))
    assert sorted(p.name for p in (tmp_path / "two").glob("*.png")) == sorted(one)
    for r in two:
        assert int(np.abs(pixels(r["path"]) - pixels(one[Path(r["path"]).name]["path"])).max()) <= TOL
    assert not any(r["skipped"] for r in two)
    again = records(run(sample_cmd(demo_sd, pf, tmp_path / "two"), nproc=2))
    assert sorted(r["path"] for r in again) == sorted(r["path"] for r in two) and all(r["skipped"] for r in again)
    assert len(list((tmp_path / "two").glob("*.png"))) == 6


def test_killed_run_keeps_complete_images_and_rerun_finishes(demo_sd, tmp_path):
    from lcmtool.engines.sample import is_complete

    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(PROMPTS * 4) + "\n")  # 12 prompts x 2 images
    out = tmp_path / "o"
    p = subprocess.Popen([sys.executable] + sample_cmd(demo_sd, pf, out), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and len(list(out.glob("*.png"))) < 3:
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)
    kept = sorted(out.glob("*.png"))
    assert 3 <= len(kept) < 24 and all(is_complete(k) for k in kept)
    rest = records(in_process(sample_cmd(demo_sd, pf, out)))
    assert sum(r["skipped"] for r in rest) == len(kept) and len(rest) == 24
    assert len(list(out.glob("*.png"))) == 24 and len({r["path"] for r in rest}) == 24
