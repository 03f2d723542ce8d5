"""Atomic writes: every file or folder lcmtool writes is made under a temp name lcmtool owns, fsynced, then renamed
into place; what a killed run leaves behind is ours to recognise and remove on the next write to that folder.

Temp names: `.lcmtool-tmp-<name>-<host>-<pid>-<random>` (a folder beside the output `<name>`). A file is written
*inside* that folder under its own name, so that writers that make their own temp beside their target
(safetensors' `.tmpXXXXXX`) make it in our folder, never beside the output. A folder output is the temp folder
itself, renamed. An existing folder output is set aside as `.lcmtool-old-<name>-<host>-<pid>-<random>` while its
replacement moves in. `clean_stale(folder)` removes those of dead processes of this host (a live run's are kept)
and finishes what a kill interrupted (an old folder whose replacement never arrived is put back; a side file
whose main output was published is published too, see `paired`).

Environment errors (no space, read-only filesystem, no permission, a file where a folder is needed) while writing
become `WriteError` (an LcmError: one line, exit 2) naming the path and what is needed; the partial temp and any
folder the write created are removed.
"""
from __future__ import annotations

import contextlib
import errno as E
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path

from lcmtool.oserrors import WriteError, describe, env_error, writing

TMP_PREFIX = ".lcmtool-tmp-"
OLD_PREFIX = ".lcmtool-old-"
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:4]
_OURS = re.compile(r"^\.lcmtool-(tmp|old)-(?P<name>.+)-(?P<host>[0-9a-f]{4})-(?P<pid>\d+)-[0-9a-f]{6}$")
JOURNAL = "lcmtool-pair.json"  # inside a side file's temp folder: "publish me once the main output is in place"
_pairs = threading.local()


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def temp_name(final: str | os.PathLike, kind: str = "tmp") -> Path:
    """A fresh name of ours beside `final`: `.lcmtool-<kind>-<name>-<host>-<pid>-<random>`."""
    final = Path(final)
    return final.parent / f".lcmtool-{kind}-{final.name}-{_HOST}-{os.getpid()}-{secrets.token_hex(3)}"


def is_ours(path: str | os.PathLike) -> bool:
    """A temp or set-aside name that lcmtool made (never an output)."""
    return _OURS.match(Path(path).name) is not None


# ---- folders ----

def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in folder `path` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_dirs(folder: Path) -> list[Path]:
    """mkdir -p `folder`; -> the folders it created, outermost first (for `remove_empty` after a failure)."""
    made = []
    for p in reversed([folder, *folder.parents]):
        if not p.exists():
            made.append(p)
    with writing(folder / "."):
        folder.mkdir(parents=True, exist_ok=True)
    return made


