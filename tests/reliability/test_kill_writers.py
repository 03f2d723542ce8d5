"""SIGKILL during every writer: the destination is the old file (folder) or the complete new one, an output and
its config are never left as a half-pair once the next run has looked, and no stray remains after the next run.

Each trial forks a child that rewrites the output over and over (version 1, 2, ...), as a command does once, and
SIGKILLs it at a seeded random moment; the parent then checks what is on disk, runs the writer once more (the
next run) and checks that nothing but the outputs is left. Forking keeps a trial to milliseconds (the writers'
imports are paid once); test_kill_commands.py kills the real commands in subprocesses.
"""
from __future__ import annotations

import json
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lcmtool import fileio

CI_TRIALS, SLOW_TRIALS = 4, 40


@dataclass
class Cfg:  # a config to publish beside an output (config.published_with)
    version: int = 0


def _lora_write(d: Path, v: int) -> None:
    from lcmtool.config import published_with
    from lcmtool.lora.io import LoraModule, save_lora

    mods = {f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_{k}":
            LoraModule(torch.full((16, 8192), float(v)), torch.full((320, 16), float(v)), 16.0) for k in "qkv"}
    with published_with(Cfg(v), d / "m.safetensors"):
        save_lora(mods, d / "m.safetensors", format="kohya", family="sd15", dtype=torch.float32)


def _lora_read(d: Path) -> int:
    with safe_open(str(d / "m.safetensors"), "pt") as f:
        vals = {float(f.get_tensor(k).unique().item()) for k in f.keys() if not k.endswith(".alpha")}
    assert len(vals) == 1, vals  # every tensor of one version: a whole file
    v = int(vals.pop())
    assert (d / "m.yaml").read_text().strip() == f"version: {v}", "the config of another version"
    return v


def _st_write(d: Path, v: int) -> None:  # safetensors' own writer (fuse --format single-file; distill caches)
    with fileio.atomic_path(d / "model.safetensors") as tmp:
        save_file({"w": torch.full((3_000_000,), float(v))}, str(tmp), metadata={"v": str(v)})


def _st_read(d: Path) -> int:
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        v = int(f.metadata()["v"])
        assert bool((f.get_tensor("w") == v).all())
    return v


def _dir_write(d: Path, v: int) -> None:  # a fused pipeline folder (merge --method fuse, diffusers format)
    with fileio.atomic_dir(d / "fused") as tmp:
        for part in ("unet", "vae", "text_encoder"):
            (tmp / part).mkdir()
            save_file({"w": torch.full((400_000,), float(v))}, str(tmp / part / "model.safetensors"))
        fileio.atomic_write_json(tmp / "model_index.json", {"v": v})


def _dir_read(d: Path) -> int:
    v = json.loads((d / "fused" / "model_index.json").read_text())["v"]
    for part in ("unet", "vae", "text_encoder"):
        with safe_open(str(d / "fused" / part / "model.safetensors"), "pt") as f:
            assert bool((f.get_tensor("w") == v).all()), part
    assert sorted(p.name for p in (d / "fused").iterdir()) == ["model_index.json", "text_encoder", "unet", "vae"]
    return v


def _png_write(d: Path, v: int) -> None:
    from PIL import Image

    from lcmtool.outputs.png import save_png

    image = Image.new("RGB", (512, 512), (v % 256, 7, 9))
    save_png(image, d / "00000-0.png", {"prompt": "x", "version": v}, a1111=False)


def _png_read(d: Path) -> int:
    from PIL import Image

    with Image.open(d / "00000-0.png") as im:
        im.load()
        v = json.loads(im.text["lcmtool"])["version"]
        assert im.getpixel((511, 511)) == (v % 256, 7, 9)
    return v


def _json_write(d: Path, v: int) -> None:  # summary.json, results.json
    fileio.atomic_write_json(d / "results.json", {"version": v, "rows": list(range(50_000))})


def _json_read(d: Path) -> int:
    rec = json.loads((d / "results.json").read_text())
    assert len(rec["rows"]) == 50_000
    return rec["version"]


