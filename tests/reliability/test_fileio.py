"""lcmtool.fileio: temp names of ours (also for what safetensors makes), stale temps removed and interrupted
publishes finished by the next write, environment errors as one WriteError line, pairs published together."""
from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from harness import remount_ro
from safetensors.torch import load_file, save_file

from lcmtool import fileio
from lcmtool.oserrors import WriteError, env_error


def entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def stale(folder: Path, name: str, pid: int, kind: str = "tmp") -> Path:
    """A temp name of ours as a killed process `pid` would have left it."""
    p = fileio.temp_name(folder / name, kind)
    return p.with_name(p.name.replace(f"-{os.getpid()}-", f"-{pid}-"))


def test_atomic_file_has_open_permissions_and_leaves_nothing_else(tmp_path):
    fileio.atomic_write_bytes(tmp_path / "a" / "b.bin", b"x" * 10)
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"x" * 10
    assert entries(tmp_path / "a") == {"b.bin"}
    assert (tmp_path / "a" / "b.bin").stat().st_mode & 0o777 == 0o666 & ~fileio.current_umask()


def test_safetensors_temp_lands_in_our_folder_never_beside_the_output(tmp_path):
    """safetensors writes `.tmpXXXXXX` beside its target and renames it; with atomic_path that target is inside a
    temp folder of ours, so nothing but our names ever appears beside the output (watched while it writes)."""
    seen: set[str] = set()
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.update(os.listdir(tmp_path))

    t = threading.Thread(target=watch)
    t.start()
    try:
        with fileio.atomic_path(tmp_path / "big.safetensors") as tmp:
            save_file({"a": torch.zeros(8_000_000)}, str(tmp))
    finally:
        done.set()
        t.join()
    assert entries(tmp_path) == {"big.safetensors"}
    strangers = {n for n in seen if n != "big.safetensors" and not fileio.is_ours(n)}
    assert not strangers and any(fileio.is_ours(n) for n in seen), seen


def test_failure_removes_temp_and_the_folders_the_write_made(tmp_path):
    with pytest.raises(RuntimeError), fileio.atomic_path(tmp_path / "new" / "deep" / "x.png") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")
    assert entries(tmp_path) == set()  # no empty output folder either


def test_stale_temps_of_dead_processes_go_live_ones_stay(tmp_path, dead_pid):
    (tmp_path / "out.safetensors").write_bytes(b"old")
    dead = stale(tmp_path, "out.safetensors", dead_pid)
    dead.mkdir()
    (dead / ".tmpAbC123").write_bytes(b"half of safetensors' own temp")
    live = fileio.temp_name(tmp_path / "other.png")  # this process's: a live run's temp is never touched
    live.mkdir()
    foreign = tmp_path / ".tmp-not-ours"
    foreign.write_bytes(b"")
    fileio.atomic_write_bytes(tmp_path / "out.safetensors", b"new")
    assert (tmp_path / "out.safetensors").read_bytes() == b"new"
    assert entries(tmp_path) == {"out.safetensors", live.name, foreign.name}


def test_set_aside_folder_goes_back_when_its_replacement_never_arrived(tmp_path, dead_pid):
    old = stale(tmp_path, "model", dead_pid, "old")
    old.mkdir()
    (old / "model_index.json").write_text("{}")
    fileio.atomic_write_text(tmp_path / "unrelated.yaml", "a: 1\n")
    assert (tmp_path / "model" / "model_index.json").is_file() and not old.exists()


def test_atomic_dir_replaces_a_folder_and_cleans_up(tmp_path):
    with fileio.atomic_dir(tmp_path / "pipe") as d:
        (d / "a.json").write_text("1")
    with fileio.atomic_dir(tmp_path / "pipe") as d:
        (d / "b.json").write_text("2")
    assert entries(tmp_path) == {"pipe"} and entries(tmp_path / "pipe") == {"b.json"}
    with pytest.raises(KeyboardInterrupt), fileio.atomic_dir(tmp_path / "pipe") as d:
        (d / "c.json").write_text("3")
        raise KeyboardInterrupt
    assert entries(tmp_path) == {"pipe"} and entries(tmp_path / "pipe") == {"b.json"}


