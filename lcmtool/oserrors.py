"""Environment errors while writing (no space, read-only filesystem, no permission, a file where a folder is
needed) as one line naming the path and what is needed: `WriteError`, an LcmError (exit 2).

Writers report them in their own words: Python raises OSError with an errno, safetensors says "(os error 28)",
torch.save says "unexpected pos 576 vs 534" (nothing about why); `env_error` reads the first two and, for the
third, checks the filesystem itself (read-only flag, free space, write permission).
"""
from __future__ import annotations

import errno as E
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lcmtool.errors import LcmError

_ENV = {E.ENOSPC: "free space", E.EDQUOT: "free disk quota", E.EROFS: "a writable filesystem",
        E.EACCES: "write permission", E.EPERM: "write permission", E.ENOTDIR: "a folder, not a file",
        E.EISDIR: "a file path, not a folder", E.EEXIST: "a folder, not a file", E.ENAMETOOLONG: "a shorter name",
        E.EMLINK: "fewer entries in its folder", E.EFBIG: "a filesystem that takes files this large"}


class WriteError(LcmError):
    """An output could not be written for a reason of the machine (space, permissions, read-only, a file in the
    way); `path` is what was being written."""

    def __init__(self, msg: str, path: Path | None = None, errno: int | None = None):
        super().__init__(msg)
        self.path, self.errno = path, errno


def _errno_of(exc: BaseException) -> int | None:
    """The errno of an OSError, or one named in the text of a writer's own error (safetensors says "(os error
    28)", torch "strerror: Read-only file system"); follows __cause__ / __context__."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OSError) and exc.errno in _ENV:
            return exc.errno
        text = str(exc)
        m = re.search(r"\[Errno (\d+)\]|os error (\d+)", text)
        if m and int(m.group(1) or m.group(2)) in _ENV:
            return int(m.group(1) or m.group(2))
        for code in (E.ENOSPC, E.EDQUOT, E.EROFS, E.EACCES):
            if os.strerror(code) in text:
                return code
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe(path: Path) -> int | None:
    """Why a write beside `path` may have failed without saying so (torch.save: "unexpected pos 576 vs 534"):
    a read-only or full filesystem, or a folder we may not write."""
    folder = _existing(path.parent)
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return E.EROFS
    if st.f_bavail * st.f_frsize < (1 << 20):
        return E.ENOSPC
    if not os.access(folder, os.W_OK):
        return E.EACCES
    return None


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _free(path: Path) -> int | None:
    try:
        st = os.statvfs(_existing(path.parent))
        return st.f_bavail * st.f_frsize
    except OSError:
        return None


def describe(code: int, path: Path, written: int = 0) -> str:
    """One line: what could not be written, why, and what is needed."""
    if code in (E.ENOSPC, E.EDQUOT):
        free = _free(path)
        if free is not None and written >= 0.9 * free:
            need = f"needs more than the {_size(free)} free"
        else:
            need = (f"needs more than {_size(written)}" if written else "needs more space") + (
                f", {_size(free)} free" if free is not None else "")
        what = "no space left" if code == E.ENOSPC else "disk quota exceeded"
        return f"{what} writing {path} ({need}): free some space or write to another filesystem"
    if code == E.EROFS:
        return f"cannot write {path}: the filesystem of {_existing(path.parent)} is read-only; choose a writable folder"
    if code in (E.EACCES, E.EPERM):
        return f"cannot write {path}: permission denied in {_existing(path.parent)}; choose a writable folder"
    if code in (E.ENOTDIR, E.EEXIST):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            return f"cannot write {path}: {blocker} is a file where a folder is needed"
        return f"cannot write {path}: it exists already"
    if code == E.EISDIR:
        return f"cannot write {path}: it is a folder where a file is needed"
    return f"cannot write {path}: {os.strerror(code)} (needs {_ENV.get(code, 'another place')})"


def env_error(exc: BaseException, path: str | os.PathLike | None, written: int = 0,
              probe: bool = True) -> WriteError | None:
    """`exc` as a WriteError naming `path` when the machine is at fault (see _ENV), else None. With `probe`, an
    I/O error that names no cause is checked against the filesystem (read-only, full, not writable)."""
    if isinstance(exc, WriteError):
        return exc
    if isinstance(exc, (KeyboardInterrupt, SystemExit, MemoryError)):
        return None
    code = _errno_of(exc)
    target = Path(path) if path is not None else None
    if isinstance(exc, OSError) and exc.filename and (target is None or code in (E.ENOTDIR, E.EISDIR, E.EEXIST)):
        target = Path(exc.filename)
    if target is None:
        return None
    if code is None and probe and (isinstance(exc, OSError) or re.search(
            r"unexpected pos|I/O|iostream|serializ|write|file", str(exc), re.I)):
        code = _probe(target)
    if code is None:
        return None
    return WriteError(describe(code, target, written), target, code)


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Environment errors inside the block become WriteError naming `path`."""
    try:
        yield
    except BaseException as exc:
        err = env_error(exc, path)
        if err is None or err is exc:
            raise
        raise err from None


def machine_error(exc: BaseException) -> str | None:
    """The CLI's last resort, for an error that escaped every writer: one line when the machine is at fault (an
    OSError naming a path: missing, not permitted, read-only, full, a file or folder in the way), else None."""
    code = _errno_of(exc)
    if isinstance(exc, OSError) and exc.filename and exc.errno in (*_ENV, E.ENOENT, E.ELOOP):
        path = Path(exc.filename)
        if exc.errno in (E.ENOSPC, E.EDQUOT, E.EROFS, E.ENOTDIR, E.EEXIST, E.EISDIR):
            return describe(exc.errno, path)
        return f"{path}: {exc.strerror or os.strerror(exc.errno)}"
    if code in (E.ENOSPC, E.EDQUOT, E.EROFS):  # a writer's own error that names the cause but no path
        return f"{os.strerror(code)} while writing: free some space or choose a writable folder"
    return None
