"""Checkpoints of a distill run: a second Ctrl-C inside the optimizer step, stale temp folders, metrics after a
resume, the EMA target (tiny demo teachers on the CPU, a few steps each)."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import test_distill_run as base
import torch

from lcmtool import fileio
from lcmtool.distill import checkpoint as ckpt
from lcmtool.engines.distill import distill

cfg_for, lora_of = base.cfg_for, base.lora_of


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_lora(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def straight(teachers, cache, tmp_path_factory):
    """An uninterrupted 4-step run: the reference of every resume below."""
    out = tmp_path_factory.mktemp("straight")
    distill(cfg_for(teachers, cache, out, max_steps=4))
    return out


def test_second_ctrl_c_inside_the_optimizer_step_waits_for_the_step_boundary(teachers, cache, straight, tmp_path,
                                                                              monkeypatch):
    """Two SIGINTs right after optimizer.step() of step 3 (before the counter's increment): the checkpoint is
    labelled step 3 and holds step 3's weights, so the resumed run ends bit-identical to the straight one."""
    real = torch.optim.AdamW.step
    calls = {"n": 0}

    def step_then_two_signals(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)  # the second Ctrl-C, inside the window
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_two_signals)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        distill(cfg_for(teachers, cache, out, max_steps=4))
    monkeypatch.setattr(torch.optim.AdamW, "step", real)
    assert calls["n"] == 3
    cks = sorted((out / "checkpoints").glob("step-*"))
    assert [c.name for c in cks] == ["step-0000003"]
    state = json.loads((cks[0] / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["reason"] == "interrupted"
    distill(cfg_for(teachers, cache, out, max_steps=4, resume="latest"))
    assert same_lora(lora_of(straight / "checkpoints" / "step-0000004"), lora_of(out / "checkpoints" / "step-0000004"))
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4]
    assert [r["loss"] for r in records(out)] == [r["loss"] for r in records(straight)]


def test_crash_after_a_checkpoint_resumes_without_repeating_metrics(teachers, cache, straight, tmp_path,
                                                                    monkeypatch):
    """A crash in step 4 after the step-2 checkpoint: metrics.jsonl holds steps 1-3; the resumed run drops step 3
    and logs 3-4 again, so each step appears once, with the straight run's losses; stale temp folders of the
    crashed run are removed and never taken for a checkpoint."""
    out = tmp_path / "run"
    with base.raising_in_call(monkeypatch, 4, RuntimeError("simulated crash")), \
            pytest.raises(RuntimeError, match="simulated crash"):
        distill(cfg_for(teachers, cache, out, max_steps=4, checkpoint_every=2))
    assert [r["step"] for r in records(out)] == [1, 2, 3]
    # what a SIGKILL during a later checkpoint write leaves: complete-looking temp folders of step 3, one of
    # fileio's (named with the killed process's pid) and one of an earlier lcmtool version
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    ours = fileio.temp_name(out / "checkpoints" / "step-0000003")
    ours = ours.with_name(ours.name.replace(f"-{os.getpid()}-", f"-{dead.pid}-"))
    legacy = out / "checkpoints" / ".tmp-step-0000003"
    for stale in (ours, legacy):
        shutil.copytree(out / "checkpoints" / "step-0000002", stale)
        state = json.loads((stale / "trainer_state.json").read_text())
        (stale / "trainer_state.json").write_text(json.dumps({**state, "step": 3}))
    assert ckpt.find_checkpoint(out, "latest").name == "step-0000002"
    distill(cfg_for(teachers, cache, out, max_steps=4, checkpoint_every=2, resume="latest"))
    assert not ours.exists() and not legacy.exists()
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4]
    assert [r["loss"] for r in records(out)] == [r["loss"] for r in records(straight)]
    assert same_lora(lora_of(straight / "checkpoints" / "step-0000004"), lora_of(out / "checkpoints" / "step-0000004"))


def test_clean_stale_puts_back_a_legacy_checkpoint_set_aside_by_a_killed_publish(tmp_path):
    """Killed between the two renames of an earlier version's publish: `.old-step-N` without `step-N` is the only
    copy: it goes back; beside a complete `step-N` it is removed, as are temp folders."""
    d = tmp_path / "checkpoints"
    for name in (".old-step-0000002", ".old-step-0000004", "step-0000004", ".tmp-step-0000006"):
        (d / name).mkdir(parents=True)
        (d / name / "training.pt").write_bytes(b"x")
        (d / name / "trainer_state.json").write_text("{}")
    removed = ckpt.clean_stale(d)
    assert sorted(p.name for p in removed) == [".old-step-0000004", ".tmp-step-0000006"]
    assert sorted(p.name for p in d.iterdir()) == ["step-0000002", "step-0000004"]


def test_trim_metrics_keeps_steps_up_to_the_checkpoint_and_skips_a_cut_line(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "loss": 0.3}\n{"step": 4, "lo')
    assert ckpt.trim_metrics(m, 2) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]
    assert [json.loads(x)["step"] for x in m.read_text().splitlines()] == [1, 2]


def test_ema_target_trains_and_its_first_step_equals_stop_grad(teachers, cache, tmp_path):
    """The EMA target starts as a copy of the student, so step 1 is the stop-grad step exactly (swapping the EMA
    weights in and out must leave the student's gradient alone); later steps differ."""
    a = distill(cfg_for(teachers, cache, tmp_path / "sg", max_steps=2, checkpoint_every=1))
    b = distill(cfg_for(teachers, cache, tmp_path / "ema", max_steps=2, checkpoint_every=1, ema_decay=0.5))
    assert same_lora(lora_of(tmp_path / "sg" / "checkpoints" / "step-0000001"),
                     lora_of(tmp_path / "ema" / "checkpoints" / "step-0000001"))
    assert not same_lora(lora_of(Path(a["checkpoint"])), lora_of(Path(b["checkpoint"])))
    ema = torch.load(Path(b["checkpoint"]) / "training.pt", weights_only=True)["ema"]
    assert len(ema) == len(lora_of(Path(b["checkpoint"]))) and all(torch.isfinite(e).all() for e in ema)
