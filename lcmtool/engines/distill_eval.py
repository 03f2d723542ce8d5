"""The held-out validation hook of a distill run (issue 13): every `eval_every` steps the student samples a fixed
prompt set at LCM 2 and 4 steps (guidance 1, as `lcmtool sample`), and on demo models the demo evaluator scores
it (FD-demo and attribute accuracies, lcmtool.demo.metrics, the scorer of `lcmtool eval`); the scores go to
metrics.jsonl (`eval_lcm4_fd`, ...), TensorBoard and loss.png, and the run keeps `checkpoints/best/` (with
`lcm-lora-best.safetensors`) by the lowest `eval_lcm4_fd`. Other models get a grid of the prompts per call.
"""
from __future__ import annotations

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
