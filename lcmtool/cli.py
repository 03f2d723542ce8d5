"""Typer app. Each command: parse options -> build a config -> call ONE engine function.

No math and no model code here; torch, diffusers and peft are imported inside command bodies so that
`lcmtool --help` answers fast. LcmError becomes one red line on stderr and exit code 2.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from typing import Annotated, Optional

import typer

from lcmtool import __version__
from lcmtool.errors import LcmError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LCM-LoRA toolkit: distill, merge and sample Stable Diffusion in 1-8 steps.")

ConfigOpt = Annotated[Optional[str], typer.Option("--config", help="YAML file with this command's options.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override any config key: dotted.key=value.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per result on stdout, nothing else.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks (also LCMTOOL_DEBUG=1).")]


def emit_json(obj: dict) -> None:
    """One JSON object per line on stdout (the only thing --json puts there)."""
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def err(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {msg}")


def handled(fn):
    """Turn LcmError into one line + exit 2, any other exception into exit 1 (traceback with --debug)."""

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
            err(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)")
            raise typer.Exit(1) from None

    return wrapper


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


def not_built(name: str):
    err(f"`lcmtool {name}` is not built yet")
    raise typer.Exit(1)


# ---- commands (each engine adds its own below; keep one block per command) ----

# >>> sample
ModelOpt = Annotated[Optional[str], typer.Option(help="demo:sd (default) | demo:xl | diffusers folder | "
                                                 ".safetensors/.ckpt single file | hub id.")]
PromptOpt = Annotated[Optional[str], typer.Option(help="The prompt.")]
PromptsOpt = Annotated[Optional[str], typer.Option(help="File: a prompt a line, or JSONL {prompt, seed, "
                                                   "negative_prompt}; - reads stdin.")]
NegOpt = Annotated[Optional[str], typer.Option(help="Negative prompt (has an effect only at guidance > 1).")]
LoraOpt = Annotated[Optional[list[str]], typer.Option(help="PATH[:WEIGHT], repeatable; 'none' = no LoRA (on demo "
                                                      "models the shipped LCM-LoRA is the lcm/tcd default).")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Seed of the first image; image k of a prompt gets seed+k.")]
NumOpt = Annotated[Optional[int], typer.Option(help="Images per prompt.")]
SizeH = Annotated[Optional[int], typer.Option(help="Height in pixels (default: the model's).")]
SizeW = Annotated[Optional[int], typer.Option(help="Width in pixels (default: the model's).")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N.")]
DtypeOpt = Annotated[Optional[str], typer.Option(help="auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16.")]
GammaOpt = Annotated[Optional[float], typer.Option(help="TCD stochasticity gamma (0.3).")]
ModelConfigOpt = Annotated[Optional[str], typer.Option("--model-config", help="Single-file checkpoints: a diffusers config folder to use instead of the shipped preset.")]
TokenizerOpt = Annotated[Optional[str], typer.Option("--tokenizer", help="Single-file checkpoints: a tokenizer folder (default: the shipped CLIP tokenizer).")]


@app.command()
@handled
def sample(
    prompt: PromptOpt = None, prompts: PromptsOpt = None, negative_prompt: NegOpt = None,
    model: ModelOpt = None, model_config: ModelConfigOpt = None, tokenizer: TokenizerOpt = None, lora: LoraOpt = None,
    fuse: Annotated[Optional[bool], typer.Option("--fuse/--no-fuse", help="Fuse LoRAs into the weights "
                                                 "(default) or keep peft adapters.")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="lcm (default) | dpmpp | ddim | euler | tcd.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps (4).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="CFG scale w (1.0 for lcm/tcd, 7.5 otherwise).")] = None,
    timesteps: Annotated[Optional[str], typer.Option(help="lcm/tcd: explicit timesteps, e.g. 999,759,499,259.")] = None,
    gamma: GammaOpt = None, seed: SeedOpt = None, num_images: NumOpt = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per pipeline call (4).")] = None,
    height: SizeH = None, width: SizeW = None,
    out: Annotated[Optional[str], typer.Option(help="Output folder (outputs/sample).")] = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None,
    config: ConfigOpt = None, set_: SetOpt = None, json_: JsonOpt = False, debug: DebugOpt = False,
):
    """LCM multi-step sampling in 1-8 steps (and DPM-Solver++/DDIM/Euler/TCD baselines)."""
    from lcmtool.config import resolve
    from lcmtool.engines.sample import SampleConfig
    from lcmtool.engines.sample import sample as run_sample

    flags = dict(prompt=prompt, prompts=prompts, negative_prompt=negative_prompt, model=model, lora=lora or None,
                 fuse=fuse, scheduler=scheduler, steps=steps, guidance=guidance, timesteps=timesteps, gamma=gamma,
                 seed=seed, num_images=num_images, batch_size=batch_size, height=height, width=width, out=out,
                 device=device, dtype=dtype, model_config=model_config, tokenizer=tokenizer)
    cfg = resolve(SampleConfig, config, flags, set_)
    records = run_sample(cfg, on_image=emit_json if json_ else None, progress=not json_)
    if not json_:
        from rich.console import Console

        ms = sum(r["ms_per_image"] for r in records) / max(1, len(records))  # batch_ms repeats per image
        Console(stderr=True, highlight=False).print(
            f"wrote {len(records)} image(s) to {cfg.out} ({ms:.0f} ms/image, model load "
            f"{records[0]['load_ms'] / 1000:.1f} s)" if records else "no images")


@app.command()
@handled
def compare(
    prompt: PromptOpt = None, prompts: PromptsOpt = None, negative_prompt: NegOpt = None,
    model: ModelOpt = None, model_config: ModelConfigOpt = None, tokenizer: TokenizerOpt = None, lora: LoraOpt = None,
    runs: Annotated[Optional[str], typer.Option(help="Columns scheduler:steps[:guidance], comma separated "
                                                "(lcm:1,lcm:2,lcm:4,lcm:8,dpmpp:4,dpmpp:8,dpmpp:25).")] = None,
    gamma: GammaOpt = None, seed: SeedOpt = None, num_images: NumOpt = None,
    height: SizeH = None, width: SizeW = None,
    out: Annotated[Optional[str], typer.Option(help="Grid PNG path (outputs/compare.png).")] = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None,
    config: ConfigOpt = None, set_: SetOpt = None, json_: JsonOpt = False, debug: DebugOpt = False,
):
    """One grid: schedulers x steps on the same prompts and seeds, each cell with its time per image (Fig. 3)."""
    from lcmtool.config import resolve
    from lcmtool.engines.sample import CompareConfig
    from lcmtool.engines.sample import compare as run_compare

    flags = dict(prompt=prompt, prompts=prompts, negative_prompt=negative_prompt, model=model, lora=lora or None,
                 runs=runs, gamma=gamma, seed=seed, num_images=num_images, height=height, width=width, out=out,
                 device=device, dtype=dtype, model_config=model_config, tokenizer=tokenizer)
    result = run_compare(resolve(CompareConfig, config, flags, set_))
    if json_:
        emit_json(result)
    else:
        from rich.console import Console

        Console(stderr=True, highlight=False).print(f"wrote {result['path']}: " + ", ".join(
            f"{r['scheduler']} {r['steps']}: {r['ms_per_image']:.0f} ms/img" for r in result["runs"]))
# <<< sample

# >>> merge
def _scalar(value):
    """A flag value parsed like a YAML scalar, so the typed config names a non-number in one line."""
    import yaml

    if value is None:
        return None
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _lora_report(rep: dict, as_json: bool) -> None:
    if as_json:
        emit_json(rep)
        return
    from rich.console import Console

    Console(highlight=False, soft_wrap=True).print_json(json.dumps(rep, default=str))


@app.command()
@handled
def merge(
    style: Annotated[Optional[str], typer.Option(help="Style LoRA tau' (safetensors).")] = None,
    lcm: Annotated[Optional[str], typer.Option(help="LCM-LoRA tau_LCM (default: the one shipped for --model).")] = None,
    lambda1: Annotated[Optional[str], typer.Option("--lambda1", help="Weight of the style vector (0.8).")] = None,
    lambda2: Annotated[Optional[str], typer.Option("--lambda2", help="Weight of the LCM vector (1.0).")] = None,
    add: Annotated[Optional[list[str]], typer.Option(help="More vectors: PATH:WEIGHT (repeatable, <0 allowed).")] = None,
    method: Annotated[Optional[str], typer.Option(help="concat (exact) | svd (needs --rank) | fuse (into --model).")
                      ] = None,
    rank: Annotated[Optional[int], typer.Option(help="Output rank for --method svd.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Base model (picks the default --lcm; fuse target).")] = None,
    format: Annotated[Optional[str], typer.Option(
        "--format", help="kohya | kohya-sgm | diffusers | peft; with fuse: diffusers (folder) | single-file.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto | fp32 | fp16 | bf16.")] = None,
    lambda1_blocks: Annotated[Optional[str], typer.Option(help="Per-block lambda1: down=1,mid=1,up=0.8.")] = None,
    lambda2_blocks: Annotated[Optional[str], typer.Option(help="Per-block lambda2: down=1,mid=1,up=0.8.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Output .safetensors (fuse: folder or .safetensors).")] = None,
    config: ConfigOpt = None, set_: SetOpt = None, json_: JsonOpt = False, debug: DebugOpt = False,
):
    """Task arithmetic over LoRAs: tau' = lambda1 * tau_style + lambda2 * tau_LCM (paper eq. 3); fuse bakes it in."""
    from lcmtool.config import resolve
    from lcmtool.engines.merge import MergeConfig, block_lambdas, run_merge

    flags = dict(style=style, lcm=lcm, lambda1=_scalar(lambda1), lambda2=_scalar(lambda2), add=add or None,
                 method=method, rank=rank, model=model, format=format, dtype=dtype, out=out,
                 lambda1_blocks=block_lambdas(lambda1_blocks, "--lambda1-blocks") if lambda1_blocks else None,
                 lambda2_blocks=block_lambdas(lambda2_blocks, "--lambda2-blocks") if lambda2_blocks else None)
    cfg = resolve(MergeConfig, config, flags, set_)
    _lora_report(run_merge(cfg), json_)


