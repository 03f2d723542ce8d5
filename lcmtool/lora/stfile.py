"""safetensors files read and written by lcmtool itself: a validating reader that preads each tensor into its own
memory, a writer that streams the tensors into a temp file lcmtool owns and stamps the data hash in the header.

The data hash is sha256 of the bytes after the header: what A1111 calls the LoRA's addnet hash (its "Lora hashes"
infotext and the `sshs_model_hash` key kohya writes) and ModelSpec's `hash_sha256` ("all tensor content").
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from lcmtool.errors import LcmError
from lcmtool.fileio import atomic_path

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
_NAMES = {v: k for k, v in DTYPES.items()}
HASH_KEYS = ("sshs_model_hash", "modelspec.hash_sha256")


def _unique_pairs(pairs: list) -> dict:
    """json object hook: the safetensors format forbids a name twice; json.loads would keep the last silently."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key '{k[:120]}' in the header")
        out[k] = v
    return out


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(header dict, data offset) of a safetensors file; ValueError when the header is not one JSON object of
    unique keys."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("shorter than a safetensors header")
        n = int.from_bytes(raw, "little")
        if n > min(100_000_000, os.fstat(f.fileno()).st_size - 8):
            raise ValueError(f"header length {n} is past the end of the file")
        text = f.read(n)
    header = json.loads(text, object_pairs_hook=_unique_pairs)
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, 8 + n


class SafetensorsReader:
    """The tensors of one safetensors file, read on demand with pread straight into each tensor's own memory.

    safe_open validates the file (header, offsets, size); reading then needs no mmap (whose touched pages count
    in the resident set while the file is open) and no intermediate copy. Thread-safe: every read is a pread.
    """

    def __init__(self, path: str | os.PathLike, what: str = "LoRA file"):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise LcmError(f"{what} not found: {self.path}")
        try:
            header, self._base = read_header(self.path)
            with safe_open(str(self.path), framework="pt") as f:
                self.metadata = dict(f.metadata() or {})
                keys = list(f.keys())
        except (SafetensorError, OSError, ValueError, RuntimeError, UnicodeDecodeError) as e:
            raise LcmError(f"{self.path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
        self._entries = {k: header[k] for k in keys}

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple:
        return tuple(self._entries[key]["shape"])

    def dtype_name(self, key: str) -> str:
        return self._entries[key]["dtype"]

    def meta(self, key: str) -> torch.Tensor:
        """A meta tensor of the stored shape and dtype (no data); dtypes torch cannot name read as uint8."""
        e = self._entries[key]
        return torch.empty(e["shape"], dtype=DTYPES.get(e["dtype"], torch.uint8), device="meta")

    def get(self, key: str) -> torch.Tensor:
        e = self._entries[key]
        dtype = DTYPES.get(e["dtype"])
        if dtype is None:  # fp8 and other rare dtypes: let safetensors decode them
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as f:
                return f.get_tensor(key)
        t = torch.empty(e["shape"], dtype=dtype)
        begin, end = e["data_offsets"]
        if t.numel():
            buf = memoryview(t.view(-1).view(torch.uint8).numpy())
            if len(buf) != end - begin:
                raise LcmError(f"{self.path}: tensor '{key}' has {end - begin} bytes for shape {e['shape']}")
            fd = os.open(self.path, os.O_RDONLY)
            try:
                got = 0
                while got < len(buf):
                    k = os.preadv(fd, [buf[got:]], self._base + begin + got)
                    if k <= 0:
                        raise LcmError(f"{self.path}: truncated while reading '{key}'")
                    got += k
            finally:
                os.close(fd)
        return t


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> str:
    """Write `tensors` atomically (a temp file beside `path`, fsynced and renamed; removed on any failure) with
    `metadata` plus the data hash under HASH_KEYS; -> the hex sha256 of the data.

    Tensors are laid out widest dtype first, then by name, so every tensor starts aligned to its element size.
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    entries, offset, h = {}, 0, hashlib.sha256()
    for k in order:
        t = tensors[k]
        if t.dtype not in _NAMES:
            raise ValueError(f"tensor '{k}' has dtype {t.dtype}, which safetensors files do not hold here")
        n = t.numel() * t.element_size()
        entries[k] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
        if n:
            h.update(_bytes(t))
    digest = h.hexdigest()
    md = {str(k): str(v) for k, v in (metadata or {}).items()}
    md.update({HASH_KEYS[0]: digest, HASH_KEYS[1]: "0x" + digest})
    head = json.dumps({"__metadata__": md, **entries}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for k in order:
            if tensors[k].numel():
                f.write(_bytes(tensors[k]))
    return digest


def data_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of the bytes after the header (A1111's addnet hash, in full; its short form is the first 12)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def rewrite_metadata(path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Replace a safetensors file's `__metadata__`, keeping every tensor byte as it is (atomic)."""
    header, base = read_header(path)
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "rb") as src, atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        src.seek(base)
        while block := src.read(1 << 20):
            f.write(block)