def test_pair_is_published_together_or_not_at_all(tmp_path):
    out, side = tmp_path / "m.safetensors", tmp_path / "m.yaml"
    with fileio.paired(out, side, b"v: 1\n"):
        fileio.atomic_write_bytes(out, b"one")
    assert (out.read_bytes(), side.read_bytes()) == (b"one", b"v: 1\n") and entries(tmp_path) == {out.name, side.name}
    with pytest.raises(RuntimeError), fileio.paired(out, side, b"v: 2\n"):
        raise RuntimeError("the main write failed")
    assert (out.read_bytes(), side.read_bytes()) == (b"one", b"v: 1\n") and entries(tmp_path) == {out.name, side.name}


def test_pair_killed_between_the_renames_is_finished_by_the_next_write(tmp_path, dead_pid, monkeypatch):
    """The journal in the side file's temp folder names the published main output by inode: the next write into
    the folder publishes the side file, so the new output never stays beside the old config."""
    out, side = tmp_path / "m.safetensors", tmp_path / "m.yaml"
    out.write_bytes(b"old")
    side.write_bytes(b"v: old\n")
    real = os.replace
    calls = []

    def kill_after_main(src, dst):
        real(src, dst)
        calls.append(dst)
        if Path(dst) == out:
            raise SystemExit("killed")  # stands for SIGKILL: nothing after the main rename runs

    monkeypatch.setattr(fileio.os, "replace", kill_after_main)
    monkeypatch.setattr(fileio.shutil, "rmtree", lambda *a, **k: None)  # a killed process removes nothing
    with pytest.raises(SystemExit), fileio.paired(out, side, b"v: new\n"):
        fileio.atomic_write_bytes(out, b"new")
    monkeypatch.undo()
    assert out.read_bytes() == b"new" and side.read_bytes() == b"v: old\n"  # the half-pair a kill leaves
    tdirs = [p for p in tmp_path.iterdir() if fileio.is_ours(p)]
    for p in tdirs:  # as the dead process would have named them
        p.rename(stale(tmp_path, fileio._OURS.match(p.name)["name"], dead_pid))
    fileio.clean_stale(tmp_path)
    assert side.read_bytes() == b"v: new\n" and entries(tmp_path) == {out.name, side.name}


def test_pair_killed_while_writing_its_journal_keeps_the_old_pair(tmp_path, dead_pid):
    """A kill mid-journal leaves a partial journal (here: empty, the CI failure of stop 21) or only its .part:
    the main was not renamed yet, so the next write keeps the old pair and clears the temp folder."""
    out, side = tmp_path / "m.safetensors", tmp_path / "m.yaml"
    out.write_bytes(b"old")
    side.write_bytes(b"v: old\n")
    for journal in (fileio.JOURNAL, fileio.JOURNAL + ".part"):
        tdir = stale(tmp_path, side.name, dead_pid)
        tdir.mkdir()
        (tdir / side.name).write_bytes(b"v: new\n")
        (tdir / journal).write_text("")
        fileio.clean_stale(tmp_path)
        assert (out.read_bytes(), side.read_bytes()) == (b"old", b"v: old\n")
        assert entries(tmp_path) == {out.name, side.name}