def _ckpt_write(d: Path, v: int) -> None:  # a distill checkpoint (training.pt + trainer_state.json, published)
    from lcmtool.distill import checkpoint as ckpt

    ckpt.save(d / "checkpoints", "step-0000001", {"lora": [torch.full((300_000,), float(v))]},
              {"step": 1, "version": v, "config": {}, "world_size": 1}, keep=2)


def _ckpt_read(d: Path) -> int:
    from lcmtool.distill import checkpoint as ckpt

    folder = d / "checkpoints" / "step-0000001"
    assert ckpt.is_checkpoint(folder)
    v = json.loads((folder / "trainer_state.json").read_text())["version"]
    assert bool((torch.load(folder / "training.pt", weights_only=True)["lora"][0] == v).all())
    return v


def _ckpt_clean(d: Path) -> None:
    from lcmtool.distill import checkpoint as ckpt

    ckpt.clean_stale(d / "checkpoints")
    fileio.clean_stale(d / "checkpoints")


WRITERS = {  # name: (write, read -> version, outputs, where strays would be)
    "lora+yaml": (_lora_write, _lora_read, {"m.safetensors", "m.yaml"}, "."),
    "safetensors": (_st_write, _st_read, {"model.safetensors"}, "."),
    "fused-folder": (_dir_write, _dir_read, {"fused"}, "."),
    "png": (_png_write, _png_read, {"00000-0.png"}, "."),
    "json": (_json_write, _json_read, {"results.json"}, "."),
    "checkpoint": (_ckpt_write, _ckpt_read, {"step-0000001"}, "checkpoints"),
}


def _child(write, d: Path) -> None:
    try:
        for v in range(1, 10 ** 6):
            write(d, v)
    finally:
        os._exit(0)


def trial(name: str, d: Path, seed: int) -> dict:
    """One kill: -> what the checks saw (version found, phase)."""
    write, read, outputs, where = WRITERS[name]
    d.mkdir(parents=True)
    t0 = time.perf_counter()
    write(d, 0)  # the old output
    one = time.perf_counter() - t0
    rng = random.Random(seed)
    pid = os.fork()
    if pid == 0:
        _child(write, d)
    time.sleep(rng.uniform(0, 3 * one + 0.002))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    strays_before = sorted(n for n in os.listdir(d / where) if n not in outputs)
    if name == "lora+yaml":
        fileio.clean_stale(d)  # what the next run does first (a half-pair is completed from the journal)
    if name == "checkpoint":
        _ckpt_clean(d)
    found = read(d)  # old (0) or some complete new version: never a partial one
    write(d, 10 ** 6)  # the next run
    assert read(d) == 10 ** 6
    if name == "checkpoint":
        _ckpt_clean(d)
    left = sorted(set(os.listdir(d / where)) - outputs)
    assert not left, f"{name}: strays after the next run: {left}"
    return {"found": found, "strays_before": strays_before}


def _run(name: str, tmp_path: Path, n: int) -> list[dict]:
    return [trial(name, tmp_path / f"t{i}", seed=1000 * i + len(name)) for i in range(n)]


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_sigkill_during_write_leaves_old_or_new_and_no_strays(name, tmp_path):
    _run(name, tmp_path, CI_TRIALS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(WRITERS))
def test_sigkill_during_write_many(name, tmp_path):
    seen = _run(name, tmp_path, SLOW_TRIALS)
    mid = sum(bool(s["strays_before"]) for s in seen)
    assert mid >= 1 and len({s["found"] for s in seen}) >= 2, (mid, seen)  # some kills landed mid-write


def test_the_check_catches_a_writer_that_is_not_atomic(tmp_path):
    """Control: the same kills against a plain open/write of the JSON leave a broken file in some trials."""
    def naive(d: Path, v: int) -> None:
        with open(d / "results.json", "w") as f:
            f.write(json.dumps({"version": v, "rows": list(range(50_000))}))

    WRITERS["naive"] = (naive, _json_read, {"results.json"}, ".")
    try:
        broken = 0
        for i in range(12):
            try:
                trial("naive", tmp_path / f"t{i}", seed=i)
            except (AssertionError, json.JSONDecodeError, KeyError):
                broken += 1
        assert broken >= 1
    finally:
        del WRITERS["naive"]
