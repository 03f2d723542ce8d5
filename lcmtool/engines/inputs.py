"""What `sample` and `compare` check before any model loads or any file is written: the prompts (--prompt, or a
--prompts file of lines / JSONL, or stdin), the PATH[:WEIGHT] LoRA specs, the steps and the guidance.

Every problem is an LcmError naming the flag; warnings go to stderr once each.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from lcmtool.errors import LcmError, to_stderr
from lcmtool.models.load import resolve_model
from lcmtool.models.schedulers import DEFAULT_GUIDANCE, LCM_ORIGINAL_STEPS


@dataclass
class Job:
    prompt: str
    negative_prompt: str
    seed: int
    index: int = 0  # the prompt's position in --prompt / --prompts (names the image with its seed)


_warned: set[str] = set()


def warn(msg: str) -> None:
    """A warning on stderr, once per message."""
    if msg in _warned:
        return
    _warned.add(msg)
    to_stderr(msg, "[bold yellow]warning:[/]")


# ---- input validation (all of it before any model loads or any file is written) ----

def read_prompts(prompt: str | None, prompts: str | None, negative: str, seed: int, num_images: int) -> list[Job]:
    if prompt is not None and prompts is not None:
        raise LcmError("give --prompt or --prompts, not both")
    if num_images < 1:
        raise LcmError(f"--num-images must be >= 1, got {num_images}")
    entries: list[tuple[str, str, int]] = []
    if prompt is not None:
        if not prompt.strip():
            raise LcmError("--prompt is empty")
        entries.append((prompt, negative, seed))
    elif prompts is not None:
        if prompts == "-":
            text, where = sys.stdin.read(), "stdin"
        else:
            p = Path(prompts)
            if p.is_dir():
                raise LcmError(f"prompts file {prompts} is a folder")
            if not p.exists():  # a pipe (<(echo x)) or a character device (/dev/null) reads like a file
                raise LcmError(f"prompts file not found: {prompts}")
            try:
                text, where = p.read_text(encoding="utf-8"), prompts
            except UnicodeDecodeError:
                raise LcmError(f"prompts file {prompts} is not UTF-8 text") from None
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LcmError(f"{where} line {n}: bad JSON ({e.msg})") from None
                if not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
                    raise LcmError(f"{where} line {n}: JSON line needs a non-empty \"prompt\"")
                s = rec.get("seed", seed)
                if isinstance(s, bool) or not isinstance(s, int):
                    raise LcmError(f"{where} line {n}: \"seed\" must be an integer")
                neg = rec.get("negative_prompt", rec.get("negative"))  # null: the default, not "None"
                entries.append((rec["prompt"], negative if neg is None else str(neg), s))
            else:
                entries.append((line, negative, seed))
        if not entries:
            raise LcmError(f"prompts file {where} has no prompts")
    else:
        raise LcmError("no prompt: give --prompt TEXT or --prompts FILE")
    jobs = [Job(p, neg, s + k, i) for i, (p, neg, s) in enumerate(entries) for k in range(num_images)]
    bad = next((j.seed for j in jobs if not -2 ** 63 <= j.seed < 2 ** 64), None)
    if bad is not None:  # torch.Generator.manual_seed takes a 64-bit seed
        raise LcmError(f"seed {bad} is out of range (a 64-bit integer)")
    return jobs


def parse_loras(specs: list[str]) -> list[tuple[str, float]] | None:
    """['a.safetensors:0.8', 'b.safetensors'] -> [(path, weight)]; [] -> None (use the default); 'none' -> []."""
    if not specs:
        return None
    if any(s.strip().lower() == "none" for s in specs):
        if len(specs) > 1:
            raise LcmError("--lora none turns LoRAs off; it cannot be combined with other --lora values")
        return []
    out = []
    for s in specs:
        path, weight = s, 1.0
        head, sep, tail = s.rpartition(":")
        if sep and head and not Path(s).exists():
            try:
                path, weight = head, float(tail)
            except ValueError:
                pass
            if not math.isfinite(weight):
                raise LcmError(f"--lora {s}: the weight must be a finite number")
        if not Path(path).is_file():
            raise LcmError(f"LoRA file not found: {path}")
        out.append((path, weight))
    return out


def default_loras(model: str, scheduler: str) -> list[tuple[str, float]]:
    """A model that ships an LCM-LoRA (the demo models) gets it for lcm/tcd (issue 6); elsewhere nothing."""
    ref = resolve_model(model)
    if scheduler not in ("lcm", "tcd") or not ref.lcm_lora:
        return []
    if not Path(ref.lcm_lora).is_file():
        raise LcmError(f"the LCM-LoRA shipped for {model} is not built at {ref.lcm_lora} (run `make demo-models`), "
                       "or pass --lora none to sample the plain teacher")
    return [(ref.lcm_lora, 1.0)]


def check_steps(scheduler: str, steps: int, timesteps: list[int] | None) -> int:
    if timesteps:
        if scheduler not in ("lcm", "tcd"):
            raise LcmError("--timesteps is for the lcm and tcd schedulers")
        decreasing = all(a > b for a, b in zip(timesteps, timesteps[1:], strict=False))
        if not decreasing or any(t < 0 or t > 999 for t in timesteps):
            raise LcmError(f"--timesteps must be strictly decreasing values in 0..999, got {timesteps}")
        return len(timesteps)
    if steps < 1:
        raise LcmError(f"--steps must be >= 1, got {steps}")
    if steps > 1000:
        raise LcmError(f"--steps must be <= 1000, got {steps}")
    return steps


def check_guidance(scheduler: str, guidance: float | None, negatives: bool, steps: int) -> float:
    g = DEFAULT_GUIDANCE[scheduler] if guidance is None else float(guidance)
    if not math.isfinite(g) or g < 0:
        raise LcmError(f"guidance must be a finite number >= 0, got {g}")
    if scheduler in ("lcm", "tcd") and g > 2:
        warn(f"guidance {g} > 2 with {scheduler.upper()} over-saturates images; LCM-LoRA is distilled for 1-2")
    if negatives and g <= 1:
        warn("the negative prompt has no effect at guidance <= 1 (one UNet pass per step, no CFG)")
    if scheduler in ("lcm", "tcd") and steps > LCM_ORIGINAL_STEPS:
        warn(f"{steps} LCM steps exceed the {LCM_ORIGINAL_STEPS} original solver steps the LoRA was distilled on; "
             "the schedule is stretched and quality will not improve")
    return g