def test_pair_side_failing_leaves_the_old_pair(tmp_path, monkeypatch):
    out, side = tmp_path / "m.safetensors", tmp_path / "m.yaml"
    out.write_bytes(b"old")
    side.write_bytes(b"v: old\n")
    real = Path.write_bytes

    def full(self, data):
        real(self, data[:2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(WriteError, match="no space left writing .*m.yaml"), fileio.paired(out, side, b"v: new\n"):
        raise AssertionError("the block must not run when the side file cannot be staged")
    monkeypatch.undo()
    assert (out.read_bytes(), side.read_bytes()) == (b"old", b"v: old\n") and entries(tmp_path) == {out.name, side.name}


@pytest.mark.parametrize("writer", ["bytes", "safetensors", "torch"])
def test_patched_full_disk_is_one_line_naming_the_path(tmp_path, monkeypatch, writer):
    """A writer that fails with ENOSPC in its own words (OSError, safetensors' text, torch's 'unexpected pos')."""
    out = tmp_path / "o" / "x.bin"
    if writer == "bytes":
        def body(tmp):
            tmp.write_bytes(b"a")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    elif writer == "safetensors":
        def body(tmp):
            tmp.write_bytes(b"a")
            raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    else:
        real = os.statvfs

        class Full:
            def __init__(self, st):
                self.f_flag, self.f_frsize, self.f_bavail = st.f_flag, st.f_frsize, 0
        monkeypatch.setattr(os, "statvfs", lambda p: Full(real(p)))

        def body(tmp):
            tmp.write_bytes(b"a" * 5000)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    with pytest.raises(WriteError) as e, fileio.atomic_path(out) as tmp:
        body(tmp)
    msg = str(e.value)
    assert "no space left writing" in msg and str(out) in msg and "\n" not in msg, msg
    assert e.value.errno == errno.ENOSPC and not (tmp_path / "o").exists()


def test_unrelated_errors_are_not_called_environment_errors(tmp_path):
    assert env_error(ValueError("bad shape"), tmp_path / "x") is None
    assert env_error(KeyError("k"), tmp_path / "x") is None
    with pytest.raises(ValueError), fileio.atomic_path(tmp_path / "x") as tmp:
        tmp.write_bytes(b"1")
        raise ValueError("a bug, not the disk")


def test_out_is_a_folder_or_a_file_in_the_way(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(WriteError, match="is a folder where a file is needed"):
        fileio.atomic_write_bytes(tmp_path / "d", b"1")
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(WriteError, match="f is a file where a folder is needed"):
        fileio.atomic_write_bytes(tmp_path / "f" / "x.png", b"1")
    with pytest.raises(WriteError, match="f is a file where a folder is needed"), fileio.atomic_dir(tmp_path / "f"):
        pass
    assert entries(tmp_path) == {"d", "f"}


# ---- real filesystems (tmpfs; root only) ----

def test_tmpfs_full_disk_safetensors_torch_and_bytes(tmpfs):
    fs = tmpfs("1m")
    cases = {"a.safetensors": lambda p: save_file({"a": torch.zeros(600_000)}, str(p)),
             "b.pt": lambda p: torch.save({"a": torch.zeros(600_000)}, p),
             "c.png": lambda p: p.write_bytes(b"\0" * 2_000_000)}
    for name, write in cases.items():
        with pytest.raises(WriteError) as e, fileio.atomic_path(fs / name) as tmp:
            write(tmp)
        assert "no space left writing" in str(e.value) and name in str(e.value), (name, str(e.value))
        assert entries(fs) == set(), (name, entries(fs))  # the partial temp is gone: the space is back
    fileio.atomic_write_bytes(fs / "small.txt", b"fits")
    assert entries(fs) == {"small.txt"}


def test_tmpfs_read_only(tmpfs):
    fs = tmpfs("1m")
    (fs / "keep.safetensors").write_bytes(b"old")
    remount_ro(fs)
    for name, write in {"keep.safetensors": lambda p: save_file({"a": torch.zeros(4)}, str(p)),
                        "sub/x.png": lambda p: p.write_bytes(b"1")}.items():
        with pytest.raises(WriteError, match="read-only; choose a writable folder"), fileio.atomic_path(fs / name) \
                as tmp:
            write(tmp)
    assert (fs / "keep.safetensors").read_bytes() == b"old" and entries(fs) == {"keep.safetensors"}


def test_write_then_read_back_round_trip_after_many_writes(tmp_path):
    """Fifty replacements of one output: each read sees a whole file, and no temp stays."""
    path = tmp_path / "t.safetensors"
    for i in range(50):
        with fileio.atomic_path(path) as tmp:
            save_file({"i": torch.full((3,), float(i))}, str(tmp))
        assert load_file(str(path))["i"].tolist() == [float(i)] * 3
    assert entries(tmp_path) == {"t.safetensors"}


def test_journal_is_json_with_the_inode(tmp_path, monkeypatch):
    """(The roll-forward reads what _publish_with_side wrote: the main's name, device and inode.)"""
    out, side = tmp_path / "m.bin", tmp_path / "m.yaml"
    seen = {}
    real = os.replace

    def spy(src, dst):
        if Path(dst) == out:
            j = next(Path(src).parent.parent.glob(f".lcmtool-tmp-m.yaml-*/{fileio.JOURNAL}"))
            seen.update(json.loads(j.read_text()), ino_src=os.stat(src).st_ino)
        real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", spy)
    with fileio.paired(out, side, b"x"):
        fileio.atomic_write_bytes(out, b"y")
    assert seen["main"] == "m.bin" and seen["ino"] == seen["ino_src"] == out.stat().st_ino
