"""Typer app. Each command: options -> one config -> ONE engine call.

An option is declared once, as a field of the command's config dataclass (`config.opt(default, help)`);
`command()` derives the Typer options from those fields, adds --config/--set/--json/--debug, resolves the
config (defaults < YAML < flags < --set) and hands it to the command body. No math and no model code here;
engines are imported inside command bodies so that `lcmtool --help` answers fast. LcmError becomes one red
line on stderr and exit code 2.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import sys
import types
import typing
from typing import Annotated, Any, Optional

import typer

from lcmtool import __version__, options, startup
from lcmtool.config import parse_scalar
from lcmtool.errors import LcmError, to_stderr

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LCM-LoRA toolkit: distill, merge and sample Stable Diffusion in 1-8 steps.")


def emit_json(obj: dict) -> None:
    """One JSON object per line on stdout (the only thing --json puts there)."""
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def err(msg: str) -> None:
    to_stderr(msg, "[bold red]error:[/]")


def say(msg: str) -> None:
    """A human-readable result line on stderr (stdout stays for --json)."""
    to_stderr(msg)


def handled(fn):
    """Turn LcmError, and an OSError of the machine's (no space, read-only, no permission, a file where a folder
    is needed: oserrors.machine_error), into one line + exit 2; any other exception into exit 1 (traceback with
    --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug") or os.environ.get("LCMTOOL_DEBUG") == "1"
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except LcmError as e:
            if debug:
                raise
            err(str(e))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err("interrupted")
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 - the one place internal errors are reported
            if debug:
                raise
            from lcmtool.oserrors import machine_error

            line = machine_error(e)  # the machine at fault (no space, read-only, a file in the way)
            if line is not None:
                err(line)
                raise typer.Exit(2) from None
            err(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)")
            raise typer.Exit(1) from None

    return wrapper


# ---- options derived from the config dataclasses ----

def _bare(tp: Any) -> Any:
    """Optional[X] -> X."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _is_text(tp: Any) -> bool:
    """Fields whose flag value is taken verbatim (strings, string choices); others are parsed as YAML scalars so
    that the typed config names a bad value in one line ('--steps four' -> "config key 'steps': ...")."""
    if tp is str:
        return True
    if typing.get_origin(tp) is typing.Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    return typing.get_origin(tp) in (list, tuple)  # "999,759,499": the config splits it


def _metavar(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "|".join(map(str, typing.get_args(tp)))
    if typing.get_origin(tp) in (list, tuple):
        return f"{_metavar(typing.get_args(tp)[0])},..."
    return {int: "INT", float: "NUMBER", dict: "KEY=VALUE,..."}.get(tp, "TEXT")


def _option(f: dataclasses.Field, tp: Any) -> tuple[Any, Any, Any]:
    """(annotation, default, parser) of the Typer parameter for config field `f`."""
    help_ = f.metadata["help"]
    if f.metadata.get("argument"):
        return Annotated[str, typer.Argument(help=help_, show_default=False)], inspect.Parameter.empty, None
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if default not in (None, "", [], {}, False) and "default" not in help_:
        help_ += f" (default: {','.join(map(str, default)) if isinstance(default, list) else default})"
    flag = "--" + (f.metadata.get("flag") or f.name.replace("_", "-"))
    if tp is bool:
        return Annotated[Optional[bool], typer.Option(f"{flag}/--no-{flag[2:]}", help=help_)], None, None
    if typing.get_origin(tp) in (list, tuple) and typing.get_args(tp) == (str,):  # repeatable
        return (Annotated[Optional[list[str]], typer.Option(flag, help=help_, metavar="TEXT")], None,
                lambda v: v or None)
    return (Annotated[Optional[str], typer.Option(flag, help=help_, metavar=_metavar(tp))], None,
            None if _is_text(tp) else parse_scalar)


def command(cfg_cls: type, name: str | None = None):
    """Register the decorated `body(cfg, json_: bool)` as command `name`, its options derived from `cfg_cls`."""

    def deco(body):
        hints = typing.get_type_hints(cfg_cls)
        params, parsers = [], {}
        for f in dataclasses.fields(cfg_cls):
            if not f.metadata.get("help"):
                continue
            annotation, default, parser = _option(f, _bare(hints[f.name]))
            parsers[f.name] = parser
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=annotation))
        params += [
            inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
                Optional[str], typer.Option("--config", metavar="FILE.yaml", help="YAML file with this command's options.")]),
            inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
                Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="Override any config key: dotted.key=value.")]),
            inspect.Parameter("json_", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
                bool, typer.Option("--json", help="One JSON object per result on stdout, nothing else.")]),
            inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
                bool, typer.Option("--debug", help="Show full tracebacks (also LCMTOOL_DEBUG=1).")]),
        ]

        @functools.wraps(body)
        def run(**kw):
            from lcmtool.config import resolve

            config, sets, json_ = kw.pop("config"), kw.pop("set_"), kw.pop("json_")
            kw.pop("debug")
            flags = {k: (parsers[k](v) if parsers[k] and v is not None else v) for k, v in kw.items()}
            cfg = resolve(cfg_cls, config, flags, sets)
            startup.pause()  # the body's heavy imports with the collector paused, until its model load
            try:
                return body(cfg, json_)
            finally:
                startup.settle()

        run.__signature__ = inspect.Signature(params)
        run.__annotations__ = {}
        app.command(name or body.__name__)(handled(run))
        return body

    return deco


def _version(value: bool):
    if value:
        typer.echo(f"lcmtool {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
):
    """LCM-LoRA toolkit (Luo et al., arXiv 2311.05556)."""


# ---- commands: one engine call each ----

@command(options.SampleConfig)
def sample(cfg, json_: bool):
    """LCM multi-step sampling in 1-8 steps (and DPM-Solver++/DDIM/Euler/TCD baselines)."""
    from lcmtool.engines.sample import sample as run_sample

    records = run_sample(cfg, on_image=emit_json if json_ else None, progress=not json_)
    if not json_:
        ms = sum(r["ms_per_image"] for r in records) / max(1, len(records))  # batch_ms repeats per image
        say(f"wrote {len(records)} image(s) to {cfg.out} ({ms:.0f} ms/image, model load "
            f"{records[0]['load_ms'] / 1000:.1f} s)" if records else "no images")


@command(options.CompareConfig)
def compare(cfg, json_: bool):
    """One grid: schedulers x steps on the same prompts and seeds, each cell with its time per image (Fig. 3)."""
    from lcmtool.engines.compare import compare as run_compare

    result = run_compare(cfg)
    if json_:
        emit_json(result)
    else:
        say(f"wrote {result['path']}: " + ", ".join(
            f"{r['scheduler']} {r['steps']}: {r['ms_per_image']:.0f} ms/img" for r in result["runs"]))


def _lora_report(rep: dict, as_json: bool) -> None:
    if as_json:
        emit_json(rep)
        return
    from rich.console import Console

    Console(highlight=False, soft_wrap=True).print_json(json.dumps(rep, default=str))


@command(options.MergeConfig)
def merge(cfg, json_: bool):
    """Task arithmetic over LoRAs: tau' = lambda1 * tau_style + lambda2 * tau_LCM (paper eq. 3); fuse bakes it in."""
    from lcmtool.engines.merge import run_merge

    _lora_report(run_merge(cfg), json_)


@command(options.InspectConfig, name="inspect")
def inspect_lora(cfg, json_: bool):
    """Format, family guess, module count, ranks, alphas, dtype, per-block norms and metadata of a LoRA."""
    from lcmtool.engines.merge import run_inspect

    _lora_report(run_inspect(cfg), json_)


@command(options.ConvertConfig)
def convert(cfg, json_: bool):
    """Rewrite a LoRA between kohya (diffusers or SGM names), diffusers and peft keys; every delta kept."""
    from lcmtool.engines.merge import run_convert

    _lora_report(run_convert(cfg), json_)


@command(options.DistillConfig)
def distill(cfg, json_: bool):
    """LoRA latent consistency distillation (paper Algorithm 1): writes tau_LCM."""
    from lcmtool.engines.distill import distill as run_distill

    summary = run_distill(cfg)
    if "lora" not in summary:  # a data-parallel rank other than the main one
        return
    if json_:
        emit_json(summary)
    elif summary.get("lora"):
        say(f"wrote {summary['lora']} ({summary['steps']} steps, final loss {summary['final_loss']:.4g})")


@command(options.FinetuneConfig)
def finetune(cfg, json_: bool):
    """Fine-tune by the denoising loss: a style LoRA (tau', paper eq. 2-3) or, with --full, a fine-tuned variant."""
    from lcmtool.engines.finetune import finetune as run_finetune

    summary = run_finetune(cfg)
    if json_:
        emit_json(summary)
    else:
        say(f"wrote {summary.get('lora') or summary.get('pipeline')} ({summary['steps']} steps, loss "
            f"{summary['first_loss']:.4g} -> {summary['final_loss']:.4g})")


@command(options.PaperConfig)
def paper(cfg, json_: bool):
    """The paper in miniature: Tables 1-3, the lambda sweep and figures on the demo world -> docs/results/."""
    from lcmtool.engines.paper import run_paper

    res = run_paper(cfg)
    if json_:
        emit_json(res)
    else:
        say(f"wrote {cfg.out}/results.json in {res['wall_s']:.0f} s: claims " +
            ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in res["claims"].items() if isinstance(v, bool)))


