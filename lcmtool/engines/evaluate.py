"""`lcmtool eval`: read a folder of generated PNGs and their prompts, score them with the demo classifier.

Prompts come from, in order: a given .jsonl file or DIR/samples.jsonl (lines with "path" and "prompt", as
`lcmtool sample --json` prints them; other lines are skipped), else each PNG's JSON chunk "lcmtool" (its
"prompt") or text chunk "parameters" (first line, which A1111-style also carries <lora:...> tags).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lcmtool.demo import world
from lcmtool.errors import LcmError

JSONL_NAME = "samples.jsonl"
IMAGE_SUFFIXES = {".png"}


def _resolve(raw: str, base: Path) -> Path:
    """A JSONL path: absolute, else relative to the JSONL's folder, else to the working directory."""
    p = Path(raw)
    if p.is_absolute():
        return p
    for cand in (base / p, p, base / p.name):
        if cand.is_file():
            return cand
    return base / p


def read_jsonl(path: Path) -> list[tuple[Path, str]]:
    items = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LcmError(f"{path} is not UTF-8 text") from None
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise LcmError(f"{path}:{no}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict) or "path" not in rec:
            continue  # summaries and other records that `sample --json` may print
        if not isinstance(rec.get("prompt"), str):
            raise LcmError(f"{path}:{no}: record for {rec['path']!r} has no \"prompt\" string")
        img = _resolve(str(rec["path"]), path.parent)
        if not img.is_file():
            raise LcmError(f"{path}:{no}: image not found: {img}")
        items.append((img, rec["prompt"]))
    return items


def png_prompt(path: Path) -> str | None:
    """The prompt stored in a PNG: JSON chunk "lcmtool" (its "prompt"), else text chunk "parameters" (first line);
    None for lcmtool PNGs that are not samples (a comparison grid carries an "lcmtool" record without a prompt)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            info = dict(im.info)
    except Exception as e:  # noqa: BLE001 - an unreadable image is a user error
        raise LcmError(f"cannot read image {path}: {e}") from None
    if isinstance(info.get("lcmtool"), str):  # the exact prompt (the A1111 text appends <lora:name:weight> tags)
        try:
            meta = json.loads(info["lcmtool"])
        except json.JSONDecodeError:
            meta = None
        if isinstance(meta, dict) and isinstance(meta.get("prompt"), str):
            return meta["prompt"]
        if isinstance(meta, dict) and "prompt" not in meta:
            return None
    if isinstance(info.get("parameters"), str) and info["parameters"].strip():
        return info["parameters"].strip().splitlines()[0]
    raise LcmError(f"no prompt for {path}: no {JSONL_NAME} beside it and no 'parameters' or 'lcmtool' PNG chunk")


def find_inputs(source: str | Path) -> list[tuple[Path, str]]:
    """(image path, prompt) pairs from a folder or a .jsonl file; LcmError when there is nothing to score."""
    source = Path(source)
    if not source.exists():
        raise LcmError(f"not found: {source}")
    if source.is_file():
        if source.suffix != ".jsonl":
            raise LcmError(f"expected a folder of PNGs or a .jsonl file, got {source}")
        items = read_jsonl(source)
    elif (source / JSONL_NAME).is_file():
        items = read_jsonl(source / JSONL_NAME)
    else:
        pngs = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        items = [(p, prompt) for p in pngs if (prompt := png_prompt(p)) is not None]
    if not items:
        raise LcmError(f"no images to score in {source}")
    return items


def load_images(paths: list[Path]) -> torch.Tensor:
    """PNGs -> [N, 3, 64, 64] in [-1, 1]; other sizes are resized (box filter) to the demo's 64 px."""
    from PIL import Image

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if im.size != (world.SIZE, world.SIZE):
                    im = im.resize((world.SIZE, world.SIZE), Image.BOX)
                arr = np.asarray(im, dtype=np.float32)
        except LcmError:
            raise
        except Exception as e:  # noqa: BLE001
            raise LcmError(f"cannot read image {p}: {e}") from None
        out.append(torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(out)


def evaluate(source: str | Path, classifier: str | Path | None = None, device: str = "cpu",
             refs_per_prompt: int | None = None) -> dict:
    """Score a folder / JSONL of generated images: metrics.score plus input and classifier facts."""
    from lcmtool import startup
    from lcmtool.demo import metrics
    from lcmtool.demo.classifier import DEFAULT_PATH, load_classifier
    from lcmtool.models.load import resolve_device

    startup.settle()  # the imports are done: scoring many images runs with the collector on
    if refs_per_prompt is None:
        refs_per_prompt = metrics.REFS_PER_PROMPT
    if refs_per_prompt < 1:
        raise LcmError(f"refs per prompt must be >= 1, got {refs_per_prompt}")
    device = resolve_device(device)
    items = find_inputs(source)
    for path, prompt in items:  # fail on a bad prompt before any model work, naming the file
        try:
            world.parse_caption(prompt)
        except ValueError:
            raise LcmError(f"prompt of {path} is not a demo caption: {prompt!r}") from None
    model = load_classifier(classifier, device=device)
    images = load_images([p for p, _ in items])
    res = metrics.score(images, [p for _, p in items], model, refs_per_prompt=refs_per_prompt)
    res["refs_per_prompt"] = refs_per_prompt
    res["classifier"] = str(classifier or DEFAULT_PATH)
    res["classifier_heldout_acc"] = model.heldout_acc
    res["source"] = str(source)
    return res
