"""Fuzz of the single-file checkpoint reader (models/single_file.py: load_checkpoint, checkpoint_shapes): mutated
safetensors and weights-only .ckpt/.pt files (zip and legacy, and pickles that would run code) give a state dict
or one LcmError line, never another exception, a hang, a crash or code run. The mutator runs in a subprocess
(fuzz_single_file.py) so that a signal or a runaway allocation shows as such."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from harness import cli_env

WORKER = Path(__file__).with_name("fuzz_single_file.py")


def fuzz(seed: int, cases: int) -> dict:
    r = subprocess.run([sys.executable, "-W", "ignore", str(WORKER), str(seed), str(cases)], capture_output=True,
                       text=True, env=cli_env(), timeout=600)
    assert r.returncode == 0, f"the reader crashed or the worker failed (rc {r.returncode}): {r.stderr[-3000:]}"
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["cases"] == cases and not res["bad"], res["bad"][:10]
    assert res["refused"] > cases // 2 and res["evil"] > 0, res  # most mutants are refused, some would run code
    return res


def test_fuzz_single_file_reader_ci():
    fuzz(0, 1000)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_fuzz_single_file_reader_more(seed):
    fuzz(seed, 5000)