@app.command("inspect")
@handled
def inspect_lora(
    file: Annotated[str, typer.Argument(help="LoRA .safetensors to describe.")],
    family: Annotated[Optional[str], typer.Option(help="sd15 | sdxl | ssd1b (override the guess).")] = None,
    json_: JsonOpt = False, debug: DebugOpt = False,
):
    """Format, family guess, module count, ranks, alphas, dtype, per-block norms and metadata of a LoRA."""
    from lcmtool.config import resolve
    from lcmtool.engines.merge import InspectConfig, run_inspect

    _lora_report(run_inspect(resolve(InspectConfig, None, dict(file=file, family=family))), json_)


@app.command()
@handled
def convert(
    file: Annotated[str, typer.Argument(help="LoRA .safetensors to rewrite.")],
    format: Annotated[str, typer.Option("--format", help="kohya | kohya-sgm | diffusers | peft.")] = "kohya",
    out: Annotated[str, typer.Option(help="Output .safetensors.")] = "",
    dtype: Annotated[Optional[str], typer.Option(help="auto | fp32 | fp16 | bf16.")] = None,
    json_: JsonOpt = False, debug: DebugOpt = False,
):
    """Rewrite a LoRA between kohya (diffusers or SGM names), diffusers and peft keys; every delta kept."""
    from lcmtool.config import resolve
    from lcmtool.engines.merge import ConvertConfig, run_convert

    cfg = resolve(ConvertConfig, None, dict(file=file, format=format, out=out, dtype=dtype))
    _lora_report(run_convert(cfg), json_)
