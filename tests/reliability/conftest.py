"""Fixtures of the reliability suite: small tmpfs mounts (root only; skipped elsewhere), a dead pid."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _mount(path: Path, size: str, ro: bool = False) -> bool:
    opts = f"size={size}" + (",ro" if ro else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    """tmpfs(size="2m", ro=False) -> a freshly mounted folder; skips the test where mounting is not allowed."""
    mounted: list[Path] = []

    def make(size: str = "2m", ro: bool = False, name: str = "fs") -> Path:
        d = tmp_path / f"{name}{len(mounted)}"
        d.mkdir()
        if not _mount(d, size, ro):
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.fixture(scope="session")
def dead_pid() -> int:
    """The pid of a process that has exited (what a killed run leaves in its temp names)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    with contextlib.suppress(ProcessLookupError):
        os.kill(p.pid, 0)
        pytest.skip("the pid was reused at once")
    return p.pid


def pytest_collection_modifyitems(config, items):
    """The suite's `slow` trials (more kills, fuzz cases and bad inputs) run only when asked: `-m slow` (or any -m)."""
    if config.getoption("markexpr"):
        return
    skip = pytest.mark.skip(reason="slow reliability trial: run with -m slow")
    here = Path(__file__).parent
    for item in items:
        if "slow" in item.keywords and here in Path(str(item.fspath)).parents:
            item.add_marker(skip)
