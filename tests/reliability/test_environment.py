"""A full disk, a read-only filesystem or a folder we may not write, under every command that writes (sample,
compare, merge, convert, distill): exit 2, one line naming the path and what is needed, and nothing partial left
(no temp, no empty output folder, no half-pair). Real on small tmpfs mounts (root; skipped elsewhere) and with
patched writers (anywhere)."""
from __future__ import annotations

import builtins
import errno
import io
import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lcmtool import fileio
from lcmtool.cli import app
from lcmtool.demo import ASSETS

SD_LORA = ASSETS / "lcm-lora-demo-sd.safetensors"
STYLE = ASSETS / "style-outline-demo-sd.safetensors"
P = "a large red circle on the left"

pytestmark = pytest.mark.skipif(not (ASSETS / "demo-sd" / "model_index.json").is_file(),
                                reason="the demo assets are not built (make demo-models)")


def commands(d: Path) -> dict[str, list[str]]:
    """Each writing command with its output under folder `d`."""
    return {
        "merge": ["merge", "--style", str(STYLE), "--lcm", str(SD_LORA), "--out", f"{d}/m.safetensors"],
        "convert": ["convert", str(SD_LORA), "--format", "diffusers", "--out", f"{d}/c.safetensors"],
        "sample": ["sample", "--prompt", P, "--steps", "1", "--out", f"{d}/s"],
        "compare": ["compare", "--prompt", P, "--runs", "lcm:1", "--out", f"{d}/g.png"],
    }


def one_error_line(r) -> str:
    lines = [ln for ln in (r.stderr or r.output).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1, (r.exit_code, r.output[-2000:])
    return errors[0]


def fill_up(fs: Path) -> None:
    """Leave no free byte on tmpfs `fs`."""
    fd = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for n in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * n)
            except OSError:
                pass
    finally:
        os.close(fd)


@pytest.mark.parametrize("cmd", ["merge", "convert", "sample", "compare"])
def test_full_tmpfs(cmd, tmpfs):
    fs = tmpfs("1m")
    fill_up(fs)
    r = CliRunner().invoke(app, commands(fs)[cmd])
    line = one_error_line(r)
    assert "no space left writing" in line and str(fs) in line and "free some space" in line, line
    assert sorted(os.listdir(fs)) == ["filler"], os.listdir(fs)  # no partial, no empty folder, no lone .yaml


@pytest.mark.parametrize("cmd", ["merge", "convert"])
def test_output_that_does_not_fit_leaves_the_old_pair(cmd, tmpfs, tmp_path):
    """The new LoRA (1.4-1.8 MB) does not fit beside the old one (0.4 MB) on a 1.5 MB disk: the old LoRA and its
    .yaml stay, byte for byte; nothing else is left."""
    fs = tmpfs("1500k")
    small = tmp_path / "small.safetensors"
    r = CliRunner().invoke(app, ["convert", str(STYLE), "--out", str(small)])
    assert r.exit_code == 0, r.output
    args = commands(fs)[cmd]
    out = Path(args[-1])
    out.write_bytes(small.read_bytes())
    out.with_suffix(".yaml").write_text("old: true\n")
    r = CliRunner().invoke(app, args)
    assert "no space left writing" in one_error_line(r)
    assert out.read_bytes() == small.read_bytes() and out.with_suffix(".yaml").read_text() == "old: true\n"
    assert sorted(os.listdir(fs)) == sorted([out.name, out.with_suffix(".yaml").name])


# ---- patched writers: the disk fills after N bytes, or the folder may not be written ----

