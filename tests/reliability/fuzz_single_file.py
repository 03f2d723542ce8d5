"""A seeded mutator of single-file checkpoints (a small .safetensors and weights-only .ckpt/.pt files, zip and
legacy) against lcmtool.models.single_file.load_checkpoint / checkpoint_shapes.

    python fuzz_single_file.py SEED CASES   -> one JSON line: counts, and every case that was not a state dict
                                               or one LcmError line (another exception, a hang, a stray file)

Run by test_fuzz_single_file.py in a subprocess, so that a crash (a signal) or a runaway allocation is seen as such
instead of taking pytest down; each case has a 5 s alarm and the process a 4 GB address-space limit.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path


def base_files(folder: Path) -> dict[str, bytes]:
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g),
          "model.diffusion_model.input_blocks.0.0.bias": torch.randn(8, generator=g),
          "first_stage_model.decoder.conv_in.weight": torch.randn(4, 4, 3, 3, generator=g).half(),
          "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight":
              torch.randn(16, 8, generator=g).to(torch.bfloat16),
          "model.diffusion_model.out.2.weight": torch.randn(4, 8, 3, 3, generator=g)}
    files = {"st": save(sd, metadata={"modelspec.title": "fuzz"})}
    for name, kw in (("zip", {}), ("legacy", {"_use_new_zipfile_serialization": False})):
        buf = io.BytesIO()
        torch.save({"state_dict": sd, "global_step": 3}, buf, **kw)
        files[name] = buf.getvalue()
    return files


# ---- mutations: each takes (rng, bytes) -> bytes ----

def flip_bits(r, b):
    b = bytearray(b)
    for _ in range(r.randint(1, 8)):
        i = r.randrange(len(b))
        b[i] ^= 1 << r.randrange(8)
    return bytes(b)


def overwrite(r, b):
    b = bytearray(b)
    i = r.randrange(len(b))
    n = r.randint(1, 64)
    b[i:i + n] = bytes(r.randrange(256) for _ in range(min(n, len(b) - i)))
    return bytes(b)


def truncate(r, b):
    return b[:r.randrange(len(b))]


def zero_run(r, b):
    i = r.randrange(len(b))
    n = r.randint(1, 4096)
    return b[:i] + b"\0" * min(n, len(b) - i) + b[i + n:]


def append_junk(r, b):
    return b + bytes(r.randrange(256) for _ in range(r.randint(1, 300)))


def insert_or_delete(r, b):
    i = r.randrange(len(b))
    if r.random() < 0.5:
        return b[:i] + bytes(r.randrange(256) for _ in range(r.randint(1, 16))) + b[i:]
    return b[:i] + b[i + r.randint(1, 16):]


BYTES = [flip_bits, overwrite, truncate, zero_run, append_junk, insert_or_delete]


def st_parts(b):
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n]), b[8 + n:]


def st_join(header, data, length=None):
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


BAD_VALUES = [-1, 0, 1, 2 ** 31, 2 ** 40, 2 ** 63 - 1, 2 ** 64 - 1, 1.5, "7", None, [], {}, True, -(2 ** 63)]


def st_header_length(r, b):
    h, data = st_parts(b)
    raw = json.dumps(h).encode()
    return st_join(raw, data, r.choice([0, 1, 7, len(raw) - 1, len(raw) + 1, len(raw) + len(data) + 1, 2 ** 32,
                                        2 ** 63, 2 ** 64 - 1, r.randrange(2 ** 64)]))


def st_field(r, b):
    h, data = st_parts(b)
    key = r.choice([k for k in h if k != "__metadata__"])
    field = r.choice(["dtype", "shape", "data_offsets"])
    entry = h[key]
    if field == "dtype":
        entry["dtype"] = r.choice(["F64", "I8", "U8", "BOOL", "F8_E4M3", "I64", "C64", "X9", "", 3, None])
    elif field == "shape":
        entry["shape"] = r.choice([[], [0], [-1, 4], [2 ** 40, 2 ** 40], [1] * 40, ["3"], [3.5], None,
                                   [*entry["shape"], 2], entry["shape"][::-1]])
    else:
        a, z = entry["data_offsets"]
        entry["data_offsets"] = r.choice([[z, a], [a, z + 1], [a, len(data) + 8], [-8, z], [a, a], [0, 0], [a],
                                          [a, z, z], None, [str(a), z], [2 ** 64 - 1, 2 ** 64]])
    return st_join(h, data)


def st_structure(r, b):
    h, data = st_parts(b)
    raw = json.dumps(h).encode()
    choice = r.randrange(7)
    if choice == 0:  # a key twice (the format forbids it)
        k = next(k for k in h if k != "__metadata__")
        dup = raw[:-1] + b", " + json.dumps(k).encode() + b": " + json.dumps(h[k]).encode() + b"}"
        return st_join(dup, data)
    if choice == 1:  # not an object
        return st_join(r.choice([b"[]", b"3", b'"x"', b"null", b"{", b"{}" + b" " * 7]), data)
    if choice == 2:  # metadata of the wrong type
        h["__metadata__"] = r.choice([{"a": 1}, [1], "x", {"a": None}, {"a": {"b": "c"}}])
        return st_join(h, data)
    if choice == 3:  # invalid UTF-8 in the header
        return st_join(raw.replace(b"weight", b"w\xff\xfeight", 1), data)
    if choice == 4:  # overlapping or gapped tensors
        ks = [k for k in h if k != "__metadata__"]
        a, b2 = r.sample(ks, 2)
        h[a]["data_offsets"] = list(h[b2]["data_offsets"])
        return st_join(h, data)
    if choice == 5:  # a tensor removed (its bytes left behind)
        h.pop(r.choice([k for k in h if k != "__metadata__"]))
        return st_join(h, data)
    return st_join(raw + b" " * r.randint(1, 9), data)  # padding without the length following


SAFETENSORS = [st_header_length, st_field, st_structure]


def zip_member(r, b):
    """Rewrite one member of the torch zip (data.pkl, a storage, the version record) mutated."""
    src = zipfile.ZipFile(io.BytesIO(b))
    names = src.namelist()
    target = r.choice(names)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for n in names:
            data = src.read(n)
            if n == target:
                data = r.choice(BYTES)(r, data) if data else b"x"
            if not (n == target and r.random() < 0.15):  # sometimes the member is gone
                dst.writestr(n, data)
    return out.getvalue()


def evil_pickle(r, b):
    """A pickle that would run code (os.system, builtins.eval, subprocess) if unpickled without weights_only."""
    marker = f"/tmp/lcmtool-fuzz-pwned-{os.getpid()}"

    class Evil:
        def __reduce__(self):
            return r.choice([(os.system, (f"touch {marker}",)), (eval, (f"open('{marker}', 'w')",)),
                             (__import__("subprocess").call, (["touch", marker],))])

    payload = {"state_dict": {"x": Evil()}} if r.random() < 0.5 else Evil()
    if r.random() < 0.5:
        return pickle.dumps(payload, protocol=r.choice([2, 4, 5]))
    out = io.BytesIO()  # the same inside a torch-style zip
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
        z.writestr("archive/version", "3\n")
    return out.getvalue()


CKPT = [zip_member, evil_pickle]


def mutate(r: random.Random, base: dict[str, bytes]) -> tuple[str, str, bytes]:
    kind = r.choice(["st", "st", "zip", "legacy"])
    b = base[kind]
    ops = BYTES + (SAFETENSORS * 2 if kind == "st" else CKPT if kind == "zip" else [evil_pickle])
    names = []
    for _ in range(r.choice([1, 1, 1, 2, 3])):
        op = r.choice(ops)
        try:
            b = op(r, b) if b else b
        except (ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile, struct.error, IndexError,
                StopIteration, EOFError, OSError, NotImplementedError):
            continue  # the mutation does not apply to what an earlier one left
        names.append(op.__name__)
    suffix = ".safetensors" if kind == "st" else r.choice([".ckpt", ".pt", ".bin", ".pth"])
    return kind + ":" + "+".join(names), suffix, b


class Hang(Exception):
    pass


def run(seed: int, cases: int) -> dict:
    import torch  # noqa: F401 - loaded before the clock and the memory limit

    from lcmtool.errors import LcmError
    from lcmtool.models.single_file import checkpoint_shapes, load_checkpoint

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    def alarm(*_):
        raise Hang

    signal.signal(signal.SIGALRM, alarm)
    folder = Path(tempfile.mkdtemp(prefix="lcmtool-fuzz-"))
    base = base_files(folder)
    r = random.Random(seed)
    counts = {"cases": 0, "state_dict": 0, "refused": 0, "evil": 0}
    bad, t0 = [], time.time()
    for i in range(cases):
        name, suffix, data = mutate(r, base)
        path = folder / f"case{i}{suffix}"
        path.write_bytes(data)
        for fn in (checkpoint_shapes, load_checkpoint):
            signal.alarm(5)
            try:
                out = fn(path)
                assert isinstance(out, dict)
                counts["state_dict"] += 1
            except LcmError as e:
                counts["refused"] += 1
                if "\n" in str(e) or not str(e):
                    bad.append([i, name, fn.__name__, "LcmError of more than one line", str(e)[:300]])
            except Hang:
                bad.append([i, name, fn.__name__, "hang (> 5 s)", ""])
            except BaseException as e:  # noqa: BLE001 - every other exception is a finding
                bad.append([i, name, fn.__name__, type(e).__name__, traceback.format_exc(limit=3)[-600:]])
            finally:
                signal.alarm(0)
        counts["evil"] += "evil_pickle" in name
        counts["cases"] += 1
        path.unlink()
    pwned = [p for p in os.listdir("/tmp") if p.startswith(f"lcmtool-fuzz-pwned-{os.getpid()}")]
    if pwned:
        bad.append([-1, "evil_pickle", "-", "a pickle ran code", str(pwned)])
    return dict(counts, bad=bad, seconds=round(time.time() - t0, 1))


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]), int(sys.argv[2]))))
    sys.stdout.flush()
