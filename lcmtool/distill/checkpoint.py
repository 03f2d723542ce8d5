"""Checkpoints of a distill run: stop requests, the step counter, atomic save, resume, stale temp folders.

A checkpoint is `checkpoints/step-NNNNNNN/` with `training.pt` (trained tensors, EMA, optimizer and schedule
states) and `trainer_state.json` (step, reason, config); `checkpoints/best/` is one more, kept by the run's
held-out score. Each is written by lcmtool.fileio.atomic_dir (a temp folder of ours, then one rename), so a crash
leaves the old one or the new one; a killed run's temp folders are removed when the next run starts, and are
never taken for a checkpoint (`--resume latest` reads complete `step-*` folders only).
"""
from __future__ import annotations

import contextlib
import json
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lcmtool.errors import LcmError

LEGACY_TMP, LEGACY_OLD = ".tmp-", ".old-"  # the temp / set-aside names of lcmtool <= 0.x checkpoints
RESUME_KEYS = ("seed", "batch_size", "grad_accum", "lora_rank", "lora_alpha", "conv_rank", "target_modules")


@dataclass
class TrainState:
    """The step counter and what the loop carries across steps (restored on resume)."""
    step: int = 0
    start_step: int = 0
    last_good: Path | None = None          # the last checkpoint written (named in a non-finite-loss error)
    losses: list = field(default_factory=list)  # (step, mean loss) per log interval, for loss.png
    evals: list = field(default_factory=list)   # (step, score) of the held-out validation hook
    best: float | None = None              # the best held-out score so far (lower is better)