# <<< merge

# >>> distill
@app.command()
@handled
def distill(
    config: ConfigOpt = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Teacher: demo:sd, demo:xl, a diffusers folder or hub id.")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="demo:shapes, an image folder, or WebDataset tar glob.")] = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Output folder (default runs/<name>).")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Optimizer steps.")] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="latest, or a checkpoint folder.")] = None,
    format: Annotated[Optional[str], typer.Option("--format", help="LoRA file format: kohya, diffusers or peft.")] = None,
    set_: SetOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
):
    """LoRA latent consistency distillation (paper Algorithm 1): writes tau_LCM."""
    from lcmtool.config import resolve
    from lcmtool.engines.distill import DistillConfig
    from lcmtool.engines.distill import distill as run_distill

    cfg = resolve(DistillConfig, config, dict(model=model, data=data, out=out, max_steps=max_steps, resume=resume,
                                              format=format), set_)
    summary = run_distill(cfg)
    if "lora" not in summary:  # a data-parallel rank other than the main one
        return
    if json_out:
        emit_json(summary)
    elif summary.get("lora"):
        typer.echo(f"wrote {summary['lora']} ({summary['steps']} steps, final loss {summary['final_loss']:.4g})",
                   err=True)
# <<< distill

# >>> eval
@app.command("eval")
@handled
def eval_(
    source: Annotated[str, typer.Argument(help="Folder of PNGs (prompts from samples.jsonl or PNG metadata), "
                                               "or a .jsonl file of {\"path\", \"prompt\"} lines.")],
    classifier: Annotated[Optional[str], typer.Option("--classifier", help="Demo classifier weights "
                                                      "(default: the shipped one).")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = "cpu",
    refs: Annotated[int, typer.Option("--refs", help="Rendered references per image for FD-demo.")] = 4,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
):
    """Score demo images against their prompts: shape/colour/size/position/style accuracy and FD-demo."""
    from lcmtool.engines.evaluate import evaluate

    res = evaluate(source, classifier=classifier, device=device, refs_per_prompt=refs)
    if json_out:
        emit_json(res)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lcmtool eval: {res['n']} images from {res['source']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("classifier on held-out renders", justify="right")
    ref = res["classifier_heldout_acc"]
    for key, attr in [("shape_acc", "shape"), ("color_acc", "color"), ("size_acc", "size"),
                      ("position_acc", "position"), ("style_acc", "style")]:
        val = "n/a (no style prompts)" if res[key] is None else f"{res[key]:.3f}"
        table.add_row(key, val, f"{ref[attr]:.3f}" if attr in ref else "")
    fd = "n/a (needs 2+ images)" if res["fd"] is None else f"{res['fd']:.3f}"
    table.add_row("fd (FD-demo)", fd, f"{res['fd_refs']} rendered refs")
    Console().print(table)
# <<< eval

# >>> bench
@app.command()
@handled
def bench(
    merge: Annotated[bool, typer.Option("--merge", help="Merge two SDXL-size rank-64 LoRAs (concat, svd).")] = False,
    sample: Annotated[bool, typer.Option("--sample", help="Sampling: plain diffusers vs lcmtool, same run.")] = False,
    distill: Annotated[bool, typer.Option("--distill", help="LCD training step: plain loop vs lcmtool, same run.")] = False,
    model: Annotated[str, typer.Option(help="--sample: demo:sd | random:sd15 | random:sdxl | a model spec.")] = "demo:sd",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
):
    """Speed and memory against the plain-diffusers path, measured in the same run (ratios, not absolutes)."""
    if not (merge or sample or distill):
        raise LcmError("say what to measure: --merge, --sample and/or --distill")
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if json_out else print
    results = []
    if merge:
        from lcmtool.bench.merge import bench_merge

        results.append({"bench": "merge", **bench_merge(echo=log)})
    if sample:
        from lcmtool.bench.sample import bench_sample

        results.append({"bench": "sample", **bench_sample(model=model, device=device, log=log)})
    if distill:
        from lcmtool.bench.distill import bench_distill

        dev = None if device == "auto" else device
        results.extend({"bench": "distill", **row} for row in bench_distill(device=dev, log=log))
    if json_out:
        for r in results:
            emit_json(r)
# <<< bench


def main():
    app()


if __name__ == "__main__":
    main()
