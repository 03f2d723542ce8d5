"""A seeded fuzz of the LoRA reader (issue 16): mutated LoRA files (bit flips, truncations, bad header lengths, bad
JSON fields: dtypes, shapes, offsets, names, duplicate keys, metadata; NaN/inf values and alphas; rank-0 factors)
through `inspect --json`, `merge` and `convert`. Every case ends in exit 0 with a clean result (valid JSON; a
written LoRA that reads back finite) or exit 2 with one line: never exit 1 (an internal error), a hang or a crash.

The cases run in a child process (this file run as a script), so that a crash of a native reader fails the test
instead of the test run; each case has its own alarm. 600 cases in CI (~30 s on 2 cores), 3000 behind -m slow.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

CASE_TIMEOUT_S = 20
DTYPES = ["F16", "F32", "BF16", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL", "F8_E4M3", "F8_E5M2", "XX", "", 7]


# ---- base files ----

def base_files(d: Path) -> list[Path]:
    """Small valid LoRAs in four layouts: kohya SD-1.5 (fp16, linear + conv), diffusers with a peft config in the
    metadata (fp32), kohya SGM SDXL and a kohya text-encoder part."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)

    def f(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    k, c = "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", "down_blocks_0_resnets_0_conv1"
    files = {
        "kohya": ({f"lora_unet_{k}.lora_down.weight": f(2, 768).half(),
                   f"lora_unet_{k}.lora_up.weight": f(320, 2).half(), f"lora_unet_{k}.alpha": torch.tensor(2.0),
                   f"lora_unet_{c}.lora_down.weight": f(2, 320, 3, 3).half(),
                   f"lora_unet_{c}.lora_up.weight": f(320, 2, 1, 1).half(), f"lora_unet_{c}.alpha": torch.tensor(1.0)},
                  {"ss_network_dim": "2"}),
        "diffusers": ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": f(4, 320),
                       "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": f(320, 4),
                       "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": f(4, 768),
                       "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": f(1280, 4)},
                      {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8,
                                                            "alpha_pattern": {"proj_in": 2}})}),
        "sgm": ({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": f(2, 2048).half(),
                 "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": f(640, 2).half(),
                 "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.alpha": torch.tensor(2.0),
                 "lora_unet_output_blocks_2_2_conv.lora_down.weight": f(2, 1280, 3, 3).half(),
                 "lora_unet_output_blocks_2_2_conv.lora_up.weight": f(1280, 2, 1, 1).half()}, {}),
        "te": ({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": f(2, 768),
                "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": f(3072, 2),
                "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(2.0),
                f"lora_unet_{k}.lora_down.weight": f(2, 768), f"lora_unet_{k}.lora_up.weight": f(320, 2)}, {}),
    }
    out = []
    for name, (sd, md) in files.items():
        p = d / f"base-{name}.safetensors"
        save_file(sd, str(p), metadata=md)
        out.append(p)
    return out


# ---- mutations ----

def split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict | str, body: bytes) -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


def _tensor_keys(h: dict) -> list[str]:
    return [k for k in h if k != "__metadata__"]


def m_flip(rng, data):
    b = bytearray(data)
    n = int.from_bytes(data[:8], "little")
    lo, hi = rng.choice([(0, 8 + n), (8 + n, len(b)), (0, len(b))])
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(lo, max(lo + 1, hi))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def m_truncate(rng, data):
    return data[:rng.randrange(0, len(data))]


def m_header_len(rng, data):
    n = int.from_bytes(data[:8], "little")
    new = rng.choice([0, 1, n - rng.randint(1, 16), n + rng.randint(1, 16), len(data), 2 ** 40, 2 ** 64 - 1])
    return max(0, new).to_bytes(8, "little") + data[8:]


def m_dtype(rng, data):
    h, body = split(data)
    h[rng.choice(_tensor_keys(h))]["dtype"] = rng.choice(DTYPES)
    return join(h, body)


def m_shape(rng, data):
    h, body = split(data)
    e = h[rng.choice(_tensor_keys(h))]
    shape = list(e["shape"])
    op = rng.choice(["grow", "zero", "negative", "huge", "drop", "add", "string", "swap"])
    i = rng.randrange(len(shape)) if shape else 0
    if op == "grow" and shape:
        shape[i] += rng.choice([1, -1])
    elif op == "zero" and shape:
        shape[i] = 0
    elif op == "negative" and shape:
        shape[i] = -shape[i]
    elif op == "huge" and shape:
        shape[i] = 2 ** rng.choice([31, 40, 62])
    elif op == "drop" and shape:
        shape.pop(i)
    elif op == "add":
        shape.append(1)
    elif op == "string":
        shape = "big"
    elif shape:
        shape.reverse()
    e["shape"] = shape
    return join(h, body)