@command(options.EvalConfig, name="eval")
def eval_(cfg, json_: bool):
    """Score demo images against their prompts: shape/colour/size/position/style accuracy and FD-demo."""
    from lcmtool.engines.evaluate import evaluate

    res = evaluate(cfg.source, classifier=cfg.classifier, device=cfg.device, refs_per_prompt=cfg.refs)
    if json_:
        emit_json(res)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lcmtool eval: {res['n']} images from {res['source']}")
    for col, justify in (("metric", "left"), ("value", "right"), ("classifier on held-out renders", "right")):
        table.add_column(col, justify=justify)
    ref = res["classifier_heldout_acc"]
    for attr in ("shape", "color", "size", "position", "style"):
        key = f"{attr}_acc"
        val = "n/a (no style prompts)" if res[key] is None else f"{res[key]:.3f}"
        table.add_row(key, val, f"{ref[attr]:.3f}" if attr in ref else "")
    fd = "n/a (needs 2+ images)" if res["fd"] is None else f"{res['fd']:.3f}"
    table.add_row("fd (FD-demo)", fd, f"{res['fd_refs']} rendered refs")
    Console().print(table)


@command(options.BenchConfig)
def bench(cfg, json_: bool):
    """Speed and memory against the plain-diffusers path, measured in the same run (ratios, not absolutes)."""
    from lcmtool.bench import run_bench

    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if json_ else print
    for row in run_bench(cfg, log=log):
        if json_:
            emit_json(row)


def main():
    startup.enable()  # the console command: heavy imports with the collector paused (lcmtool.startup)
    app()


if __name__ == "__main__":
    main()