class StopRequest:
    """SIGINT/SIGTERM during training ask for a stop at the next step boundary instead of killing the step.

    One process: a second Ctrl-C leaves at once (KeyboardInterrupt), except inside `deferred()`, the window from
    the optimizer step to the step counter's increment, where every signal waits for the step boundary: a
    checkpoint labelled step N never holds step N+1's weights. Under torchrun / accelerate launch the launcher
    forwards the terminal's signal to the workers, so each may see two: all are taken as the one request, and the
    launcher's own kill timeout (30 s) covers a run that does not stop.
    """

    def __init__(self, single_process: bool):
        self.single_process = single_process
        self.requested = False
        self.written = False
        self.any_rank = False  # some rank had asked as of the last all-reduced step (data-parallel runs decide on it)
        self._deferring = False
        self._old: dict = {}

    def _handler(self, signum, frame):
        if self.requested and self.single_process and not self._deferring:
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def deferred(self):
        """Signals arriving inside take effect at the step boundary (the stop check after the block)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def install(self) -> None:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)

    def restore(self) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def is_checkpoint(path: Path) -> bool:
    return (path / "trainer_state.json").is_file() and (path / "training.pt").is_file()


def clean_stale(ckpt_dir: Path) -> list[Path]:
    """Remove the temp folders a killed run left in `ckpt_dir` (fileio's, and the `.tmp-step-*` / `.old-step-*` of
    earlier versions); a checkpoint set aside by a publish whose replacement never arrived is put back."""
    from lcmtool.fileio import clean_stale as clean_ours

    if not ckpt_dir.is_dir():
        return []
    removed = clean_ours(ckpt_dir)
    for p in sorted(ckpt_dir.glob(f"{LEGACY_OLD}*")):
        final = ckpt_dir / p.name[len(LEGACY_OLD):]
        if not final.exists() and is_checkpoint(p):
            p.rename(final)
        else:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    for p in sorted(ckpt_dir.glob(f"{LEGACY_TMP}*")):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def find_checkpoint(out: Path, resume: str) -> Path:
    """`latest` -> the newest complete `checkpoints/step-*` of `out`; else `resume` must be a checkpoint folder."""
    if resume == "latest":
        ckpts = [c for c in sorted((out / "checkpoints").glob("step-*")) if is_checkpoint(c)]
        if not ckpts:
            raise LcmError(f"--resume latest: no checkpoint in {out / 'checkpoints'}")
        return ckpts[-1]
    p = Path(resume).expanduser()
    if not (p / "trainer_state.json").is_file():
        raise LcmError(f"--resume {resume}: not a distill checkpoint folder (no trainer_state.json)")
    return p


def save(ckpt_dir: Path, name: str, blob: dict, state: dict, keep: int = 0) -> Path:
    """Write `blob` (training.pt) and `state` (trainer_state.json) as checkpoint `ckpt_dir/name`, atomically;
    with keep > 0, only the newest `keep` step-* checkpoints stay. A failed write leaves no temp folder (and a
    full disk is one WriteError line)."""
    import torch

    from lcmtool.fileio import atomic_dir

    final = ckpt_dir / name
    with atomic_dir(final) as tmp:
        torch.save(blob, tmp / "training.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    if keep > 0:
        for old in sorted(ckpt_dir.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(ck: Path, config: dict, world_size: int) -> tuple[dict, dict]:
    """-> (trainer_state, training blob) of checkpoint `ck`, refusing one made with another shape or layout."""
    import torch

    state = json.loads((ck / "trainer_state.json").read_text())
    for key in RESUME_KEYS:
        if state["config"].get(key) != config.get(key):
            raise LcmError(f"cannot resume {ck}: it was trained with {key}={state['config'].get(key)}, "
                           f"now {config.get(key)}")
    if state["world_size"] != world_size:
        raise LcmError(f"cannot resume {ck}: it ran on {state['world_size']} processes, now {world_size}")
    # CPU first: a DDP run on CPU tags its storages "cpu:N", which map_location=device cannot restore
    try:
        blob = torch.load(ck / "training.pt", map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:  # lcmtool unpickles no code
        why = "it holds pickled objects other than tensors" if isinstance(e, pickle.UnpicklingError) else \
            f"{str(e).strip().splitlines()[0][:120]}"
        raise LcmError(f"cannot resume {ck}: training.pt is not a checkpoint lcmtool reads ({why}; lcmtool "
                       "unpickles no code): damaged, or not written by lcmtool") from None
    return state, blob


def save_training(ckpt_dir: Path, name: str, params, ema, optimizer, lr_sched, state: dict, keep: int,
                  last_good: Path | None = None) -> Path:
    """`save` of the trained tensors (LoRA factors or whole-UNet weights: distill and finetune), their EMA (may be
    empty), the optimizer and the schedule; a full disk says which checkpoint is intact and how to go on from it."""
    from lcmtool.oserrors import WriteError

    blob = {"lora": [p.detach().cpu() for p in params], "ema": [e.cpu() for e in ema],
            "optimizer": optimizer.state_dict(), "lr_scheduler": lr_sched.state_dict()}
    try:
        return save(ckpt_dir, name, blob, state, keep)
    except WriteError as e:  # the last checkpoint is whole
        last = f"the last checkpoint, {last_good}, is intact" if last_good else "no checkpoint yet"
        raise WriteError(f"{e}; {last}: make room and rerun with --resume latest", e.path, e.errno) from None


def load_training(ck: Path, config: dict, world_size: int, params, ema, optimizer, lr_sched) -> dict:
    """`load` checkpoint `ck` into the trained tensors, their EMA, the optimizer and the schedule; -> its state."""
    import torch

    state, blob = load(ck, config, world_size)
    saved = blob.get("lora", blob.get("params", []))  # "params": finetune checkpoints written before 2026-12-01
    if len(saved) != len(params):
        raise LcmError(f"cannot resume {ck}: it holds {len(saved)} tensors, this run trains {len(params)} "
                       "(a LoRA vs the whole UNet, or other target modules?)")
    with torch.no_grad():
        for p, v in zip(params, saved, strict=True):
            p.copy_(v)
        for e, v in zip(ema, blob.get("ema", []), strict=False):
            e.copy_(v)
    optimizer.load_state_dict(blob["optimizer"])
    lr_sched.load_state_dict(blob["lr_scheduler"])
    return state


def trim_metrics(path: Path, step: int) -> list[dict]:
    """Keep the records of metrics.jsonl up to `step` (a resumed run logs the later ones again); -> them."""
    from lcmtool.fileio import atomic_write_text

    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            records.append(rec)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return records
