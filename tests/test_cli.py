"""Foundation: the Typer app, config precedence (defaults < file < flags < --set), errors, --json."""
import json
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from typer.testing import CliRunner

from lcmtool import __version__
from lcmtool.cli import app
from lcmtool.config import parse_set, resolve
from lcmtool.errors import LcmError

runner = CliRunner()


def test_help_lists_commands():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("sample", "merge", "distill", "eval", "compare", "inspect", "convert", "bench"):
        assert cmd in r.output


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"lcmtool {__version__}"


def test_help_does_not_import_torch():
    code = ("import sys; from lcmtool.cli import app; "
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@dataclass
class Inner:
    rank: int = 4
    alpha: float = 4.0


@dataclass
class Cfg:
    steps: int = 4
    guidance: float = 1.0
    name: str = "x"
    tags: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)


def test_precedence_file_flags_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 8\nguidance: 2.5\nname: from-file\ninner: {rank: 16}\n")
    cfg = resolve(Cfg, None, {}, None)
    assert (cfg.steps, cfg.guidance, cfg.name, cfg.inner.rank) == (4, 1.0, "x", 4)
    cfg = resolve(Cfg, str(f), {"steps": None, "guidance": 3.0}, None)   # None = flag not given
    assert (cfg.steps, cfg.guidance, cfg.name, cfg.inner.rank) == (8, 3.0, "from-file", 16)
    cfg = resolve(Cfg, str(f), {"guidance": 3.0}, ["guidance=5", "inner.alpha=0.5", "tags=a,b", "lr=5e-4"][:3])
    assert (cfg.guidance, cfg.inner.alpha, cfg.inner.rank, cfg.tags) == (5.0, 0.5, 16, ["a", "b"])


def test_float_written_without_dot():
    @dataclass
    class C:
        lr: float = 1.0

    assert resolve(C, None, {}, ["lr=5e-4"]).lr == pytest.approx(5e-4)


@pytest.mark.parametrize("content,needle", [
    ("stepz: 3\n", "stepz"),
    ("steps: three\n", "steps"),
    ("inner: {rank: 1.5}\n", "inner.rank"),
    ("steps: [1\n", "bad YAML"),
    ("- a\n- b\n", "mapping"),
])
def test_config_errors_name_the_key(tmp_path, content, needle):
    f = tmp_path / "c.yaml"
    f.write_text(content)
    with pytest.raises(LcmError, match=needle):
        resolve(Cfg, str(f), {}, None)


def test_parse_set_nested():
    assert parse_set(["a.b=3", "c=x", "d=true"]) == {"a": {"b": 3}, "c": "x", "d": True}


