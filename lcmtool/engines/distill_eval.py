"""The held-out validation hook of a distill run (issue 13): every `eval_every` steps the student samples a fixed
prompt set at LCM 2 and 4 steps (guidance 1, as `lcmtool sample`), and on demo models the demo evaluator scores
it (FD-demo and attribute accuracies, lcmtool.demo.metrics, the scorer of `lcmtool eval`); the scores go to
metrics.jsonl (`eval_lcm4_fd`, ...), TensorBoard and loss.png, and the run keeps `checkpoints/best/` (with
`lcm-lora-best.safetensors`) by the lowest `eval_lcm4_fd`. Other models get a grid of the prompts per call.
With `scale_search` the finished run also scores its tau_LCM file at several weights and writes the best one
into the file (the paper's lambda for the acceleration vector, eq. 3, chosen on held-out prompts).
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path

from lcmtool.errors import LcmError

EVAL_STEPS = (2, 4)
SELECT = "eval_lcm4_fd"  # the score the best checkpoint is chosen by (lower is better)
GRID_ROWS = 8            # prompts in the grid of a model without an evaluator


def is_demo(cfg) -> bool:
    """The demo evaluator applies: a demo teacher, or the demo world's data (64 px scenes with demo captions)."""
    return cfg.model.startswith("demo:") or cfg.data.startswith("demo:")


