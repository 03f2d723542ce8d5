"""Kill a tiny `distill` at seeded random moments (SIGKILL, SIGINT, a double SIGINT), resume it with
`--resume latest`, and get the LoRA of a straight run bit for bit; checkpoints are whole or absent, and no temp
is left after the resume.

CI: a few trials in forked children (the imports are paid once). `-m slow`: >= 20 trials of the real CLI in
subprocesses, plus more forked ones.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from harness import cli_env
from safetensors.torch import load_file

from lcmtool.distill.checkpoint import is_checkpoint
from lcmtool.engines.distill import distill
from lcmtool.options import DistillConfig

MAX_STEPS = 4
SIGNALS = [("KILL", [signal.SIGKILL]), ("INT", [signal.SIGINT]), ("INT*2", [signal.SIGINT, signal.SIGINT])]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A random-weight demo teacher, a shared latent cache and the LoRA of the straight run."""
    from lcmtool.demo.arch import build_pipeline

    root = tmp_path_factory.mktemp("distill")
    build_pipeline("sd", seed=0).save_pretrained(root / "teacher")
    w = {"teacher": root / "teacher", "cache": root / "cache", "root": root}
    distill(config(w, root / "straight"))
    w["ref"] = load_file(str(root / "straight" / "lcm-lora.safetensors"))
    return w


def settings(w: dict) -> dict:
    return dict(model=str(w["teacher"]), device="cpu", num_samples=8, batch_size=2, max_steps=MAX_STEPS,
                lora_rank=2, lora_alpha=2.0, conv_rank=0, warmup_steps=1, lr=1e-3, checkpoint_every=1,
                keep_checkpoints=2, validate_every=0, validation_steps=[1], validation_prompts=["a red circle"],
                log_every=1, report_to="none", cache_dir=str(w["cache"]))


def config(w: dict, out: Path, **kw) -> DistillConfig:
    return DistillConfig(**{**settings(w), "out": str(out), **kw})


def steps_logged(out: Path) -> int:
    m = out / "metrics.jsonl"
    return len(m.read_text().splitlines()) if m.is_file() else 0


def kill_at(pid_or_proc, out: Path, rng: random.Random, sigs: list[int], deadline: float = 120) -> None:
    """Once the run has started (its config.yaml is written) and logged a random number of steps
    (0..MAX_STEPS-1), wait a random fraction of a step and send the signals (a double SIGINT: the second
    20-200 ms after the first)."""
    pid = pid_or_proc if isinstance(pid_or_proc, int) else pid_or_proc.pid
    alive = (lambda: pid_or_proc.poll() is None) if not isinstance(pid_or_proc, int) else (lambda: True)
    k = rng.randrange(MAX_STEPS)
    t_end = time.time() + deadline
    while time.time() < t_end and alive() and not (out / "config.yaml").exists():  # lcmtool has started
        time.sleep(0.005)
    while time.time() < t_end and alive() and steps_logged(out) < k:
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.25))
    for i, sig in enumerate(sigs):
        if i:
            time.sleep(rng.uniform(0.02, 0.2))
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return


def check_and_resume(w: dict, out: Path) -> str:
    """Checkpoints whole (a SIGKILL may leave one temp of ours), then resume (or start again when none was
    written) to the end: the LoRA equals the straight run's bit for bit, and no temp is left. -> how it went on."""
    ck = out / "checkpoints"
    names = sorted(os.listdir(ck)) if ck.is_dir() else []
    for n in names:
        assert n.startswith(".lcmtool-") or is_checkpoint(ck / n), (n, names)
    how = "resume" if any(is_checkpoint(ck / n) for n in names if n.startswith("step-")) else "restart"
    distill(config(w, out, resume="latest" if how == "resume" else ""))
    got = load_file(str(out / "lcm-lora.safetensors"))
    assert got.keys() == w["ref"].keys()
    diff = max((got[k].float() - w["ref"][k].float()).abs().max().item() for k in got)
    assert diff == 0 and all(torch.equal(got[k], w["ref"][k]) for k in got), f"{how}: max abs diff {diff}"
    left = sorted(n for n in os.listdir(ck) if not n.startswith("step-"))
    assert not left, left
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), steps  # a resumed run's metrics.jsonl does not repeat steps
    return how


def fork_trial(w: dict, out: Path, seed: int) -> str:
    rng = random.Random(seed)
    _, sigs = SIGNALS[seed % len(SIGNALS)]
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            distill(config(w, out))
        except KeyboardInterrupt:
            code = 130
        except BaseException:  # noqa: BLE001 - the parent checks what is on disk
            code = 1
        os._exit(code)
    kill_at(pid, out, rng, sigs)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 130, -signal.SIGKILL, -signal.SIGINT), code  # as in cli_trial
    return check_and_resume(w, out)


@pytest.mark.parametrize("seed", [0, 1])  # SIGKILL, SIGINT
def test_killed_distill_resumes_bit_identical(world, tmp_path, seed):
    fork_trial(world, tmp_path / "run", seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2, 14))
def test_killed_distill_resumes_bit_identical_more(world, tmp_path, seed):
    fork_trial(world, tmp_path / "run", seed)


def cli_trial(w: dict, out: Path, seed: int) -> str:
    rng = random.Random(seed)
    _, sigs = SIGNALS[seed % len(SIGNALS)]
    cmd = [sys.executable, "-m", "lcmtool", "distill", "--out", str(out), "--json"]
    for k, v in settings(w).items():
        cmd += ["--set", f"{k}={json.dumps(v) if isinstance(v, list) else v}"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
                         start_new_session=True)
    kill_at(p, out, rng, sigs)
    _, err = p.communicate(timeout=300)
    # finished, stopped (130), killed, or a second Ctrl-C that landed while the first one's exit was under way
    assert p.returncode in (0, 130, -signal.SIGKILL, -signal.SIGINT), (p.returncode, err[-2000:])
    if p.returncode == 130 and len(sigs) == 1 and (out / "checkpoints").is_dir():
        assert "--resume latest" in err, err[-2000:]  # the interrupted run says how to go on
    return check_and_resume(w, out)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(21))
def test_killed_distill_cli_resumes_bit_identical(world, tmp_path, seed):
    cli_trial(world, tmp_path / "run", seed)