def m_offsets(rng, data):
    h, body = split(data)
    e = h[rng.choice(_tensor_keys(h))]
    a, b = e["data_offsets"]
    e["data_offsets"] = rng.choice([[a + 2, b + 2], [b, a], [a, b + 8], [-8, b], [a, 2 ** 62], [0, 0], [a], "x"])
    return join(h, body)


def m_rename(rng, data):
    h, body = split(data)
    k = rng.choice(_tensor_keys(h))
    stem, dot, suffix = k.partition(".")
    new = rng.choice([
        "lora_unet_no_such_block_proj" + dot + suffix,  # a module no model has
        "lora_unet_" + dot + suffix,  # empty path
        "unet.down_blocks.0.resnets.0.conv1.weight.lora_A.weight",  # a parameter, not a module
        "unet..lora_A.weight", stem + ".lora_mid.weight", stem + ".hada_w1_a", stem + ".dora_scale",
        "lora_te9_text_model_encoder_layers_0_mlp_fc1" + dot + suffix, "x" * 300 + dot + suffix,
        stem.replace("_", ".") + dot + suffix, "\u00e9t\u00e9" + dot + suffix, "",
    ])
    h[new] = h.pop(k)
    return join(h, body)


def m_drop_key(rng, data):
    h, body = split(data)
    del h[rng.choice(_tensor_keys(h))]
    return join(h, body)  # the data of the dropped tensor is still there: an incomplete buffer


def m_duplicate(rng, data):
    """The same tensor name twice in the header (json.dumps cannot write it: built as text)."""
    h, body = split(data)
    k = rng.choice(_tensor_keys(h))
    text = json.dumps(h)
    return join(text[:-1] + ", " + json.dumps(k) + ": " + json.dumps(h[k]) + "}", body)


def m_metadata(rng, data):
    h, body = split(data)
    md = h.get("__metadata__") or {}
    choice = rng.randrange(9)
    if choice == 0:
        md["lora_adapter_metadata"] = json.dumps({"lora_alpha": rng.choice(["big", None, True, [1], {"a": 1}])})
    elif choice == 1:
        md["lora_adapter_metadata"] = json.dumps({"lora_alpha": 4, "alpha_pattern": {rng.choice(["(", "[", "*"]): 2}})
    elif choice == 2:
        md["lora_adapter_metadata"] = rng.choice(["{not json", "[1, 2]", "null", "1e999", '"s"'])
    elif choice == 3:
        md["lora_adapter_metadata"] = json.dumps({"lora_alpha": 4, "alpha_pattern": {"proj": "x"}, "use_rslora": 1})
    elif choice == 4:
        md["ss_network_alpha"] = "big"
    elif choice == 5:
        md = {"k": 5}  # a non-string value
    elif choice == 6:
        md = ["not", "a", "dict"]
    elif choice == 7:
        md["x" * 50] = "y" * 100_000
    else:
        md["lora_adapter_metadata"] = json.dumps({"lora_alpha": 1e308 * 10 if rng.random() < 0.5 else -0.0})
    h["__metadata__"] = md
    return join(h, body)