def read_prompts(path: str) -> list[str]:
    p = Path(path).expanduser()
    try:
        lines = [x.strip() for x in p.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise LcmError(f"--eval-prompts {path}: cannot read it ({type(e).__name__})") from None
    prompts = [x for x in lines if x]
    if not prompts:
        raise LcmError(f"--eval-prompts {path}: no prompts in it")
    return prompts


class Evaluator:
    """The prompt set (eval_images entries, prompts cycled, image i with seed validation_seed + i) and, on demo
    models, the demo classifier that scores it. Checked when the run starts, so a bad prompt file fails early."""

    def __init__(self, cfg, device: str = "cpu"):
        self.demo = is_demo(cfg)
        if cfg.eval_prompts:
            base = read_prompts(cfg.eval_prompts)
        elif self.demo:
            from lcmtool.demo.world import heldout_prompts

            base = heldout_prompts()
        else:
            base = list(cfg.validation_prompts)
        self.prompts = [base[i % len(base)] for i in range(cfg.eval_images)]
        self.seed, self.model = cfg.validation_seed, None
        if self.demo:
            from lcmtool.demo import world
            from lcmtool.demo.classifier import load_classifier

            for p in base:
                try:
                    world.parse_caption(p)
                except ValueError:
                    raise LcmError(f"eval prompt {p!r} is not a demo caption (the demo evaluator scores those only; "
                                   f"give --eval-prompts of demo captions)") from None
            self.model = load_classifier(device=str(device))

    def __call__(self, pipe, unet, device, autocast, grid_path: Path, timestep_scaling: float = 10.0) -> dict:
        """Sample and score; -> {"eval_lcm{s}_fd": ..., "eval_lcm{s}_<attribute>_acc": ...} (demo models), or {}
        after writing a grid of the first prompts to `grid_path`."""
        from lcmtool.distill.teacher import encoders_on
        from lcmtool.distill.validate import lcm_images, lcm_pipeline, validation_grid

        if not self.demo:
            validation_grid(pipe, unet, self.prompts[:GRID_ROWS], list(EVAL_STEPS), self.seed, grid_path, device,
                            autocast, timestep_scaling)
            return {}
        from lcmtool.demo import metrics

        out = {}
        with encoders_on(pipe, device):
            vpipe = lcm_pipeline(pipe, unet, timestep_scaling)
            for steps in EVAL_STEPS:
                images = lcm_images(vpipe, self.prompts, steps, self.seed, autocast)
                res = metrics.score(as_tensor(images), self.prompts, self.model)
                out[f"eval_lcm{steps}_fd"] = res["fd"]
                for k in ("shape_acc", "color_acc", "size_acc", "position_acc"):
                    out[f"eval_lcm{steps}_{k}"] = res[k]
        return out


def as_tensor(images: list):
    """PIL images -> [N, 3, 64, 64] in [-1, 1] (other sizes box-resized to the demo's 64 px, as `lcmtool eval`)."""
    import numpy as np
    import torch
    from PIL import Image

    from lcmtool.demo import world

    out = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (world.SIZE, world.SIZE):
            im = im.resize((world.SIZE, world.SIZE), Image.BOX)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(out)


def is_better(score, best) -> bool:
    """Whether held-out `score` beats `best` (lower is better; a missing or non-finite score never does)."""
    if score is None or not math.isfinite(score):
        return False
    return best is None or score < best


def evaluate(run, state, save_checkpoint, save_best_lora) -> dict:
    """One call of the hook at the current step: score (main process; the scores and the verdict are shared with
    every rank), log, and keep checkpoints/best when the score is the best so far. -> the scores."""
    from accelerate.utils import broadcast_object_list

    t0 = time.time()
    scores, better = {}, False
    if run.main:
        scores = run.evaluator(run.pipe, run.raw_unet, run.accelerator.device, run.accelerator.autocast,
                               run.out / "validation" / f"eval-step-{state.step:07d}.png", run.cfg.timestep_scaling)
        better = is_better(scores.get(SELECT), state.best)
    if run.world > 1:
        scores, better = broadcast_object_list([scores, better])
    seconds = time.time() - t0
    if run.main:
        run.metrics.write(json.dumps({"step": state.step, **scores, "eval_s": seconds}) + "\n")
        run.metrics.flush()
    if run.tracker and scores:
        run.accelerator.log({k: v for k, v in scores.items() if v is not None}, step=state.step)
    if scores.get(SELECT) is not None:
        state.evals.append((state.step, scores[SELECT]))
    if better:
        state.best = scores[SELECT]
        save_checkpoint(run, state, "best", name="best", extra={"eval": scores})
        if run.main:
            save_best_lora(run, state)
    return {**scores, "eval_s": seconds}


def check_scale_search(cfg) -> None:
    """scale_search needs the scored hook (eval_every on a demo model or demo data) and a LoRA file to scale."""
    if not cfg.scale_search:
        return
    if not cfg.eval_every:
        raise LcmError("scale_search picks the weight by the held-out hook's score: set eval_every too")
    if not is_demo(cfg):
        raise LcmError("scale_search picks the weight by FD-demo, which only the demo evaluator gives (a demo model "
                       "or demo data); on other models compare weights with `lcmtool compare --lora FILE:W`")
    if not cfg.lora_rank and not cfg.extract_rank:
        raise LcmError("scale_search scales the LoRA file: full LCD (lora_rank 0) writes one only with extract_rank")


def pick_scale(rows: list[dict]) -> float:
    """The weight of the lowest finite SELECT score (the first of equal ones); 1.0 when none is finite."""
    best, score = 1.0, None
    for r in rows:
        if is_better(r.get(SELECT), score):
            best, score = r["scale"], r[SELECT]
    return best


@contextlib.contextmanager
def file_on_teacher(run, lora, scale: float):
    """The teacher UNet with `scale` * the LoRA file `lora`'s delta fused in (W + s * dW, the file's own factors):
    full LCD's frozen teacher copy, or a LoRA run's student with its LoRA off. Its weights are put back exactly on
    exit. Main process only."""
    from lcmtool.distill.student import adapters_off
    from lcmtool.lora.fuse import find_submodule, fuse_into_unet

    full = not run.cfg.lora_rank
    base = run.teacher if full else run.raw_unet
    weights = [find_submodule(base, p).weight for p in lora.modules]
    kept = [w.detach().clone() for w in weights]
    with contextlib.nullcontext() if full else adapters_off(base):
        try:
            fuse_into_unet(base, [(lora, scale)])
            yield base
        finally:
            for w, k in zip(weights, kept, strict=True):
                w.data.copy_(k)


def scale_search(run, path: Path) -> tuple[float, list[dict]]:
    """tau_LCM as written at `path`, on the teacher at each weight of cfg.scale_search (file_on_teacher), scored by
    the held-out hook (same prompts and seeds). -> (the best weight by SELECT, one row of scores per weight)."""
    from lcmtool.lora.io import load_lora

    lora = load_lora(path, run.family)
    rows = []
    for s in run.cfg.scale_search:
        t0 = time.time()
        with file_on_teacher(run, lora, s) as unet:
            scores = run.evaluator(run.pipe, unet, run.accelerator.device, run.accelerator.autocast,
                                   run.out / "validation" / f"scale-{s:g}.png", run.cfg.timestep_scaling)
        rows.append({"scale": s, **scores, "eval_s": time.time() - t0})
        run.log(f"scale {s:g}: {SELECT} {scores.get(SELECT, float('nan')):.2f}")
    return pick_scale(rows), rows


def write_scaled(path: Path, scale: float, rows: list[dict], fmt: str, family: str, dtype) -> None:
    """Rewrite the LoRA file at `path` with every up factor times `scale` (delta = scale * the trained one) and the
    search recorded in its metadata (`lcm_scale`, `lcm_scale_search`); atomic, as every LoRA write."""
    from lcmtool.lora.io import load_lora, save_lora

    lora = load_lora(path, family)
    for m in lora.modules.values():
        m.B = m.B.float() * scale
    meta = {**lora.metadata, "lcm_scale": f"{scale:g}",
            "lcm_scale_search": json.dumps([{k: r[k] for k in ("scale", SELECT, "eval_lcm2_fd") if k in r}
                                            for r in rows])}
    save_lora(lora, path, format=fmt, family=family, metadata=meta, dtype=dtype)


def restore(run, state, records: list[dict]) -> None:
    """After a resume: the evals logged up to the checkpoint and the best of them. A checkpoints/best/ from after
    the checkpoint (the killed run got further) is removed: the resumed run, deterministic, makes it again."""
    state.evals = [(r["step"], r[SELECT]) for r in records if r.get(SELECT) is not None]
    scores = [v for _, v in state.evals if is_better(v, None)]
    state.best = min(scores) if scores else None
    best = run.out / "checkpoints" / "best"
    if run.main and (best / "trainer_state.json").is_file():
        if json.loads((best / "trainer_state.json").read_text())["step"] > state.step:
            shutil.rmtree(best, ignore_errors=True)