def test_cli_unknown_key_and_wrong_type_exit_2(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("no_such_option: 1\n")
    r = runner.invoke(app, ["sample", "--config", str(f), "--prompt", "a", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert "no_such_option" in r.output and len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, ["sample", "--prompt", "a", "--set", "steps=four", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "steps" in r.output
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.png"))


def test_json_lines_on_stdout(tmp_path):
    """`--json` prints one parseable JSON object per line and nothing else on stdout."""
    from lcmtool.demo import world

    out = tmp_path / "imgs"
    out.mkdir()
    import random

    from PIL import Image

    rng = random.Random(0)
    scenes = [world.sample_scene(rng, two_prob=0) for _ in range(4)]
    imgs = world.to_uint8(world.render(scenes)).numpy()
    with open(out / "samples.jsonl", "w") as f:
        for i, (sc, im) in enumerate(zip(scenes, imgs)):
            Image.fromarray(im).save(out / f"{i}.png")
            f.write(json.dumps({"path": f"{i}.png", "prompt": world.caption(sc)}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "lcmtool", "eval", str(out), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    objs = [json.loads(line) for line in lines]
    assert len(objs) == 1 and objs[0]["n"] == 4 and objs[0]["shape_acc"] == 1.0


def test_internal_error_exit_1_and_debug(monkeypatch):
    import lcmtool.cli as cli

    @cli.handled
    def boom(debug=False):
        raise RuntimeError("kaput")

    import typer

    with pytest.raises(typer.Exit) as e:
        boom()
    assert e.value.exit_code == 1
    with pytest.raises(RuntimeError):
        boom(debug=True)


def test_parse_set_value_then_subkey_is_one_error_line():
    """`--set a=1 --set a.b=2` used to crash with AttributeError (a traceback, exit 1) inside parse_set."""
    with pytest.raises(LcmError, match="'a' was already set"):
        parse_set(["a=1", "a.b=2"])
    r = runner.invoke(app, ["merge", "--set", "lambda1=1", "--set", "lambda1.x=2", "--out", "x.safetensors"])
    assert r.exit_code == 2, r.output
    assert "lambda1" in r.output and len(r.output.strip().splitlines()) == 1


def test_list_flag_item_that_is_not_yaml_stays_a_string():
    """An item of a comma list that is not valid YAML ('[') is a typed-config error, not a YAMLError traceback."""

    @dataclass
    class L:
        steps: list[int] = field(default_factory=list)

    with pytest.raises(LcmError, match=r"steps\[1\]"):
        resolve(L, None, {"steps": "1,["}, None)


def test_bounds_declared_once_with_opt():
    """opt(..., min=, max=, gt=, lt=) bound a number (each item of a list); floats must be finite unless the field
    says finite=False; lists hold at least min_items; the message names the key (and the flag of a CLI option)."""
    from lcmtool.config import opt

    @dataclass
    class B:
        steps: int = opt(4, "Steps.", min=1, max=1000)
        lr: float = opt(1e-4, gt=0, lt=1)
        w: float = opt(1.0, finite=False)
        ts: list[int] = opt([1], min=0, max=999, min_items=1)

    assert resolve(B, None, {}, ["w=.inf", "ts=5", "steps=1000", "lr=0.5"]) == B(1000, 0.5, float("inf"), [5])
    for sets, needle in [(["steps=0"], r"config key 'steps' \(--steps\): must be >= 1, got 0"),
                         (["steps=1001"], "must be <= 1000"), (["lr=0"], r"config key 'lr': must be > 0"),
                         (["lr=1"], "must be < 1"), (["lr=nan"], "must be a finite number, got nan"),
                         (["lr=-.inf"], "finite"), (["ts=[3, 1000]"], r"ts\[1\]': must be <= 999"),
                         (["ts=[]"], "at least 1 item")]:
        with pytest.raises(LcmError, match=needle):
            resolve(B, None, {}, sets)


def test_scalar_for_a_list_field_is_a_one_item_list():
    """`--set validation_steps=1` means [1] (issue 18 item 9)."""
    from lcmtool.options import DistillConfig

    assert resolve(DistillConfig, None, {}, ["validation_steps=1"]).validation_steps == [1]
    assert resolve(DistillConfig, None, {}, ["validation_steps=1,2"]).validation_steps == [1, 2]


def test_machine_errors_that_escape_a_writer_are_one_line_exit_2(tmp_path, capsys):
    """An OSError of the machine's (here: a file where the run folder should be) is exit 2 and one line naming
    the path, not an internal error."""
    import errno
    import os

    import typer

    import lcmtool.cli as cli

    @cli.handled
    def mkdir_under_a_file(debug=False):
        (tmp_path / "f").write_text("")
        os.makedirs(tmp_path / "f" / "run")

    @cli.handled
    def full(debug=False):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x"))

    for fn, needle in ((mkdir_under_a_file, "is a file where a folder is needed"), (full, "no space left")):
        with pytest.raises(typer.Exit) as e:
            fn()
        lines = capsys.readouterr().err.strip().splitlines()
        assert e.value.exit_code == 2 and len(lines) == 1 and needle in lines[0] and str(tmp_path) in lines[0], lines