def _write_values(rng, data, values):
    """Overwrite part of a float tensor's bytes with `values` (packed in its own dtype)."""
    import struct

    h, body = split(data)
    floats = [k for k in _tensor_keys(h) if h[k]["dtype"] in ("F16", "F32")]
    if not floats:
        return data
    k = rng.choice(floats)
    e = h[k]
    fmt, size = ("<e", 2) if e["dtype"] == "F16" else ("<f", 4)
    a, b = e["data_offsets"]
    body = bytearray(body)
    for _ in range(rng.randint(1, 4)):
        if b - a >= size:
            i = a + size * rng.randrange((b - a) // size)
            body[i:i + size] = struct.pack(fmt, rng.choice(values))
    return join(h, bytes(body))


def m_nonfinite(rng, data):
    return _write_values(rng, data, [math.nan, math.inf, -math.inf])


def m_extreme(rng, data):
    return _write_values(rng, data, [0.0, -0.0, 6e4, -6e4, 1e-7, 3e38])


def m_rank0(rng, data):
    """A module whose factors have rank 0 (valid safetensors: zero-size tensors)."""
    import torch
    from safetensors.torch import load, save

    h, _ = split(data)
    sd = load(data)
    downs = [k for k in sd if k.endswith(("lora_down.weight", "lora_A.weight"))]
    k = rng.choice(downs)
    up = k.replace("lora_down", "lora_up").replace("lora_A", "lora_B")
    sd[k] = torch.zeros((0, *sd[k].shape[1:]), dtype=sd[k].dtype)
    if up in sd:
        sd[up] = torch.zeros((sd[up].shape[0], 0, *sd[up].shape[2:]), dtype=sd[up].dtype)
    return save(sd, metadata=h.get("__metadata__"))


OPS = [m_flip, m_truncate, m_header_len, m_dtype, m_shape, m_offsets, m_rename, m_drop_key, m_duplicate,
       m_metadata, m_nonfinite, m_extreme, m_rank0]


# ---- one case ----

class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang


def strict_json(text: str):
    def bare(c):
        raise ValueError(f"bare {c}")

    return json.loads(text, parse_constant=bare)


def run_case(runner, path: Path, work: Path, convert: bool) -> list[str]:
    """-> problems (empty when every command ended in a clean result or a one-line exit 2)."""
    from lcmtool.lora.io import load_lora

    problems = []
    out = work / "out.safetensors"
    cmds = [("inspect", [str(path), "--json"]), ("merge", ["--add", f"{path}:0.5", "--out", str(out), "--json"])]
    if convert:
        cmds.append(("convert", [str(path), "--format", "diffusers", "--out", str(out)]))
    for name, args in cmds:
        for p in work.iterdir():
            p.unlink()
        signal.alarm(CASE_TIMEOUT_S)
        try:
            r = runner(name, *args)
        except Hang:
            problems.append(f"{name}: hang (> {CASE_TIMEOUT_S} s)")
            continue
        finally:
            signal.alarm(0)
        if r.exit_code == 2:
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            if len(lines) != 1 or not lines[0].startswith("error:"):
                problems.append(f"{name}: exit 2 without one error line: {r.stderr[-300:]!r}")
            if name != "inspect" and [p for p in work.iterdir()]:
                problems.append(f"{name}: exit 2 left {[p.name for p in work.iterdir()]}")
        elif r.exit_code == 0:
            try:
                if name == "inspect":
                    strict_json(r.stdout)
                else:
                    back = load_lora(out)  # refuses inf/NaN itself
                    assert back.modules
            except Exception as e:  # noqa: BLE001 - the finding to report
                problems.append(f"{name}: exit 0 but the result is not clean: {type(e).__name__}: {e}")
        else:
            problems.append(f"{name}: exit {r.exit_code}: {(r.stderr or r.output)[-400:]!r}")
    return problems


def main(seed: int, n: int, d: str) -> dict:
    """Run `n` seeded cases in folder `d`; -> summary (printed as one JSON line)."""
    import torch
    import typer.testing
    from typer.testing import CliRunner

    from lcmtool.cli import app

    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _alarm)
    d = Path(d)
    bases = [p.read_bytes() for p in base_files(d)]
    work = d / "work"
    work.mkdir()
    rng = random.Random(seed)
    # the CLI as `lcmtool` runs it, its Typer command built once (typer's CliRunner rebuilds it for every call,
    # which would cost more than the case; this child process only)
    cmd = typer.testing._get_command(app)
    typer.testing._get_command = lambda _: cmd
    base = CliRunner()

    def runner(*args):
        return base.invoke(app, list(args))

    stats: Counter = Counter()
    failures = []
    for i in range(n):
        op = OPS[i % len(OPS)]
        data = rng.choice(bases)
        ops = [op] + ([rng.choice(OPS)] if rng.random() < 0.2 else [])
        try:
            for o in ops:
                data = o(rng, data)
        except Exception:  # noqa: BLE001 - a mutation that does not apply to this base: the base as is
            pass
        path = d / f"case-{i}.safetensors"
        path.write_bytes(data)
        problems = run_case(runner, path, work, convert=i % 3 == 0)
        from lcmtool.lora.io import load_lora

        try:
            load_lora(path)
            stats[f"{op.__name__}:clean"] += 1
        except Exception:  # noqa: BLE001
            stats[f"{op.__name__}:refused"] += 1
        if problems:
            failures.append({"case": i, "ops": [o.__name__ for o in ops], "problems": problems})
        path.unlink()
    return {"cases": n, "stats": dict(stats), "failures": failures[:20], "n_failures": len(failures)}


def _run(tmp_path, seed, n, timeout):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, __file__, str(seed), str(n), str(tmp_path)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, f"fuzz driver crashed (rc {r.returncode}): {r.stderr[-3000:]}"
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["n_failures"] == 0, json.dumps(summary["failures"], indent=1)[:6000]
    assert summary["cases"] == n
    stats = summary["stats"]
    for op in OPS:  # every mutation was tried, and the fuzz both refuses and accepts files
        assert stats.get(f"{op.__name__}:refused", 0) + stats.get(f"{op.__name__}:clean", 0) > 0, op.__name__
    assert sum(v for k, v in stats.items() if k.endswith(":refused")) > n // 4
    assert sum(v for k, v in stats.items() if k.endswith(":clean")) > 0
    return summary


def test_fuzz_lora_reader_600_cases(tmp_path):
    _run(tmp_path, seed=1234, n=600, timeout=600)


@pytest.mark.slow
def test_fuzz_lora_reader_3000_cases(tmp_path):
    _run(tmp_path, seed=98765, n=3000, timeout=3000)


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])))
