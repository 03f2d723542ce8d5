"""End-to-end distillation on the random-weight demo pipelines (CPU, a few steps each, tiny batches)."""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lcmtool.cli import app
from lcmtool.distill import lcd as lcd_mod
from lcmtool.engines.distill import DistillConfig, distill
from lcmtool.errors import LcmError

ROOT = Path(__file__).resolve().parents[1]


def cfg_for(teachers, cache, out, fam="sd", **kw):
    base = dict(model=str(teachers / fam), out=str(out), device="cpu", num_samples=8, batch_size=2, max_steps=4,
                lora_rank=4, lora_alpha=4, warmup_steps=1, lr=1e-3, checkpoint_every=0, validate_every=0,
                validation_steps=[1], validation_prompts=["a large red circle on the left"], log_every=1,
                cache_dir=str(cache), w_min=3.0 if fam == "xl" else 5.0)
    base.update(kw)
    return DistillConfig(**base)


def lora_of(ckpt: Path) -> list:
    return torch.load(ckpt / "training.pt", weights_only=True)["lora"]


def losses(out: Path) -> list[float]:
    """The logged losses (the held-out hook's records, which carry no loss, are skipped)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@contextlib.contextmanager
def raising_in_call(monkeypatch, n: int, exc):
    """The LCD loss raises `exc` in its n-th call (step n with grad_accum 1) inside the block."""
    real, calls = lcd_mod.distance, {"n": 0}

    def raising(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(lcd_mod, "distance", raising)
    try:
        yield
    finally:
        monkeypatch.setattr(lcd_mod, "distance", real)


def fixed_draw_loss(teacher: Path, cfg: DistillConfig, cache_root: str, lora: list | None) -> float:
    """The LCD loss of a LoRA (None: freshly initialised, B = 0) on 8 fixed (t, w, noise) draws of the cached data."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    from lcmtool.distill import lcd
    from lcmtool.distill.data import LatentCache
    from lcmtool.distill.student import lcd_pred_target

    unet = UNet2DConditionModel.from_pretrained(str(teacher / "unet"))
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=cfg.target_modules,
                                init_lora_weights="gaussian"))
    params = [p for p in unet.parameters() if p.requires_grad]
    if lora is not None:
        with torch.no_grad():
            for p, v in zip(params, lora, strict=True):
                p.copy_(v)
    abar = DDPMScheduler.from_pretrained(str(teacher / "scheduler")).alphas_cumprod.double()
    grid = lcd.SkippingGrid(abar)
    data = LatentCache(Path(cache_root), 0)
    b = data.batch(0, len(data))
    n = len(data)
    z, cond = b["latents"].float(), b["prompt_embeds"].float()
    unc = data.text["uncond_embeds"].float().expand_as(cond)
    added = added_u = None
    if "pooled_embeds" in b:
        added = {"text_embeds": b["pooled_embeds"].float(), "time_ids": b["geometry"]}
        added_u = {"text_embeds": data.text["uncond_pooled"].float().expand(n, -1), "time_ids": b["geometry"]}
    g = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        for _ in range(8):
            index = torch.randint(0, len(grid), (n,), generator=g)
            t, tp = grid.start_and_target_timesteps(index)
            w = lcd.sample_guidance(g, n, cfg.w_min, cfg.w_max)
            z_t = lcd.add_noise(z, torch.randn(z.shape, generator=g), t, abar)
            pred, target = lcd_pred_target(unet, unet, z_t, t, tp, index, w, cond, unc, added, added_u, grid, abar,
                                            "epsilon", 10.0, torch.no_grad)
            total += lcd.distance(pred, target, cfg.loss, cfg.huber_c).item() / 8
    return total


