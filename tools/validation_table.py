"""Print the input-validation table (command, option, bad value, what lcmtool says) by running every case of
tests/reliability/validation_cases.py; `--write` puts it in docs/input-validation.md.

    python tools/validation_table.py [--write] [--only sample]

Each case runs in-process (Typer's CliRunner) against a scratch workspace of bad files; paths in the messages
are shown as the workspace's {names}. A case that is not refused (exit 2, one error line with the expected words,
nothing written) is marked FAILED in the table and makes the tool exit 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "reliability"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HEADER = """# Input validation: what lcmtool says to bad input

Every row is a test (`tests/reliability/test_validation.py`, cases in `tests/reliability/validation_cases.py`):
the command exits with code 2, prints this one line on stderr and writes nothing. Regenerate with
`python tools/validation_table.py --write`. Paths are shown as placeholders: `{out}` is the output the command was
given, `{file}` a regular file, `{dir}` a folder, `{ro}` a read-only filesystem, `{missing}` a path that does not
exist, `{corrupt}` a damaged .safetensors, `{nan_lora}`/`{int_lora}` LoRAs with NaN or int8 factors,
`{sd_lora}`/`{xl_lora}` the demo LCM-LoRAs, `{teacher}` the demo SD teacher.

Numbers are checked once, where the options are declared (`lcmtool/options.py`: `opt(..., min=, max=)`; floats
must be finite); files, folders and the machine (full disk, read-only filesystem) where they are read and written.

"""


def md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(only: str = "") -> tuple[str, int, int]:
    """-> (the markdown, cases run, cases that failed)."""
    import torch

    torch.set_num_threads(1)
    from validation_cases import CASES, build_workspace, release_workspace, run_case, shown, verdict

    rows, failed, n = [], 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        ws = build_workspace(Path(tmp) / "ws")
        try:
            for i, case in enumerate(c for c in CASES if c.command.startswith(only)):
                out = str(Path(tmp) / f"out{i}")
                if any(k not in ws for k in case.needs):
                    said, bad = f"(not run here: needs {', '.join(case.needs)})", None
                else:
                    code, last, errors = run_case(case, ws, out)
                    bad = verdict(case, ws, out, code, errors)
                    said = shown(errors[0] if errors else last, ws, out).removeprefix("error: ")
                    n += 1
                failed += bad is not None
                opt = f"`{md(case.option)}`" if case.option else ""
                val = f"`{md(case.value)}`" if case.value else ""
                flag = f" **FAILED: {bad}**" if bad else ""
                rows.append(f"| {case.command} | {opt} | {val} | {md(said)}{flag} |")
        finally:
            release_workspace(ws)
    head = "| command | option | bad value | what lcmtool says (exit 2) |\n|---|---|---|---|\n"
    return HEADER + head + "\n".join(rows) + "\n", n, failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="write docs/input-validation.md")
    ap.add_argument("--only", default="", help="only the cases of this command")
    args = ap.parse_args()
    t0 = time.time()
    text, n, failed = table(args.only)
    if args.write:
        (ROOT / "docs" / "input-validation.md").write_text(text)
    else:
        sys.stdout.write(text)
    print(f"{n} bad inputs run in {time.time() - t0:.0f} s, {failed} not refused as they must be", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
