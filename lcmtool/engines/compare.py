"""The compare engine: `compare(cfg)` makes one grid, rows = prompt x seed, columns = scheduler:steps[:guidance],
each column labelled with its time per image (the paper's Fig. 3). Loading, LoRAs and batches are the sample
engine's.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from lcmtool import __version__
from lcmtool.engines.inputs import check_guidance, check_steps, default_loras, parse_loras, read_prompts
from lcmtool.engines.sample import apply_loras, check_loras, generate, image_size, load, set_scheduler
from lcmtool.errors import LcmError
from lcmtool.models.load import resolve_model
from lcmtool.models.schedulers import SAMPLER_NAMES, SCHEDULERS
from lcmtool.options import CompareConfig  # every option is declared once, in lcmtool/options.py


def parse_run(spec: str) -> tuple[str, int, float | None]:
    """'lcm:4' or 'dpmpp:25:7.5' -> (scheduler, steps, guidance or None)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] not in SCHEDULERS:
        raise LcmError(f"bad run {spec!r}: expected scheduler:steps[:guidance] with scheduler one of "
                       f"{', '.join(SCHEDULERS)}")
    try:
        steps = int(parts[1])
        g = float(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise LcmError(f"bad run {spec!r}: steps must be an integer and guidance a number") from None
    check_steps(parts[0], steps, None)
    return parts[0], steps, g


def compare(cfg: CompareConfig) -> dict:
    """`lcmtool compare`: one grid, rows = prompt x seed, columns = scheduler:steps, each with its ms/image."""
    from lcmtool.config import published_with
    from lcmtool.models.pipeline import FastSampler
    from lcmtool.outputs.png import grid, save_png

    jobs = read_prompts(cfg.prompt, cfg.prompts, cfg.negative_prompt, cfg.seed, cfg.num_images)
    resolve_model(cfg.model)
    if not cfg.runs:
        raise LcmError("compare needs at least one run (scheduler:steps)")
    runs = [parse_run(r.strip()) for item in cfg.runs for r in item.split(",") if r.strip()]  # "a,b" or repeated
    if not runs:
        raise LcmError("compare needs at least one run (scheduler:steps)")
    guid = [check_guidance(s, g, any(j.negative_prompt for j in jobs), n) for s, n, g in runs]
    explicit = parse_loras(cfg.lora)
    distilled = [s in ("lcm", "tcd") for s, _, _ in runs]
    loras = explicit if explicit is not None else (default_loras(cfg.model, "lcm") if any(distilled) else [])
    out = Path(cfg.out)
    if out.suffix.lower() != ".png":
        raise LcmError(f"--out for compare is the grid's PNG path, got {cfg.out}")

    pipe, family, device, _ = load(cfg.model, cfg.device, cfg.dtype, cfg.model_config, cfg.tokenizer)
    base_config = dict(pipe.scheduler.config)
    height, width = image_size(pipe, cfg.height, cfg.width)
    files = check_loras(pipe, family, cfg.model, loras) if loras else None  # fail on a bad LoRA before sampling
    sampler = FastSampler(pipe)  # lcmtool's loop, as `sample` runs it (eager)
    # warm-up: first calls pay for allocation and kernel selection, which no column should be charged
    set_scheduler(pipe, base_config, "ddim", 1, cfg.timestep_spacing)
    generate(pipe, jobs[:1], "ddim", 1, 1.0, height, width, device, sampler=sampler)

    # the teacher's columns first, then fuse the LoRA once for the distilled ones
    order = sorted(range(len(runs)), key=lambda i: distilled[i])
    cells: dict[int, list] = {}
    timings: dict[int, float] = {}
    lora_meta: list[dict] = []
    fused = False
    for i in order:
        name, steps, _ = runs[i]
        if distilled[i] and loras and not fused:
            lora_meta = apply_loras(pipe, family, cfg.model, loras, fuse=True, files=files)
            sampler.weights_changed()
            fused = True
        set_scheduler(pipe, base_config, name, steps, cfg.timestep_spacing)
        images, ms = generate(pipe, jobs, name, steps, guid[i], height, width, device, gamma=cfg.gamma,
                              sampler=sampler)
        cells[i], timings[i] = images, ms / len(jobs)
    col_labels = [f"{SAMPLER_NAMES[s]} {n} step{'s' * (n > 1)}, {timings[i]:.0f} ms/img"
                  for i, (s, n, _) in enumerate(runs)]
    rows = [[cells[i][r] for i in range(len(runs))] for r in range(len(jobs))]
    row_labels = [f"{j.prompt} (seed {j.seed})" for j in jobs]
    cell_labels = [[f"{SAMPLER_NAMES[s]} {n}, w={guid[i]:g}" for i, (s, n, _) in enumerate(runs)] for _ in jobs]
    img = grid(rows, col_labels, row_labels, cell_labels)
    result = {"path": str(out), "model": cfg.model, "device": device, "width": width, "height": height,
              "runs": [{"scheduler": s, "steps": n, "guidance": guid[i], "lora": bool(distilled[i] and loras),
                        "ms_per_image": round(timings[i], 2)} for i, (s, n, _) in enumerate(runs)],
              "loras": lora_meta, "rows": [dataclasses.asdict(j) for j in jobs], "version": __version__}
    with published_with(cfg, out):  # the grid and its resolved config: both or neither
        save_png(img, out, result, a1111=False)
    return result

