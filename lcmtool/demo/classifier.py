"""The demo judge: a small CNN that reads a 64x64 demo image position by position.

For each of the 5 positions (world.POSITION_NAMES) it predicts shape-or-empty, colour and size; for the image
it predicts the style. Its penultimate features are the feature space of FD-demo (eval/metrics.py).
Trained on freshly rendered scenes of BOTH splits (the held-out shape-colour pairs concern the diffusion
models only; the judge must know every combination), all styles, 1-2 objects, with mild augmentation
(noise, blur, colour jitter, +-2 px shifts) so that it reads generated images too.
"""
from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lcmtool.demo import world
from lcmtool.errors import LcmError

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "demo" / "assets" / "classifier.safetensors"
SHAPE_CLASSES = ["empty"] + world.SHAPES  # index 0 = nothing at this position
COLOR_CLASSES = world.COLOR_NAMES
SIZE_CLASSES = world.SIZE_NAMES
STYLE_CLASSES = world.STYLE_NAMES
POSITIONS = world.POSITION_NAMES
N_POS = len(POSITIONS)
FORMAT = "lcmtool-demo-classifier"
IGNORE = -100  # colour/size targets at empty positions


class DemoClassifier(nn.Module):
    """5 conv blocks (64 -> 4 px, keeps the layout), one FC to `dim` features, linear heads (~240k params)."""

    def __init__(self, width: int = 16, dim: int = 128):
        super().__init__()
        self.config = {"width": width, "dim": dim}
        chans = [3, width, 2 * width, 4 * width, 4 * width, 4 * width]
        layers = []
        for i in range(5):  # first conv keeps full resolution: stripes and outlines are 1-3 px wide
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1] * 4 * 4, dim), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({
            "shape": nn.Linear(dim, N_POS * len(SHAPE_CLASSES)),
            "color": nn.Linear(dim, N_POS * len(COLOR_CLASSES)),
            "size": nn.Linear(dim, N_POS * len(SIZE_CLASSES)),
            "style": nn.Linear(dim, len(STYLE_CLASSES)),
        })

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # 64 -> 32 -> 16 -> 8 -> 4 after the stride-2 convs (the first conv is stride 1)
        return self.fc(self.convs(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        f = self.features(x)
        n = x.shape[0]
        logits = {k: h(f).view(n, N_POS, -1) for k, h in self.heads.items() if k != "style"}
        logits["style"] = self.heads["style"](f)
        return f, logits


# ---- labels and augmentation ----

def targets(scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    """Per-position class indices (shape 0 = empty; colour/size IGNORE where empty) and the style index."""
    n = len(scenes)
    shape = torch.zeros(n, N_POS, dtype=torch.long)
    color = torch.full((n, N_POS), IGNORE, dtype=torch.long)
    size = torch.full((n, N_POS), IGNORE, dtype=torch.long)
    for i, sc in enumerate(scenes):
        for o in sc.objs:
            p = POSITIONS.index(o.position)
            shape[i, p] = SHAPE_CLASSES.index(o.shape)
            color[i, p] = COLOR_CLASSES.index(o.color)
            size[i, p] = SIZE_CLASSES.index(o.size)
    style = torch.tensor([STYLE_CLASSES.index(sc.style) for sc in scenes], dtype=torch.long)
    return {"shape": shape, "color": color, "size": size, "style": style}


def random_scenes(rng: random.Random, n: int) -> list[world.Scene]:
    """Both splits (1 in 4 scenes from the held-out pairs), all styles, 1-2 objects."""
    return [world.sample_scene(rng, "heldout" if rng.random() < 0.25 else "train",
                               style=rng.choice(STYLE_CLASSES), two_prob=0.5) for _ in range(n)]


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = torch.exp(-torch.arange(-1, 2, dtype=x.dtype, device=x.device) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    k2 = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2, groups=3)


def augment(x: torch.Tensor, g: torch.Generator, p: float = 0.8) -> torch.Tensor:
    """Mild, generated-image-like corruption on a fraction p of the batch: shift, blur, colour, noise."""
    n, dev = x.shape[0], x.device

    def u(*shape, lo=0.0, hi=1.0):
        return torch.rand(*shape, generator=g).to(dev) * (hi - lo) + lo

    on = (u(n) < p).float().view(n, 1, 1, 1)
    # 1. +-2 px shifts (replicate padding: the background continues)
    shifts = torch.randint(-2, 3, (n, 2), generator=g).tolist()
    xp = F.pad(x, (2, 2, 2, 2), mode="replicate")
    y = torch.stack([xp[i, :, 2 + dy: 2 + dy + world.SIZE, 2 + dx: 2 + dx + world.SIZE]
                     for i, (dx, dy) in enumerate(shifts)])
    # 2. slight blur: a per-image blend with a 3x3 gaussian (sigma 0.8)
    y = torch.lerp(y, _blur(y, 0.8), u(n, 1, 1, 1))
    # 3. small colour jitter: saturation 0.8-1.05, per-channel gain +-6 %, offset +-0.06
    grey = y.mean(1, keepdim=True)
    y = grey + (y - grey) * u(n, 1, 1, 1, lo=0.8, hi=1.05)
    y = y * u(n, 3, 1, 1, lo=0.94, hi=1.06) + u(n, 3, 1, 1, lo=-0.06, hi=0.06)
    # 4. small gaussian noise, sigma up to 0.05
    y = y + torch.randn(y.shape, generator=g).to(dev) * u(n, 1, 1, 1, hi=0.05)
    return (on * y + (1 - on) * x).clamp(-1, 1)


# ---- inference ----

@contextlib.contextmanager
def one_thread(device: str | torch.device = "cpu"):
    """Single-threaded torch on CPU: world.render's many small ops (and this small CNN) crawl when two
    OpenMP threads compete with other processes for the cores (0.15 s vs 8 s for 128 renders on our shared
    2-core machine); one thread also makes CPU results independent of the core count."""
    if torch.device(device).type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def render(scenes: list[world.Scene], device: str | torch.device = "cpu") -> torch.Tensor:
    """world.render under one_thread."""
    with one_thread(device):
        return world.render(scenes, device=device)


@torch.no_grad()
def _run(model: DemoClassifier, images: torch.Tensor, chunk: int = 256):
    dev = next(model.parameters()).device
    feats, logits = [], {}
    with one_thread(dev):
        for i in range(0, images.shape[0], chunk):
            f, lg = model(images[i: i + chunk].to(dev, torch.float32))
            feats.append(f.cpu())
            for k, v in lg.items():
                logits.setdefault(k, []).append(v.cpu())
    return torch.cat(feats), {k: torch.cat(v) for k, v in logits.items()}


def features(model: DemoClassifier, images: torch.Tensor) -> torch.Tensor:
    """Penultimate features [N, dim] (float32, CPU) of images [N, 3, 64, 64] in [-1, 1]."""
    model.eval()
    return _run(model, images)[0]


def predict(model: DemoClassifier, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Class indices: shape/color/size [N, 5] (positions in world.POSITION_NAMES order; shape 0 = empty,
    index lists SHAPE_CLASSES / COLOR_CLASSES / SIZE_CLASSES), style [N] (STYLE_CLASSES)."""
    return features_and_predict(model, images)[1]


def features_and_predict(model: DemoClassifier, images: torch.Tensor):
    """`features` and `predict` of the same images from one pass of the model."""
    model.eval()
    feats, logits = _run(model, images)
    return feats, {k: v.argmax(-1) for k, v in logits.items()}


def decode(pred: dict[str, torch.Tensor], i: int) -> tuple[dict[str, tuple[str, str, str]], str]:
    """Image i's predictions as names: ({position: (shape, colour, size)} for non-empty positions, style)."""
    objs = {}
    for p, pos in enumerate(POSITIONS):
        s = int(pred["shape"][i, p])
        if s:
            objs[pos] = (SHAPE_CLASSES[s], COLOR_CLASSES[int(pred["color"][i, p])],
                         SIZE_CLASSES[int(pred["size"][i, p])])
    return objs, STYLE_CLASSES[int(pred["style"][i])]


def accuracy(pred: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per attribute: shape/colour/size per object (at its true position), position per image (the set of
    non-empty positions is exact), style per image."""
    obj = tgt["shape"] > 0
    return {
        "shape": (pred["shape"] == tgt["shape"])[obj].float().mean().item(),
        "color": (pred["color"] == tgt["color"])[obj].float().mean().item(),
        "size": (pred["size"] == tgt["size"])[obj].float().mean().item(),
        "position": ((pred["shape"] > 0) == obj).all(1).float().mean().item(),
        "style": (pred["style"] == tgt["style"]).float().mean().item(),
    }


def heldout_accuracy(model: DemoClassifier, n: int = 1024, seed: int = 12345, device: str = "cpu"):
    """Accuracy on freshly rendered held-out-pair scenes (all styles, 1-2 objects, jitter) from `seed`."""
    rng = random.Random(seed)
    scenes = [world.sample_scene(rng, "heldout", style=rng.choice(STYLE_CLASSES), two_prob=0.5)
              for _ in range(n)]
    return accuracy(predict(model, render(scenes, device=device)), targets(scenes))


# ---- training, saving, loading ----

def _loss(logits: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = F.cross_entropy(logits["style"], tgt["style"])
    for k in ("shape", "color", "size"):
        loss = loss + F.cross_entropy(logits[k].flatten(0, 1), tgt[k].flatten(), ignore_index=IGNORE)
    return loss


def train_classifier(out_path: str, steps: int = 3000, batch: int = 256, device: str = "cpu", seed: int = 0,
                     log=print, lr: float = 3e-3, eval_n: int = 1024) -> dict:
    """Train on fresh renders (AdamW, one-cycle LR), write weights + metadata atomically, return accuracies.

    Deterministic for a seed on CPU (runs single-threaded there). The held-out accuracy is measured on
    freshly rendered held-out-pair scenes from another seed (heldout_accuracy).
    """
    with one_thread(device):  # on CPU: deterministic whatever the core count, and faster on shared cores
        return _train(out_path, steps, batch, device, seed, log, lr, eval_n)


def _train(out_path, steps, batch, device, seed, log, lr, eval_n) -> dict:
    from safetensors.torch import save_file

    from lcmtool.fileio import atomic_path

    t0 = time.time()
    torch.manual_seed(seed)
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    model = DemoClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for step in range(1, steps + 1):
        scenes = random_scenes(rng, batch)
        x = augment(world.render(scenes, device=device), g)
        tgt = {k: v.to(device) for k, v in targets(scenes).items()}
        _, logits = model(x)
        loss = _loss(logits, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps:
            log(f"classifier step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    model.eval()
    acc = heldout_accuracy(model, n=eval_n, seed=seed + 12345, device=device)
    seconds = time.time() - t0
    log("classifier held-out accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    meta = {"format": FORMAT, "config": json.dumps(model.config), "heldout_acc": json.dumps(acc),
            "heldout_n": str(eval_n), "steps": str(steps), "batch": str(batch), "seed": str(seed),
            "seconds": f"{seconds:.1f}", "device": str(device), "torch": torch.__version__,
            "produced_by": "lcmtool.demo.classifier.train_classifier"}
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    with atomic_path(out_path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return {"heldout_acc": acc, "steps": steps, "seconds": seconds}


def classifier_metadata(path: str | Path | None = None) -> dict:
    """The classifier file's metadata, JSON fields decoded (heldout_acc, config)."""
    from safetensors import safe_open

    path = Path(path) if path else DEFAULT_PATH
    if not path.is_file():
        raise LcmError(f"classifier weights not found: {path} (train them with train_classifier)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
        raise LcmError(f"not a safetensors file: {path} ({e})") from None
    if meta.get("format") != FORMAT:
        raise LcmError(f"{path} is not a demo classifier (metadata format {meta.get('format')!r})")
    for k in ("config", "heldout_acc"):
        meta[k] = json.loads(meta.get(k, "{}"))
    return meta


def load_classifier(path: str | Path | None = None, device: str = "cpu") -> DemoClassifier:
    """Load the shipped (default) or given classifier, in eval mode; LcmError if missing or not one."""
    from safetensors.torch import load_file

    path = Path(path) if path else DEFAULT_PATH
    meta = classifier_metadata(path)
    model = DemoClassifier(**meta["config"])
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise LcmError(f"classifier {path} does not match the architecture (missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]})")
    model.heldout_acc = meta["heldout_acc"]
    return model.to(device).eval()