def remove_empty(made: list[Path]) -> None:
    """Remove the folders in `made` (innermost first) that are empty."""
    for p in reversed(made):
        try:
            p.rmdir()
        except OSError:
            break


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp and set-aside entries of ours in `folder` left by dead processes of this host, finishing
    what they interrupted; -> what was removed. (Run before every write into `folder`: a scan of names.)"""
    folder = Path(folder)
    try:
        names = sorted(e.name for e in os.scandir(folder) if e.name.startswith(".lcmtool-"))
    except OSError:
        return []
    removed = []
    for p in (folder / n for n in names):
        m = _OURS.match(p.name)
        if not m or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        final = folder / m["name"]
        try:
            if m[1] == "old" and not final.exists() and p.is_dir():
                os.replace(p, final)  # killed between the two renames of publish_dir: the old one goes back
                continue
            if m[1] == "tmp" and (p / JOURNAL).is_file():
                _finish_pair(p, folder)
        except OSError:
            pass
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return removed


# ---- files ----

def _failed(exc: BaseException, path: Path, tmp: Path, made: list[Path], written: int = 0) -> WriteError | None:
    """After a failed write of `path`: -> the WriteError to raise instead of `exc` (None: re-raise `exc`), with
    the temp `tmp` and the folders the write made removed. The failed writer's frames are cleared first: one
    that keeps its file open in a local (torch.save's) would hold the partial file's space until exit."""
    if tmp.is_dir():
        written = max(written, sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()))
    err = env_error(exc, path, written)  # (probes the filesystem as the failed write left it)
    if err is not None and err is not exc:
        chain = exc
        for _ in range(5):
            if chain is None:
                break
            traceback.clear_frames(chain.__traceback__)
            chain = chain.__cause__ or chain.__context__
    shutil.rmtree(tmp, ignore_errors=True)
    remove_empty(made)
    if err is None or err is exc:
        return None
    return WriteError(describe(err.errno, err.path, written), err.path, err.errno)  # free space: as now


def _durable(path: Path, mode: int) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(path, mode)


def _publish_file(tmp: Path, final: Path) -> None:
    """Rename `tmp` onto `final` (and its staged side file, if `final` has one: see `paired`)."""
    side = getattr(_pairs, "staged", {}).get(final.absolute())
    if side is None:
        os.replace(tmp, final)
        return
    _publish_with_side(tmp, final, side)


@contextlib.contextmanager
def _temp_folder(final: Path) -> Iterator[Path]:
    """A new temp folder of ours beside `final` (its parent folders made, stale temps there removed), gone when
    the block ends. If the block fails, so do the folders made for it, and an environment error becomes a
    WriteError naming `final`."""
    made = make_dirs(final.parent)
    clean_stale(final.parent)
    tmp = temp_name(final)
    try:
        with writing(final):
            tmp.mkdir()
        yield tmp
    except BaseException as exc:
        err = _failed(exc, final, tmp, made)
        if err is None:
            raise
        raise err from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path for `path` (inside a temp folder of ours beside it; `suffix` replaces the extension);
    on success fsync it and rename it onto `path`. On failure the temp folder goes, and so do folders this made;
    environment errors become WriteError."""
    path = Path(path)
    if path.is_dir():
        raise WriteError(describe(E.EISDIR, path), path, E.EISDIR)
    with _temp_folder(path) as tdir:
        tmp = tdir / (path.stem + suffix if suffix else path.name)
        yield tmp
        with writing(path):
            _durable(tmp, 0o666 & ~current_umask())  # the permissions open() would give
            _publish_file(tmp, path)
            fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


# ---- folders as outputs ----

def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put folder `tmp` in place of `final`: fsync its files and itself, rename, fsync the parent; an existing
    `final` is removed only once the new one is in place. `final` is never half-written: a crash leaves the old
    one, the new one, or (between the two renames that replace an existing one) the old one set aside as
    `.lcmtool-old-<name>-...`, which `clean_stale` puts back."""
    tmp, final = Path(tmp), Path(final)
    umask = current_umask()
    with writing(final):
        for f in tmp.rglob("*"):  # durable before the rename, with the permissions open() / mkdir would give
            if f.is_file():       # (mkstemp / mkdtemp make 0600 / 0700)
                _durable(f, 0o666 & ~umask)
            elif f.is_dir():
                os.chmod(f, 0o777 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        fsync_dir(tmp)
        if final.exists():
            if not final.is_dir():
                raise WriteError(describe(E.ENOTDIR, final / "x"), final, E.ENOTDIR)
            old = temp_name(final, "old")
            os.replace(final, old)
            _publish_file(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            _publish_file(tmp, final)
        fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder of ours beside `final`; on success it replaces `final` (publish_dir). On
    failure it is removed (and folders this made); environment errors become WriteError."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise WriteError(describe(E.ENOTDIR, final / "x"), final, E.ENOTDIR)
    with _temp_folder(final) as tmp:
        yield tmp
        publish_dir(tmp, final)


@contextlib.contextmanager
def fresh_folder(folder: str | os.PathLike, keep=None) -> Iterator[Path]:
    """For a run folder the block fills (distill's `runs/<name>`): if the block fails and the folder did not
    exist (or was empty) before it, the folder goes, unless `keep(folder)` says it holds something worth
    keeping (a checkpoint to resume from). Only rank 0 of a data-parallel run removes it."""
    folder = Path(folder)
    fresh = not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))
    try:
        yield folder
    except BaseException:
        if fresh and folder.is_dir() and os.environ.get("RANK", "0") == "0" and not (keep and keep(folder)):
            shutil.rmtree(folder, ignore_errors=True)
        raise


# ---- an output and its side file (the resolved config), published together ----

def _publish_with_side(tmp: Path, final: Path, side: tuple[Path, Path]) -> None:
    """Journal, rename the main output, rename the side file, drop the journal. A kill after the main rename
    leaves the journal, which clean_stale reads to publish the side file too (the main output's inode, kept by
    the rename, says the rename happened)."""
    staged, side_final = side
    st = os.stat(tmp)
    journal = {"main": final.name, "dev": st.st_dev, "ino": st.st_ino, "side": side_final.name,
               "staged": staged.name}
    part = staged.parent / (JOURNAL + ".part")  # the journal appears whole or not at all: a kill mid-write
    part.write_text(json.dumps(journal))          # leaves only the .part, which means "main not renamed yet"
    _durable(part, 0o600)
    os.replace(part, staged.parent / JOURNAL)
    fsync_dir(staged.parent)
    os.replace(tmp, final)
    os.replace(staged, side_final)
    _pairs.staged.pop(final.absolute(), None)
    _pairs.done.add(final.absolute())


def _finish_pair(tdir: Path, folder: Path) -> None:
    """The roll-forward of `_publish_with_side` after a kill: publish the staged side file if the main is ours."""
    try:
        j = json.loads((tdir / JOURNAL).read_text())
    except ValueError:  # a journal is renamed into place whole; an unreadable one was never committed
        return
    staged, main = tdir / j["staged"], folder / j["main"]
    st = os.stat(main) if main.exists() else None
    if st is not None and (st.st_dev, st.st_ino) == (j["dev"], j["ino"]) and staged.is_file():
        os.replace(staged, folder / j["side"])


@contextlib.contextmanager
def paired(main: str | os.PathLike, side: str | os.PathLike, data: bytes) -> Iterator[None]:
    """Publish `side` (e.g. the resolved config `out.yaml`) together with `main`, the output written by
    atomic_path / atomic_dir inside the block: both or neither. `side` is staged (written, fsynced) first, so
    that a full disk fails before the main output changes; it is renamed right after the main's rename. If the
    block publishes no `main`, `side` is published alone at its end; if it fails, nothing of `side` stays."""
    main, side = Path(main).absolute(), Path(side)
    if not hasattr(_pairs, "staged"):
        _pairs.staged, _pairs.done = {}, set()
    with _temp_folder(side) as tdir:  # the staged side file's temp folder doubles as the pair's journal folder
        staged = tdir / side.name
        with writing(side):
            staged.write_bytes(data)
            _durable(staged, 0o666 & ~current_umask())
        _pairs.staged[main] = (staged, side)
        _pairs.done.discard(main)
        try:
            yield
        finally:
            _pairs.staged.pop(main, None)
        if main not in _pairs.done:
            with writing(side):
                os.replace(staged, side)
                fsync_dir(side.parent)
        _pairs.done.discard(main)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def json_safe(obj):
    """`obj` with every non-finite float as None, so that the report is valid JSON (no bare NaN / Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
