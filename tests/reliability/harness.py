"""Helpers of the reliability suite: the CLI in a fresh process, remounting a tmpfs read-only, error lines."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def remount_ro(path: Path) -> None:
    r = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def cli_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT)}


def run_cli(*args, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`lcmtool ARGS` in a fresh process (what a user runs); -> the completed process (text output)."""
    return subprocess.run([sys.executable, "-m", "lcmtool", *map(str, args)], capture_output=True, text=True,
                          env=cli_env(), timeout=timeout, cwd=cwd)


def error_line(stderr: str) -> str:
    """The one line an exit-2 error prints (loading bars of diffusers above it are not ours)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else ""
