"""The input-validation table as data: (command, option, bad value, args, the fragment the one error line must
hold). `test_validation.py` runs every case (exit 2, one line, nothing written); `tools/validation_table.py`
runs them and prints the markdown table of docs/input-validation.md.

Arguments name workspace files as `{name}` (see `build_workspace`); `{out}` is a fresh output path per case,
which must not exist (or hold nothing) after the refusal.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "lcmtool" / "demo" / "assets"
ROOT_DOC = ROOT / "docs" / "input-validation.md"
DEMO_SD = ASSETS / "lcm-lora-demo-sd.safetensors"


@dataclass
class Case:
    command: str
    option: str
    value: str            # the bad value as the table shows it
    args: list[str]       # the command line after the command name
    expect: str           # a fragment of the one error line (case-insensitive)
    needs: tuple = ()     # workspace features the case needs ("ro": a read-only folder)
    out: str = "{out}"    # what must not be written
    slow: bool = False    # loads a model before it refuses (run in CI anyway unless marked)
    env: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.command}:{self.option}={self.value}"


P = "a large red circle on the left"
FILE_BYTES = b"a regular file\n"
S = ["--prompt", P, "--out", "{out}"]             # a sample that would work
C = ["--prompt", P, "--out", "{out}.png", "--runs", "lcm:1"]
M = ["--style", "{style}", "--lcm", "{sd_lora}", "--out", "{out}.safetensors"]
D = ["--out", "{out}", "--set", "device=cpu", "--set", "num_samples=4", "--set", "batch_size=2",
     "--set", "max_steps=1", "--set", "lora_rank=2", "--set", "lora_alpha=2", "--set", "cache_dir={cache}",
     "--set", "validation_steps=1", "--set", "validation_prompts=[a red circle]"]


def _sample() -> list[Case]:
    c = []
    for opt, val, msg in [
        ("--steps", "0", "config key 'steps' (--steps): must be >= 1"),
        ("--steps", "-3", "must be >= 1"), ("--steps", "100000", "must be <= 1000"),
        ("--steps", "four", "expected an integer"), ("--steps", "2.5", "expected an integer"),
        ("--guidance", "nan", "must be a finite number"), ("--guidance", "inf", "must be a finite number"),
        ("--guidance", "-1", "must be >= 0"), ("--guidance", "1e9", "must be <= 1000"),
        ("--gamma", "nan", "must be a finite number"), ("--gamma", "5", "must be <= 1"),
        ("--gamma", "-0.1", "must be >= 0"),
        ("--height", "0", "must be >= 1"), ("--width", "-64", "must be >= 1"),
        ("--height", "1000000", "must be <= 16384"), ("--width", "abc", "expected an integer"),
        ("--num-images", "0", "must be >= 1"), ("--num-images", "10000000000", "must be <= 100000"),
        ("--batch-size", "0", "must be >= 1"), ("--seed", "-99999999999999999999", "must be >= -9223372036854775808"),
        ("--seed", "1.5", "expected an integer"),
        ("--timesteps", "999,1200", "must be <= 999"), ("--timesteps", "259,999", "strictly decreasing"),
        ("--timesteps", "a,b", "expected an integer"),
        ("--scheduler", "plms", "not one of"), ("--dtype", "fp8", "dtype"), ("--device", "tpu", "device"),
        ("--model", "{missing}", "not found"), ("--model", "{corrupt}", "corrupt.safetensors"),
        ("--model", "no-such-family:x", "no-such-family"),
        ("--model-config", "{missing}", "not found"), ("--tokenizer", "{missing}", "not found"),
        ("--lora", "{missing}", "not found"), ("--lora", "{dir}", "not found"),
        ("--lora", "{corrupt}", "not a readable safetensors"), ("--lora", "{sd_lora}:nan", "weight must be a finite"),
        ("--negative-prompt", "x", "negative"),
    ]:
        args = [opt, val] + S
        if opt == "--negative-prompt":
            continue  # a negative prompt at guidance <= 1 is a warning, not an error
        if opt in ("--model-config", "--tokenizer"):
            args = ["--model", "{missing_ckpt}", opt, val] + S
        c.append(Case("sample", opt, val, args, msg, slow=opt in ("--lora",)))
    c += [
        Case("sample", "--lora", "(a LoRA of another family)", ["--lora", "{xl_lora}"] + S, "does not fit"),
        Case("sample", "--lora", "(non-finite factors)", ["--lora", "{nan_lora}"] + S, "inf/NaN", slow=True),
        Case("sample", "--height", "60 (not a multiple of 8)", ["--height", "60"] + S, "multiple of 8"),
        Case("sample", "--width", "100 (not a multiple of 8)", ["--width", "100"] + S, "multiple of 8", slow=True),
        Case("sample", "--prompt", '""', ["--prompt", "  ", "--out", "{out}"], "empty"),
        Case("sample", "--prompt/--prompts", "(neither)", ["--out", "{out}"], "no prompt"),
        Case("sample", "--prompts", "(an empty file)", ["--prompts", "{empty}", "--out", "{out}"], "no prompts"),
        Case("sample", "--prompts", "(blank lines only)", ["--prompts", "{blank}", "--out", "{out}"], "no prompts"),
        Case("sample", "--prompts", "(binary)", ["--prompts", "{binary}", "--out", "{out}"], "not UTF-8"),
        Case("sample", "--prompts", "(a folder)", ["--prompts", "{dir}", "--out", "{out}"], "is a folder"),
        Case("sample", "--prompts", "(missing)", ["--prompts", "{missing}", "--out", "{out}"], "not found"),
        Case("sample", "--prompts", "/dev/null", ["--prompts", "/dev/null", "--out", "{out}"], "no prompts"),
        Case("sample", "--prompts", "(bad JSON line)", ["--prompts", "{badjsonl}", "--out", "{out}"], "bad JSON"),
        Case("sample", "--prompts", "(JSON seed not an integer)", ["--prompts", "{badseed}", "--out", "{out}"],
             "seed"),
        Case("sample", "--prompt + --prompts", "(both)", ["--prompt", P, "--prompts", "{blank}", "--out", "{out}"],
             "not both"),
        Case("sample", "--out", "(an existing file)", ["--prompt", P, "--out", "{file}"], "is a file",
             out="{file}"),
        Case("sample", "--out", "(under a file)", ["--prompt", P, "--out", "{file}/sub"], "is a file",
             out="{file}"),
        Case("sample", "--out", "(read-only folder)", ["--prompt", P, "--out", "{ro}/out"], "read-only",
             needs=("ro",), out="{ro}/out"),
        Case("sample", "--config", "(unknown key)", ["--config", "{yaml_unknown}"] + S, "unknown config key"),
        Case("sample", "--config", "(wrong type)", ["--config", "{yaml_type}"] + S, "config key 'steps'"),
        Case("sample", "--config", "(not YAML)", ["--config", "{yaml_bad}"] + S, "bad YAML"),
        Case("sample", "--config", "(a list, not a mapping)", ["--config", "{yaml_list}"] + S, "mapping"),
        Case("sample", "--config", "(missing)", ["--config", "{missing}"] + S, "not found"),
        Case("sample", "--config", "(a folder)", ["--config", "{dir}"] + S, "is a folder"),
        Case("sample", "--config", "(binary)", ["--config", "{binary}"] + S, "not UTF-8"),
        Case("sample", "--set", "steps (no =)", ["--set", "steps"] + S, "key=value"),
        Case("sample", "--set timestep_spacing", "middle", ["--set", "timestep_spacing=middle"] + S, "not one of"),
        Case("sample", "--fuse", "maybe (--set fuse=maybe)", ["--set", "fuse=maybe"] + S, "expected true or false"),
        Case("sample", "--compile", "2 (--set compile=2)", ["--set", "compile=2"] + S, "expected true or false"),
        Case("sample", "--no-fuse", "(with a LoRA of another family)", ["--no-fuse", "--lora", "{xl_lora}"] + S,
             "does not fit", slow=True),
    ]
    return c


def _compare() -> list[Case]:
    return [
        Case("compare", "--runs", "dpmpp:2:nan", ["--prompt", P, "--out", "{out}.png", "--runs", "dpmpp:2:nan"],
             "guidance", out="{out}.png"),
        Case("compare", "--runs", "lcm:0", ["--prompt", P, "--out", "{out}.png", "--runs", "lcm:0"], "steps",
             out="{out}.png"),
        Case("compare", "--runs", "plms:4", ["--prompt", P, "--out", "{out}.png", "--runs", "plms:4"], "bad run",
             out="{out}.png"),
        Case("compare", "--runs", "lcm:four", ["--prompt", P, "--out", "{out}.png", "--runs", "lcm:four"],
             "bad run", out="{out}.png"),
        Case("compare", "--runs", "lcm:4:inf", ["--prompt", P, "--out", "{out}.png", "--runs", "lcm:4:inf"],
             "guidance", out="{out}.png"),
        Case("compare", "--runs", '""', ["--prompt", P, "--out", "{out}.png", "--runs", ","], "at least one run",
             out="{out}.png"),
        Case("compare", "--out", "x.jpg", ["--prompt", P, "--out", "{out}.jpg", "--runs", "lcm:1"], "PNG",
             out="{out}.jpg"),
        Case("compare", "--out", "(a folder named .png)", ["--prompt", P, "--out", "{dirpng}", "--runs", "lcm:1"],
             "folder", out="{dirpng}/x", slow=True),
        Case("compare", "--out", "(read-only folder)", ["--prompt", P, "--out", "{ro}/g.png", "--runs", "lcm:1"],
             "read-only", needs=("ro",), out="{ro}/g.png", slow=True),
        Case("compare", "--height", "0", ["--height", "0"] + C, "must be >= 1", out="{out}.png"),
        Case("compare", "--width", "12 (not a multiple of 8)", ["--width", "12"] + C, "multiple of 8",
             out="{out}.png"),
        Case("compare", "--seed", "2**64", ["--seed", str(2 ** 64)] + C, "must be <=", out="{out}.png"),
        Case("compare", "--device", "cuda:x", ["--device", "cuda:x"] + C, "device", out="{out}.png"),
        Case("compare", "--dtype", "int8", ["--dtype", "int8"] + C, "dtype", out="{out}.png"),
        Case("compare", "--model", "(missing)", ["--model", "{missing}"] + C, "not found", out="{out}.png"),
        Case("compare", "--model-config", "(missing)", ["--model", "{missing_ckpt}", "--model-config", "{missing}"]
             + C, "not found", out="{out}.png"),
        Case("compare", "--tokenizer", "(missing)", ["--model", "{missing_ckpt}", "--tokenizer", "{missing}"] + C,
             "not found", out="{out}.png"),
        Case("compare", "--prompt", '""', ["--prompt", " ", "--out", "{out}.png"], "empty", out="{out}.png"),
        Case("compare", "--set timestep_spacing", "sideways", ["--set", "timestep_spacing=sideways"] + C,
             "not one of", out="{out}.png"),
        Case("compare", "--gamma", "nan", ["--gamma", "nan"] + C, "finite", out="{out}.png"),
        Case("compare", "--num-images", "-1", ["--num-images", "-1"] + C, "must be >= 1", out="{out}.png"),
        Case("compare", "--prompts", "(an empty file)", ["--prompts", "{empty}", "--out", "{out}.png"],
             "no prompts", out="{out}.png"),
        Case("compare", "--lora", "(a LoRA of another family)", ["--lora", "{xl_lora}"] + C, "does not fit",
             out="{out}.png", slow=True),
    ]


def _merge() -> list[Case]:
    o = "{out}.safetensors"
    c = [Case("merge", opt, val, args, msg, out=o) for opt, val, args, msg in [
        ("--lambda1", "nan", ["--lambda1", "nan"] + M, "config key 'lambda1' (--lambda1): must be a finite"),
        ("--lambda2", "inf", ["--lambda2", "inf"] + M, "must be a finite number"),
        ("--lambda1", "abc", ["--lambda1", "abc"] + M, "expected a number"),
        ("--lambda2", "1e9", ["--lambda2", "1e9"] + M, "must be <= 1000"),
        ("--lambda1-blocks", "up=nan", ["--lambda1-blocks", "up=nan"] + M, "finite"),
        ("--lambda2-blocks", "down", ["--lambda2-blocks", "down"] + M, "pairs"),
        ("--add", "PATH:nan", ["--add", "{style}:nan", "--out", o], "finite"),
        ("--add", "PATH:inf", ["--add", "{style}:inf", "--out", o], "finite"),
        ("--add", "PATH:x", ["--add", "{style}:x", "--out", o], "must be a number"),
        ("--add", "PATH (no weight)", ["--add", "{style}", "--out", o], "PATH:WEIGHT"),
        ("--add", "(missing file)", ["--add", "{missing}:1", "--out", o], "not found"),
        ("--add", "(a folder)", ["--add", "{dir}:1", "--out", o], "not found"),
        ("--style", "(missing)", ["--style", "{missing}", "--lcm", "{sd_lora}", "--out", o], "not found"),
        ("--style", "(corrupt)", ["--style", "{corrupt}", "--lcm", "{sd_lora}", "--out", o],
         "not a readable safetensors"),
        ("--style", "(non-finite factors)", ["--style", "{nan_lora}", "--lcm", "{sd_lora}", "--out", o],
         "inf/NaN"),
        ("--style", "(integer factors)", ["--style", "{int_lora}", "--lcm", "{sd_lora}", "--out", o],
         "floating"),
        ("--lcm", "(another family)", ["--style", "{style}", "--lcm", "{xl_lora}", "--out", o],
         "{xl_lora}"),
        ("--method", "mean", ["--method", "mean"] + M, "not one of"),
        ("--method svd", "(no --rank)", ["--method", "svd"] + M, "--rank"),
        ("--rank", "0", ["--method", "svd", "--rank", "0"] + M, "must be >= 1"),
        ("--rank", "-4", ["--method", "svd", "--rank", "-4"] + M, "must be >= 1"),
        ("--format", "safetensors", ["--format", "safetensors"] + M, "not one of"),
        ("--format", "single-file (without fuse)", ["--format", "single-file"] + M, "not a LoRA format"),
        ("--dtype", "fp64", ["--dtype", "fp64"] + M, "not one of"),
        ("--model", "(missing, with --method fuse)", ["--method", "fuse", "--model", "{missing}"] + M,
         "not found"),
        ("--out", "(missing)", ["--style", "{style}", "--lcm", "{sd_lora}"], "--out is required"),
        ("--out", "(one of the inputs)", ["--style", "{style}", "--lcm", "{sd_lora_copy}", "--out",
                                          "{sd_lora_copy}"], "one of the inputs"),
        ("(nothing to merge)", "", ["--out", o], "nothing to merge"),
    ]]
    c += [
        Case("merge", "--out", "(a folder)", ["--style", "{style}", "--lcm", "{sd_lora}", "--out", "{dir}"],
             "folder", out="{dir}/x"),
        Case("merge", "--out", "(under a file)", ["--style", "{style}", "--lcm", "{sd_lora}", "--out",
                                                  "{file}/m.safetensors"], "is a file", out="{file}"),
        Case("merge", "--out", "(read-only folder)", ["--style", "{style}", "--lcm", "{sd_lora}", "--out",
                                                      "{ro}/m.safetensors"], "read-only", needs=("ro",),
             out="{ro}/m.safetensors"),
        Case("merge", "--out", "(an existing file, --method fuse)",
             ["--method", "fuse", "--style", "{style}", "--lcm", "{sd_lora}", "--out", "{file}"],
             "not a diffusers pipeline folder", out="{file}"),
        Case("merge", "--config", "(unknown key)", ["--config", "{yaml_unknown}"] + M, "unknown config key", out=o),
        Case("merge", "--drop-unknown", "maybe (--set)", ["--set", "drop_unknown=maybe"] + M, "true or false", out=o),
    ]
    return c


def _inspect_convert() -> list[Case]:
    o = "{out}.safetensors"
    return [
        Case("inspect", "FILE", "(missing)", ["{missing}"], "not found", out=""),
        Case("inspect", "FILE", "(a folder)", ["{dir}"], "not found", out=""),
        Case("inspect", "FILE", "(corrupt)", ["{corrupt}"], "not a readable safetensors", out=""),
        Case("inspect", "FILE", "(empty file)", ["{empty}"], "not a readable safetensors", out=""),
        Case("inspect", "FILE", "(a pickle .ckpt)", ["{pickle}"], "safetensors", out=""),
        Case("inspect", "--family", "sd3", ["{sd_lora}", "--family", "sd3"], "not one of", out=""),
        Case("convert", "FILE", "(missing)", ["{missing}", "--out", o], "not found", out=o),
        Case("convert", "FILE", "(corrupt)", ["{corrupt}", "--out", o], "not a readable safetensors", out=o),
        Case("convert", "FILE", "(integer factors)", ["{int_lora}", "--out", o], "floating", out=o),
        Case("convert", "--format", "ckpt", ["{sd_lora}", "--format", "ckpt", "--out", o], "not one of", out=o),
        Case("convert", "--format", "kohya-sgm (SD-1.5 LoRA)", ["{sd_lora}", "--format", "kohya-sgm", "--out", o],
             "SDXL", out=o),
        Case("convert", "--dtype", "int8", ["{sd_lora}", "--dtype", "int8", "--out", o], "not one of", out=o),
        Case("convert", "--out", "(missing)", ["{sd_lora}"], "--out", out=""),
        Case("convert", "--out", "(same as FILE)", ["{sd_lora_copy}", "--out", "{sd_lora_copy}"], "differ",
             out=""),
        Case("convert", "--out", "(a folder)", ["{sd_lora}", "--out", "{dir}"], "folder", out="{dir}/x"),
        Case("convert", "--out", "(read-only folder)", ["{sd_lora}", "--out", "{ro}/c.safetensors"], "read-only",
             needs=("ro",), out="{ro}/c.safetensors"),
    ]


def _distill() -> list[Case]:
    c = []
    for key, val, msg in [
        ("lr", "nan", "config key 'lr': must be a finite number"), ("lr", "-1", "must be > 0"),
        ("lr", "0", "must be > 0"), ("max_grad_norm", "nan", "finite"), ("max_grad_norm", "-1", "must be >= 0"),
        ("checkpoint_every", "-1", "must be >= 0"), ("num_ddim_timesteps", "0", "must be >= 1"),
        ("num_ddim_timesteps", "7", "divide"),
        ("max_steps", "0", "must be >= 1"), ("batch_size", "0", "must be >= 1"), ("grad_accum", "0", ">= 1"),
        ("lora_rank", "-1", "must be >= 0"), ("lora_alpha", "inf", "finite"), ("lora_alpha", "0", "must be > 0"),
        ("conv_rank", "-1", "must be >= 0"), ("w_min", "nan", "finite"), ("w_max", "-inf", "finite"),
        ("w_min", "20", "w_min <= w_max"), ("huber_c", "0", "must be > 0"), ("timestep_scaling", "nan", "finite"),
        ("ema_decay", "1", "must be < 1"), ("ema_decay", "-0.5", ">= 0"), ("adam_beta1", "1.5", "must be < 1"),
        ("adam_beta2", "nan", "finite"), ("adam_eps", "0", "must be > 0"), ("weight_decay", "-1", ">= 0"),
        ("warmup_steps", "-1", ">= 0"), ("keep_checkpoints", "-2", ">= 0"), ("validate_every", "-1", ">= 0"),
        ("validation_steps", "0", "config key 'validation_steps[0]'"), ("validation_steps", "[1, -2]", "[1]"),
        ("log_every", "0", ">= 1"), ("num_samples", "0", ">= 1"), ("resolution", "-8", ">= 0"),
        ("resolution", "60", "60px"), ("seed", "x", "expected an integer"),
        ("loss", "l1", "not one of"), ("mixed_precision", "fp8", "not one of"), ("format", "ckpt", "not one of"),
        ("save_dtype", "int8", "not one of"), ("uncond", "random", "not one of"), ("report_to", "wandb", "not one of"),
        ("family", "sd3", "not one of"), ("target_modules", "[nothing_matches]", "target_modules"),
        ("lr_typo", "1", "unknown config key 'lr_typo'"), ("validation_prompts", "[]", "at least 1 item"),
        ("device", "cuda:9", "cuda"), ("center_crop", "maybe", "expected true or false"),
        ("gradient_checkpointing", "2", "expected true or false"), ("validation_seed", "1e99", "integer"),
        ("cache_dir", "{file}", "is a file"), ("conv_alpha", "-1", ">= 0"), ("name", "[a, b]", "expected a string"),
        ("extract_rank", "-1", ">= 0"),
        ("extract_rank", "4", "extract_rank, extract_conv_rank, extract_fro, extract_budget_mb and extract_calibrate "
                              "are for full LCD"),
        ("extract_conv_rank", "-1", ">= 0"), ("extract_conv_rank", "4", "are for full LCD (lora_rank 0)"),
        ("extract_fro", "1.5", "<= 1"), ("extract_fro", "-0.1", ">= 0"),
        ("extract_fro", "0.99", "are for full LCD (lora_rank 0)"),
        ("extract_budget_mb", "-1", ">= 0"), ("extract_budget_mb", "2.5", "are for full LCD (lora_rank 0)"),
        ("extract_calibrate", "-1", ">= 0"), ("extract_calibrate", "1.5", "integer"),
        ("extract_calibrate", "64", "are for full LCD (lora_rank 0)"),
        ("teacher_data", "-1", ">= 0"), ("teacher_data", "0.5", "teacher samples' CFG scale"),
        ("teacher_data", "1000", "<= 100"), ("teacher_steps", "0", ">= 1"), ("teacher_samples", "-1", ">= 0"),
        ("teacher_samples", "64", "needs teacher_data"),
        ("lr_schedule", "linear", "not one of"), ("eval_every", "-1", ">= 0"), ("eval_images", "1", ">= 2"),
        ("init_lora", "{missing}", "file not found"), ("eval_prompts", "{missing}", "cannot read it"),
        ("scale_search", "[0.8]", "set eval_every too"), ("scale_search", "[0, 1]", ">= 0.01"),
        ("scale_search", "[5]", "<= 4"),
    ]:
        c.append(Case("distill", f"--set {key}", val, D + ["--model", "{teacher}", "--set", f"{key}={val}"], msg,
                      slow=key in ("num_ddim_timesteps", "resolution", "target_modules", "validation_prompts",
                                   "device") and val not in ("0",)))
    c += [
        Case("distill", "--set extract_conv_rank", "4 (full LCD, no extract_rank)",
             D + ["--model", "{teacher}", "--set", "lora_rank=0", "--set", "extract_conv_rank=4"],
             "extract_conv_rank, extract_fro, extract_budget_mb and extract_calibrate need extract_rank"),
        Case("distill", "--set extract_budget_mb", "2.5 with extract_fro (full LCD)",
             D + ["--model", "{teacher}", "--set", "lora_rank=0", "--set", "extract_rank=8", "--set",
                  "extract_fro=0.99", "--set", "extract_budget_mb=2.5"], "give one of them"),
        Case("distill", "--set extract_budget_mb", "0.0001 (full LCD: below rank 1 everywhere)",
             D + ["--model", "{teacher}", "--set", "lora_rank=0", "--set", "extract_rank=8", "--set",
                  "extract_budget_mb=0.0001"], "that rank 1 on every extracted module takes", slow=True),
        Case("distill", "--set scale_search", "[0.8] (full LCD, no extract_rank)",
             D + ["--model", "{teacher}", "--set", "lora_rank=0", "--set", "eval_every=10", "--set",
                  "scale_search=[0.8]"], "writes one only with extract_rank"),
        Case("distill", "--set scale_search", "[0.8] (no demo evaluator)",
             D + ["--model", "{teacher}", "--data", "{dir}", "--set", "eval_every=10", "--set", "scale_search=[0.8]"],
             "only the demo evaluator gives"),
        Case("distill", "--model", "(missing)", D + ["--model", "{missing}"], "not found"),
        Case("distill", "--model", "(a single file)", D + ["--model", "{sd_lora}"], "diffusers folder"),
        Case("distill", "--model", "(pickled .bin teacher)", D + ["--model", "{pickled_teacher}"], "pickle",
             slow=True),
        Case("distill", "--data", "(missing folder)", D + ["--model", "{teacher}", "--data", "{missing}"],
             "not found"),
        Case("distill", "--data", "(empty folder)", D + ["--model", "{teacher}", "--data", "{dir}"], "no images"),
        Case("distill", "--resume", "(not a checkpoint)", D + ["--model", "{teacher}", "--resume", "{dir}"],
             "not a distill checkpoint", slow=True),
        Case("distill", "--resume", "(pickled training.pt)",
             D + ["--model", "{teacher}", "--resume", "{pickled_ckpt}"], "unpickles no code", slow=True),
        Case("distill", "--out", "(an existing file)", D[2:] + ["--model", "{teacher}", "--out", "{file}"],
             "is a file", out="{file}", slow=True),
        Case("distill", "--out", "(read-only folder)", D[2:] + ["--model", "{teacher}", "--out", "{ro}/run"],
             "read-only", needs=("ro",), out="{ro}/run", slow=True),
        Case("distill", "--config", "(wrong type)", D + ["--model", "{teacher}", "--config", "{yaml_type_d}"],
             "config key 'checkpoint_every'"),
    ]
    return c


def _finetune_paper() -> list[Case]:
    f = ["--out", "{out}", "--set", "device=cpu"]
    c = [Case("finetune", f"--set {key}", val, f + ["--set", f"{key}={val}"], msg) for key, val, msg in [
        ("lr", "nan", "config key 'lr': must be a finite number"), ("lr_schedule", "linear", "not one of"),
        ("caption_dropout", "1.5", "must be <= 1"), ("lora_rank", "0", "must be >= 1"),
        ("max_steps", "0", "must be >= 1"), ("target_modules", "[]", "at least 1 item"),
    ]]
    c += [
        Case("finetune", "--model", "(missing)", f + ["--model", "{missing}"], "not found"),
        Case("finetune", "--data", "demo:shapes:wavy", f + ["--data", "demo:shapes:wavy"], "unknown demo data"),
        Case("finetune", "--config", "(bad YAML)", f + ["--config", "{yaml_bad}"], "yaml"),
    ]
    p = ["--out", "{out}", "--work", "{out}-work"]
    c += [Case("paper", opt, val, p + [opt, val], msg) for opt, val, msg in [
        ("--families", "zz", "choose from sd, xl (got zz)"), ("--families", "[sd, zz]", "(got [sd, zz])"),
        ("--styles", "wavy", "choose from outline, striped"), ("--parts", "nope", "choose from lcd"),
        ("--prompts", "1", "must be >= 2"), ("--sweep-prompts", "1", ">= 2"), ("--lambdas", "nan", "finite"),
        ("--device", "tpu", "unknown device 'tpu'"), ("--images-per-prompt", "0", "must be >= 1"),
    ]]
    return c


def _eval_bench() -> list[Case]:
    return [
        Case("eval", "SOURCE", "(missing)", ["{missing}"], "not found", out=""),
        Case("eval", "SOURCE", "(empty folder)", ["{dir}"], "no", out=""),
        Case("eval", "SOURCE", "(binary .jsonl)", ["{binary_jsonl}"], "jsonl", out=""),
        Case("eval", "--refs", "0", ["{dir}", "--refs", "0"], "must be >= 1", out=""),
        Case("eval", "--classifier", "(missing)", ["{imgs}", "--classifier", "{missing}"], "not found", out=""),
        Case("eval", "--device", "tpu", ["{imgs}", "--device", "tpu"], "device", out=""),
        Case("bench", "--model", "random:sd99", ["--sample", "--model", "random:sd99"], "sd99", out=""),
        Case("bench", "--device", "tpu", ["--sample", "--device", "tpu"], "device", out=""),
        Case("bench", "--sample", "maybe (--set)", ["--set", "sample=maybe"], "true or false", out=""),
        Case("bench", "--merge", "2 (--set)", ["--set", "merge=2"], "true or false", out=""),
        Case("bench", "--distill", "yes please (--set)", ["--set", "distill=yes please"], "true or false", out=""),
        Case("bench", "--startup", "sometimes (--set)", ["--set", "startup=sometimes"], "true or false", out=""),
        Case("bench", "--rounds", "0", ["--startup", "--rounds", "0"], "must be >= 1", out=""),
        Case("bench", "--model", "(missing, --startup)", ["--startup", "--model", "{missing}"], "not found", out=""),
    ]


CASES: list[Case] = (_sample() + _compare() + _merge() + _inspect_convert() + _distill() + _finetune_paper()
                     + _eval_bench())


# ---- the workspace the cases name ----

def _lora_variant(src: Path, dst: Path, how: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(str(src))
    key = next(k for k in sorted(sd) if k.endswith(("lora_down.weight", "lora_A.weight")))
    if how == "nan":
        sd[key] = sd[key].clone()
        sd[key].view(-1)[0] = float("nan")
    else:  # integer factors
        sd = {k: (v * 100).to(torch.int8) if v.ndim > 1 else v for k, v in sd.items()}
    save_file(sd, str(dst), metadata={"format": "pt"})


def _png(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)


def _ro_folder(root: Path) -> Path | None:
    """A read-only folder: a tmpfs mounted ro (root), or a 0555 folder (others); None where neither works."""
    d = root / "ro"
    d.mkdir()
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(d)], capture_output=True)
        return d if r.returncode == 0 else None
    d.chmod(0o555)
    return d


def release_workspace(ws: dict) -> None:
    if ws.get("ro"):
        subprocess.run(["umount", "-l", ws["ro"]], capture_output=True)


def build_workspace(root: Path) -> dict:
    """The files the cases name, under `root`; -> {name: path}. Needs the demo assets (make demo-models)."""
    import pickle

    root.mkdir(parents=True, exist_ok=True)
    ws = {"sd_lora": str(DEMO_SD), "xl_lora": str(ASSETS / "lcm-lora-demo-xl.safetensors"),
          "style": str(ASSETS / "style-outline-demo-sd.safetensors"), "teacher": str(ASSETS / "demo-sd"),
          "missing": str(root / "no-such-file"), "missing_ckpt": str(root / "no-such.safetensors"),
          "cache": str(root / "cache")}
    files = {"empty": b"", "blank": b"\n   \n\t\n", "binary": bytes(range(256)) * 8,
             "file": FILE_BYTES, "badjsonl": b'{"prompt": "a", \n',
             "badseed": b'{"prompt": "a", "seed": "x"}\n',
             "yaml_unknown": b"no_such_key: 1\n", "yaml_type": b"steps: four\n", "yaml_bad": b"steps: [1\n",
             "yaml_list": b"- a\n- b\n", "yaml_type_d": b"checkpoint_every: often\n",
             "corrupt": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}", "pickle": pickle.dumps({"a": 1}),
             "binary_jsonl": b"\xff\xfe\x00garbage\n"}
    names = {"corrupt": "corrupt.safetensors", "pickle": "model.ckpt", "binary_jsonl": "b.jsonl"}
    for k, data in files.items():
        p = root / names.get(k, f"{k}.txt")
        p.write_bytes(data)
        ws[k] = str(p)
    for k in ("dir", "dirpng"):
        p = root / ("folder" if k == "dir" else "folder.png")
        p.mkdir()
        ws[k] = str(p)
    imgs = root / "imgs"
    imgs.mkdir()
    _png(imgs / "0.png")
    rec = {"path": "0.png", "prompt": "a large red circle on the left"}
    (imgs / "samples.jsonl").write_text(json.dumps(rec) + "\n")
    ws["imgs"] = str(imgs)
    shutil.copy(DEMO_SD, root / "copy.safetensors")
    ws["sd_lora_copy"] = str(root / "copy.safetensors")
    for how in ("nan", "int"):
        _lora_variant(DEMO_SD, root / f"{how}.safetensors", how)
        ws[f"{how}_lora"] = str(root / f"{how}.safetensors")
    teacher = root / "pickled-teacher"
    shutil.copytree(ASSETS / "demo-sd", teacher)
    for f in (teacher / "unet").glob("*.safetensors"):
        f.unlink()
    (teacher / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"not": "weights"}))
    ws["pickled_teacher"] = str(teacher)
    ck = root / "run" / "checkpoints" / "step-0000001"
    ck.mkdir(parents=True)
    (ck / "training.pt").write_bytes(pickle.dumps({"lora": [1, 2]}))
    from lcmtool.options import DistillConfig

    conf = dict(seed=0, batch_size=2, grad_accum=1, lora_rank=2, lora_alpha=2.0, conv_rank=0,
                target_modules=DistillConfig().target_modules)  # as D's run: resume reaches training.pt
    (ck / "trainer_state.json").write_text(json.dumps({"step": 1, "config": conf, "world_size": 1}))
    ws["pickled_ckpt"] = str(ck)
    ro = _ro_folder(root)
    if ro is not None:
        ws["ro"] = str(ro)
    return ws


def fill(text: str, ws: dict, out: str) -> str:
    return text.replace("{out}", out).format(**ws) if text else text


def run_case(case: Case, ws: dict, out: str) -> tuple[int, str, list[str]]:
    """Run one case in-process (CliRunner); -> (exit code, the last stderr line, the error lines)."""
    from typer.testing import CliRunner

    from lcmtool.cli import app

    args = [case.command] + [fill(a, ws, out) for a in case.args]
    r = CliRunner().invoke(app, args, env=case.env or None)
    stderr = r.stderr if r.stderr is not None else r.output
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return r.exit_code, (lines[-1] if lines else ""), errors


def verdict(case: Case, ws: dict, out: str, code: int, errors: list[str]) -> str | None:
    """None when the case was refused as it must be (exit 2, one error line holding the fragment, nothing
    written: the output path does not exist, the workspace's file and folders are as they were), else what went
    wrong."""
    if code != 2:
        return f"exit {code}, not 2"
    if len(errors) != 1:
        return f"{len(errors)} error lines"
    if fill(case.expect, ws, out).lower() not in errors[0].lower():
        return f"the error line lacks {case.expect!r}"
    if Path(ws["file"]).read_bytes() != FILE_BYTES:
        return f"overwrote {ws['file']}"
    for k in ("dir", "dirpng", "ro"):
        if k in ws and os.listdir(ws[k]):
            return f"wrote into {ws[k]}: {os.listdir(ws[k])}"
    target = Path(fill(case.out, ws, out)) if case.out else None
    if target is not None and target != Path(ws["file"]) and (target.exists() or target.is_symlink()):
        return f"created {target}"
    for p in Path(out).parent.glob(Path(out).name + "*"):
        return f"created {p}"
    return None


def shown(line: str, ws: dict, out: str) -> str:
    """An error line with the workspace's paths written as their {names} (for the table)."""
    for k, v in sorted(ws.items(), key=lambda kv: -len(kv[1])):
        line = line.replace(v, "{" + k + "}")
    return line.replace(out, "{out}")