@pytest.mark.parametrize("fam", ["sd", "xl"])
def test_short_distill_lowers_loss_and_diffusers_loads_every_key(teachers, cache, tmp_path, fam):
    from diffusers import DiffusionPipeline
    from safetensors import safe_open

    cfg = cfg_for(teachers, cache, tmp_path, fam, max_steps=12, num_samples=4, batch_size=4, lr=2e-3)
    s = distill(cfg)
    before = fixed_draw_loss(teachers / fam, cfg, s["cache"], None)
    after = fixed_draw_loss(teachers / fam, cfg, s["cache"], lora_of(Path(s["checkpoint"])))
    assert after < 0.9 * before, (before, after)
    assert len(losses(tmp_path)) == 12
    assert s["format"] == "kohya" and s["family"] == ("sd15" if fam == "sd" else "sdxl")
    for f in ("lcm-lora.safetensors", "validation.png", "loss.png", "config.yaml", "summary.json"):
        assert (tmp_path / f).is_file(), f
    with safe_open(str(tmp_path / "lcm-lora.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float16 for k in keys if not k.endswith(".alpha"))
    n_modules = len({k.rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in keys})
    pipe = DiffusionPipeline.from_pretrained(str(teachers / fam))
    pipe.load_lora_weights(str(tmp_path / "lcm-lora.safetensors"), adapter_name="lcm")
    loaded = {n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "lcm" in m.lora_A}
    assert len(loaded) == n_modules and len(keys) == 3 * n_modules  # every key used (A, B, alpha per module)


def test_tensorboard_scalars_match_metrics_jsonl(teachers, cache, tmp_path):
    """report_to tensorboard: accelerate's tracker writes <out>/tensorboard with the same losses as metrics.jsonl."""
    pytest.importorskip("tensorboard")  # a dev dependency (pyproject), so CI runs this
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    distill(cfg_for(teachers, cache, tmp_path, max_steps=3, report_to="tensorboard"))
    runs = list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert runs, "no TensorBoard event file"
    acc = EventAccumulator(str(runs[0].parent))
    acc.Reload()
    tb = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert [s for s, _ in tb] == [1, 2, 3]
    assert [v for _, v in tb] == pytest.approx(losses(tmp_path), rel=1e-6)


def test_tensorboard_required_but_missing_is_a_clear_error(teachers, cache, tmp_path, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    with pytest.raises(LcmError, match="tensorboard package"):
        distill(cfg_for(teachers, cache, tmp_path / "run", report_to="tensorboard"))
    assert not (tmp_path / "run").exists()
    s = distill(cfg_for(teachers, cache, tmp_path / "auto", max_steps=1))  # auto: no TensorBoard, no error
    assert s["steps"] == 1 and not (tmp_path / "auto" / "tensorboard").exists()


def test_resume_matches_straight_run_after_interrupt(teachers, cache, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    distill(cfg_for(teachers, cache, straight, max_steps=4))
    # Ctrl-C during step 3: a checkpoint at step 2 is written, then `--resume latest` runs steps 3..4
    resumed = tmp_path / "resumed"
    with raising_in_call(monkeypatch, 3, KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
        distill(cfg_for(teachers, cache, resumed, max_steps=4))
    ck = resumed / "checkpoints" / "step-0000002"
    assert json.loads((ck / "trainer_state.json").read_text())["reason"] == "interrupted"
    assert not (resumed / "lcm-lora.safetensors").exists()
    # a checkpoint resumed with another LoRA shape is one clear error, not a crash inside copy_
    with pytest.raises(LcmError, match="lora_rank"):
        distill(cfg_for(teachers, cache, resumed, max_steps=4, resume="latest", lora_rank=2))
    distill(cfg_for(teachers, cache, resumed, max_steps=4, resume="latest"))
    a, b = lora_of(straight / "checkpoints" / "step-0000004"), lora_of(resumed / "checkpoints" / "step-0000004")
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert losses(straight) == pytest.approx(losses(resumed), rel=0, abs=0)


def test_non_finite_loss_stops_with_last_good_checkpoint(teachers, cache, tmp_path, monkeypatch):
    real = lcd_mod.distance
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(lcd_mod, "distance", poisoned)
    with pytest.raises(LcmError, match="non-finite loss .* at step 3.*step-0000002"):
        distill(cfg_for(teachers, cache, tmp_path, max_steps=4, checkpoint_every=2))
    ck = tmp_path / "checkpoints" / "step-0000002"
    assert all(torch.isfinite(t).all() for t in lora_of(ck))
    assert not (tmp_path / "lcm-lora.safetensors").exists()


def _png(path: Path, color=(200, 30, 30), size=(80, 72)):
    from PIL import Image

    Image.new("RGB", size, color).save(path)


def test_cli_bad_inputs_exit_2(teachers, cache, tmp_path):
    runner = CliRunner()
    base = ["distill", "--config", str(ROOT / "configs/distill/demo-sd.yaml"), "--model", str(teachers / "sd"),
            "--set", "device=cpu", "--set", f"cache_dir={cache}", "--out", str(tmp_path / "o")]
    empty = tmp_path / "empty"
    empty.mkdir()
    nocap = tmp_path / "nocap"
    nocap.mkdir()
    _png(nocap / "a.png")
    cases = {
        "no images": (["--data", str(empty)], "no images"),
        "missing captions": (["--data", str(nocap)], "no caption"),
        "missing folder": (["--data", str(tmp_path / "nope")], "not found"),
        "wrong family": (["--set", "family=sdxl", "--set", "num_samples=4"], "sdxl family"),
        "bad resume": (["--resume", str(tmp_path), "--set", "num_samples=4"], "not a distill checkpoint"),
        "bad key": (["--set", "lora_rnk=4"], "unknown config key"),
    }
    for name, (extra, msg) in cases.items():
        r = runner.invoke(app, base + extra)
        assert r.exit_code == 2, (name, r.output)
        last = r.output.strip().splitlines()[-1]  # (above it: only diffusers' own loading bars)
        assert last.startswith("error:") and msg in last, (name, r.output)
        if name in ("no images", "missing captions", "missing folder", "wrong family"):
            assert not (tmp_path / "o").exists(), name  # nothing written before the inputs are checked


def test_folder_with_corrupt_images_and_webdataset(teachers, cache, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        _png(folder / f"{i}.png", (60 * i, 20, 200))
        (folder / f"{i}.txt").write_text(f"a small red circle number {i}")
    (folder / "bad.png").write_bytes(b"not a png at all")
    (folder / "bad.txt").write_text("broken")
    s = distill(cfg_for(teachers, cache, tmp_path / "o1", data=str(folder), max_steps=2))
    assert s["skipped_images"] == 1 and s["samples_cached"] == 4
    # the same images as a WebDataset shard (json captions), read through a glob
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tf:
        for i in range(3):
            for ext, data in (("png", (folder / f"{i}.png").read_bytes()),
                              ("json", json.dumps({"caption": f"a large blue square {i}"}).encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    s = distill(cfg_for(teachers, cache, tmp_path / "o2", data=str(tmp_path / "shard-*.tar"), max_steps=2))
    assert s["samples_cached"] == 3 and s["skipped_images"] == 0


def test_two_process_gloo_run_ends_with_identical_weights(teachers, cache, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "lcmtool", "distill", "--config", str(ROOT / "configs/distill/demo-sd.yaml"),
           "--model", str(teachers / "sd"), "--out", str(tmp_path / "ddp"), "--json"]
    for kv in ("device=cpu", f"cache_dir={cache}", "num_samples=8", "batch_size=2", "max_steps=2", "lora_rank=4",
               "lora_alpha=4", "conv_rank=0", "validation_steps=[1]", "validation_prompts=[a red circle]"):
        cmd += ["--set", kv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1 and lines[0]["world_size"] == 2
    sums = lines[0]["rank_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1] and sums[0][0] != 0


def _distill_cmd(teachers, cache, out, nproc: int, port: int, *sets: str) -> list[str]:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(port)] if nproc > 1 else [sys.executable])
    cmd = launch + ["-m", "lcmtool", "distill", "--config", str(ROOT / "configs/distill/demo-sd.yaml"),
                    "--model", str(teachers / "sd"), "--out", str(out), "--json"]
    for kv in ("device=cpu", f"cache_dir={cache}", "num_samples=8", "batch_size=2", "lora_rank=4", "lora_alpha=4",
               "conv_rank=0", "validation_steps=[1]", "validation_prompts=[a red circle]", "log_every=1",
               "checkpoint_every=0", "validate_every=0") + sets:
        cmd += ["--set", kv]
    return cmd


def _interrupt_once_running(cmd: list[str], out: Path, min_step: int = 2) -> subprocess.CompletedProcess:
    """Start cmd in its own session, send SIGINT to the whole group (a terminal's Ctrl-C) once the run has logged
    min_step steps, and wait for it to exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    deadline = time.time() + 200
    while time.time() < deadline and p.poll() is None:
        m = out / "metrics.jsonl"
        if m.is_file() and len(m.read_text().splitlines()) >= min_step:
            break
        time.sleep(0.2)
    if p.poll() is not None:
        raise AssertionError(f"the run ended before it could be interrupted: {p.communicate()[1][-3000:]}")
    os.killpg(p.pid, signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)


@pytest.mark.parametrize("nproc", [1, 2])
def test_ctrl_c_writes_checkpoint_on_every_rank_layout_and_resume_finishes(teachers, cache, tmp_path, nproc):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it; torchrun forwards it once more) stops after a
    whole step with an 'interrupted' checkpoint; --resume latest then finishes with identical weights per rank."""
    out = tmp_path / "run"
    r = _interrupt_once_running(_distill_cmd(teachers, cache, out, nproc, 29520 + nproc, "max_steps=100000"), out)
    assert r.returncode != 0 and not (out / "lcm-lora.safetensors").exists(), r.stderr[-2000:]
    if nproc == 1:
        assert r.returncode == 130 and "interrupted at step" in r.stderr
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert ckpts, r.stderr[-3000:]
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    assert state["reason"] == "interrupted" and state["world_size"] == nproc and state["step"] >= 2
    done = subprocess.run(_distill_cmd(teachers, cache, out, nproc, 29530 + nproc, f"max_steps={state['step'] + 1}",
                                       "resume=latest"), capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")][-1]
    assert summary["steps"] == state["step"] + 1 and len(set(map(tuple, summary["rank_checksums"]))) == 1