class _Full(io.RawIOBase):
    def __init__(self, f, budget: list[int]):
        self.f, self.budget = f, budget

    def write(self, b):
        n = min(len(b), self.budget[0])
        self.budget[0] -= n
        if n < len(b):
            if n:
                self.f.write(bytes(b[:n]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()


def _patch_writes(monkeypatch, budget: int) -> None:
    """Every file lcmtool opens for writing under a temp name of ours fills the 'disk' after `budget` bytes."""
    real = builtins.open
    left = [budget]

    def fake_open(file, mode="r", *a, **k):
        f = real(file, mode, *a, **k)
        if any(c in mode for c in "wax") and fileio.TMP_PREFIX in str(file):
            return _Full(f, left)
        return f

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)


@pytest.mark.parametrize("budget", [0, 2000])
@pytest.mark.parametrize("cmd", ["merge", "convert", "sample", "compare"])
def test_patched_full_disk(cmd, budget, monkeypatch, tmp_path):
    import safetensors.torch as st

    real_save = st.save_file

    def full_save(tensors, filename, metadata=None):  # safetensors writes in Rust: fail as it says it does
        Path(filename).write_bytes(b"\0" * budget)
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(st, "save_file", full_save)
    _patch_writes(monkeypatch, budget)
    d = tmp_path / "out"
    r = CliRunner().invoke(app, commands(d)[cmd])
    monkeypatch.setattr(st, "save_file", real_save)
    line = one_error_line(r)
    assert "no space left writing" in line and str(d) in line, line
    assert not d.exists() or not os.listdir(d), os.listdir(d)


@pytest.mark.parametrize("cmd", ["merge", "convert", "sample", "compare"])
def test_folder_we_may_not_write(cmd, monkeypatch, tmp_path):
    """EACCES (as a non-root user meets in a folder of someone else's; root is never refused, so patched)."""
    real = Path.mkdir

    def refuse(self, *a, **k):
        if self.name.startswith(fileio.TMP_PREFIX) or self.name == "locked":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", refuse)
    d = tmp_path / "locked"
    real(d)
    r = CliRunner().invoke(app, commands(d)[cmd])
    line = one_error_line(r)
    assert "permission denied" in line and "choose a writable folder" in line and str(d) in line, line
    assert not os.listdir(d)


# ---- distill: the disk fills at the second checkpoint ----

def distill_args(out: Path, cache: Path, *extra: str) -> list[str]:
    args = ["distill", "--model", str(ASSETS / "demo-sd"), "--out", str(out)]
    for kv in ("device=cpu", "num_samples=4", "batch_size=2", "lora_rank=2", "lora_alpha=2", f"cache_dir={cache}",
               "validation_steps=1", "validation_prompts=[a red circle]", "checkpoint_every=1", "validate_every=0",
               "log_every=1", "keep_checkpoints=3", "report_to=none") + extra:
        args += ["--set", kv]
    return args


def test_distill_disk_full_keeps_the_last_checkpoint_and_resumes(tmpfs, tmp_path):
    fs = tmpfs("2500k")
    run = fs / "run"
    r = CliRunner().invoke(app, distill_args(run, tmp_path / "cache", "max_steps=3"))
    line = one_error_line(r)
    assert "no space left writing" in line and str(run / "checkpoints") in line, line
    assert "--resume latest" in line, line
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-0000001"], ckpts  # the good one; nothing partial beside it
    from lcmtool.distill.checkpoint import is_checkpoint

    assert is_checkpoint(run / "checkpoints" / "step-0000001")
    subprocess.run(["mount", "-o", "remount,size=16m", str(fs)], check=True)
    r = CliRunner().invoke(app, distill_args(run, tmp_path / "cache", "max_steps=3", "resume=latest"))
    assert r.exit_code == 0, r.output[-2000:]
    assert (run / "lcm-lora.safetensors").is_file()


def test_distill_fresh_run_folder_goes_when_the_run_fails(tmpfs, tmp_path):
    """Too small for the first checkpoint: exit 2, and the run folder it made (config.yaml, metrics) is gone."""
    fs = tmpfs("600k")
    r = CliRunner().invoke(app, distill_args(fs / "run", tmp_path / "cache", "max_steps=2"))
    assert "no space left writing" in one_error_line(r)
    assert os.listdir(fs) == [], os.listdir(fs)
