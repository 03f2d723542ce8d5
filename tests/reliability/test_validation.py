"""Every bad input of the table (validation_cases.CASES) is exit 2 with one error line that says what is wrong,
and nothing is written; every option of every command has at least one case; docs/input-validation.md lists
exactly these cases."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from validation_cases import CASES, ROOT_DOC, build_workspace, release_workspace, run_case, shown, verdict

from lcmtool import options

# options where no value is wrong: free text (a prompt, a run name) or flags that take no value
NO_BAD_VALUE = {("sample", "negative_prompt"), ("compare", "negative_prompt")}
COMMANDS = {"sample": options.SampleConfig, "compare": options.CompareConfig, "merge": options.MergeConfig,
            "inspect": options.InspectConfig, "convert": options.ConvertConfig, "distill": options.DistillConfig,
            "eval": options.EvalConfig, "bench": options.BenchConfig}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from lcmtool.demo import ASSETS

    if not (ASSETS / "demo-sd" / "model_index.json").is_file():
        pytest.skip("the demo assets are not built (make demo-models)")
    w = build_workspace(tmp_path_factory.mktemp("ws"))
    yield w
    release_workspace(w)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else [])
                                  for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, ws, tmp_path):
    if any(n not in ws for n in case.needs):
        pytest.skip(f"needs {case.needs} (a read-only tmpfs: root)")
    out = str(tmp_path / "out")
    code, last, errors = run_case(case, ws, out)
    problem = verdict(case, ws, out, code, errors)
    assert problem is None, f"{case.id}: {problem}: {shown(last, ws, out)}"


def _covered(command: str) -> set[str]:
    """Config keys of `command` that some case gives a bad value (as --flag, --set key or the positional)."""
    keys = set()
    for c in (c for c in CASES if c.command == command):
        for m in re.finditer(r"--set (\w+)|--([a-z][a-z0-9-]*)", c.option):
            keys.add(m.group(1) or m.group(2).replace("-", "_"))
        if c.option.isupper():  # FILE / SOURCE: the positional argument
            keys.add({"inspect": "file", "convert": "file", "eval": "source"}[command])
    return keys


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_of_every_command_has_a_bad_value(command):
    fields = {f.name for f in dataclasses.fields(COMMANDS[command])}
    missing = sorted(k for k in fields - _covered(command) if (command, k) not in NO_BAD_VALUE)
    assert not missing, f"{command}: no bad-input case for {missing}"


def test_the_doc_table_lists_exactly_the_cases():
    doc = Path(ROOT_DOC).read_text()
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:3]) for line in doc.splitlines()
            if line.startswith("| ") and not line.startswith("| command")}
    want = {(c.command, f"`{c.option}`" if c.option else "", f"`{c.value}`" if c.value else "") for c in CASES}
    assert rows == want, (f"docs/input-validation.md is stale (python tools/validation_table.py): missing "
                          f"{sorted(want - rows)[:5]}, extra {sorted(rows - want)[:5]}")


def test_prompts_from_a_pipe_and_dev_null(tmp_path):
    """`--prompts <(echo x)` reads the pipe; /dev/null is "no prompts", not "not found" (issue 18 item 9)."""
    import os
    import threading

    from lcmtool.engines.inputs import read_prompts
    from lcmtool.errors import LcmError

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t = threading.Thread(target=lambda: fifo.write_text("a red circle\na blue square\n"))
    t.start()
    jobs = read_prompts(None, str(fifo), "", 3, 1)
    t.join()
    assert [(j.prompt, j.seed) for j in jobs] == [("a red circle", 3), ("a blue square", 3)]
    with pytest.raises(LcmError, match="has no prompts"):
        read_prompts(None, "/dev/null", "", 0, 1)
