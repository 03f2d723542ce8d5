"""The demo world's training recipe: VAE -> SD-family and SDXL-family teachers -> style LoRAs and LCM-LoRAs.

`python tools/demo_models.py --stage all --out lcmtool/demo/assets` (what `make demo-models` runs) goes in three
waves: the VAE; both teachers; the style LoRAs and both LCM-LoRAs. On CUDA the stages of a wave run as parallel
processes (logs in --work), and `--waves 1,2` then `--waves 3` splits the recipe into two commands. Every stage is
seeded; steps, batch sizes and the GPU time budgets live in RECIPE below, the style LoRAs' in configs/finetune/.
Loss curves are saved as PNG beside the weights. On one H200 the three waves take ~100 s, ~180 s and ~270 s (the
shipped run, README); on our 2-core CPU the VAE and teachers are far too slow (see README).
The distillation of the demo LCM-LoRAs is `lcmtool distill --config configs/distill/demo-<fam>.yaml` and then
the LATER_STAGES, each from the LoRA before it: for demo-sd demo-sd-ceiling.yaml, full LCD of the whole UNet whose
change ships as an activation-calibrated SVD LoRA of ranks <= 32 in 2.45 MB; for demo-xl demo-xl-refine.yaml, a
LoRA at a fixed low w; both end in a weight search on the held-out hook (`scale_search`), which writes the best
weight of tau_LCM into the file. They run on the teachers written here (the `lcm` stage runs them all; on the
2-core CPU the first takes 28-41 minutes alone, each later one ~15-27).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lcmtool.demo import ASSETS, arch, world
from lcmtool.fileio import atomic_write_text
from lcmtool.outputs.plot import line_chart, smooth

REPO = Path(__file__).resolve().parent.parent  # the recipe lives in tools/, outside the runtime package

# On CUDA the VAE and the teachers are time-budgeted (budget_s, the wall time of their training loop on one H200):
# the teacher's cosine schedule is fitted to the budget (its decay completes), the VAE stops at the budget. The
# shipped weights are one `make demo-models` run on an H200 (2026-11-26): VAE 2,067 of 3,000 steps; teachers 1,849
# (demo-sd) and 1,789 (demo-xl) steps, in parallel; train.json beside each records what ran. On the CPU there is no
# budget (and the teachers would take many hours).
RECIPE = {
    # VAE: pixel L1 + MSE for colour fidelity, tiny KL as in SD's VAE (kl weight 1e-6)
    "vae": dict(steps=3000, batch=128, lr=1e-3, kl=1e-6, pool=40_000, seed=1, budget_s=60),
    # teachers: UNet + text encoder(s) from scratch on cached latents; 10% caption dropout for CFG.
    "teacher": dict(steps=7000, batch=512, lr=4e-4, te_lr=2e-4, warmup=300, ema=0.999, drop=0.1,
                    n_scenes=120_000, seed=2, budget_s=170),
}
# the whole recipe: VAE -> both teachers -> style LoRAs and both LCM-LoRAs
# The stages after stage 1 of each demo LCM-LoRA, in order, each from the LoRA before it (issue 13,
# docs/distill-recipe.md, fifth to eighth sessions): demo-sd's full-UNet run and its calibrated SVD extract (the 14
# LCM-LoRA kinds plus conv_in / conv_out / the time embedding) beat its LoRA stage 2 on the report seeds and on 480
# pool images (4-step FD-demo 32.9 vs 37.8, 26.3 vs 31.0); demo-xl's did not. A demo-xl stage 3 on teacher samples
# (configs/distill/demo-xl-teacher.yaml) was level with stage 2 over four seed sets and worse at 2 steps, so it is
# not in the chain.
LATER_STAGES = {"sd": ["demo-sd-ceiling"], "xl": ["demo-xl-refine"]}
WAVES = [["vae"], ["teacher-sd", "teacher-xl"], ["style-sd", "style-xl", "lcm-sd", "lcm-xl"]]
# The demo-xl style LoRAs are made at a CPU budget (an earlier `make paper` run made the shipped ones so on the
# 2-core CPU, a few minutes each; docs/results measures these), not configs/finetune's 800 x 256 (the demo-sd
# ones, made on an H200): 2,048 scenes, 120 steps x 32, 10 warm-up steps.
STYLE_XL_SETS = ["num_samples=2048", "max_steps=120", "batch_size=32", "warmup_steps=10"]


def log(msg: str) -> None:
    print(f"[demo-train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(total - warmup, 1)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def autocast(device: str):
    """bf16 autocast on CUDA; plain fp32 on the CPU."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def render_dataset(n: int, seed: int, split: str = "train", style: str = "solid", two_prob: float = 0.3):
    """n seeded random scenes and their captions (rendered later, in chunks, on the training device)."""
    rng = random.Random(seed)
    scenes = [world.sample_scene(rng, split=split, style=style, two_prob=two_prob) for _ in range(n)]
    return scenes, [world.caption(s) for s in scenes]


# ---------------------------------------------------------------- VAE
def train_vae(work: Path, device: str, max_seconds: float = 1e9):
    from diffusers import AutoencoderKL

    cfg = RECIPE["vae"]
    if device.startswith("cuda"):
        max_seconds = min(max_seconds, cfg["budget_s"])
    torch.manual_seed(cfg["seed"])
    rng = random.Random(cfg["seed"])
    vae = AutoencoderKL(**arch.VAE_CONFIG).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg["lr"], weight_decay=0.0)
    losses, t0 = [], time.time()
    # a pool of pre-rendered images over both splits and all styles (the VAE must draw every style)
    pool_scenes = [world.sample_scene(rng, split=rng.choice(["train", "heldout"]), style=rng.choice(world.STYLE_NAMES))
                   for _ in range(cfg["pool"])]
    pool = torch.cat([world.render(pool_scenes[i:i + 2048], device) for i in range(0, len(pool_scenes), 2048)])
    g = torch.Generator(device=device).manual_seed(cfg["seed"])
    for step in range(cfg["steps"]):
        x = pool[torch.randint(0, len(pool), (cfg["batch"],), device=device, generator=g)]
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, cfg["lr"], 200, cfg["steps"])
        post = vae.encode(x).latent_dist
        z = post.sample()
        rec = vae.decode(z).sample
        kl = post.kl().mean()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + cfg["kl"] * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 200 == 0:
            log(f"vae step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        if time.time() - t0 > max_seconds:
            log(f"vae: time budget reached at step {step}")
            break
    # scaling factor so that latents have unit variance, as SD's 0.18215 does for its VAE
    vae.eval()
    with torch.no_grad():
        scenes = [world.sample_scene(rng) for _ in range(min(512, cfg["pool"]))]
        z = vae.encode(world.render(scenes, device)).latent_dist.mode()
        sf = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=sf)
    vae.save_pretrained(work / "vae")
    line_chart({"vae loss": smooth(losses)}, work / "vae" / "loss.png", title="VAE training loss")
    info = dict(steps=len(losses), seconds=round(time.time() - t0, 1),
                recon_mse=recon_mse(vae, device, min(512, cfg["pool"])), scaling_factor=sf, device=device, recipe=cfg)
    atomic_write_text(work / "vae" / "train.json", json.dumps(info, indent=2))
    log(f"vae done: {info}")
    return info


def recon_mse(vae, device: str, n: int = 512, seed: int = 123) -> float:
    """Reconstruction MSE (pixels in [-1, 1]) of n random scenes of both splits and every style."""
    rng = random.Random(seed)
    scenes = [world.sample_scene(rng, split=rng.choice(["train", "heldout"]), style=rng.choice(world.STYLE_NAMES))
              for _ in range(n)]
    x = world.render(scenes, device)
    with torch.no_grad():
        return F.mse_loss(vae.decode(vae.encode(x).latent_dist.mode()).sample, x).item()


# ---------------------------------------------------------------- teachers
def encode_text(family: str, pipe, ids: torch.Tensor):
    """Prompt embeddings exactly as the diffusers pipelines compute them (with gradients).

    SD: last hidden state of the text encoder. SDXL: penultimate hidden states of both encoders
    concatenated, pooled text_embeds of the second.
    """
    if family == "sd":
        return pipe.text_encoder(ids)[0], None
    o1 = pipe.text_encoder(ids, output_hidden_states=True)
    o2 = pipe.text_encoder_2(ids, output_hidden_states=True)
    return torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1), o2[0]


def xl_time_ids(n: int, device) -> torch.Tensor:
    """(original size, crop top-left, target size): the demo renders at 64 px with no crop."""
    s = world.SIZE
    return torch.tensor([[s, s, 0, 0, s, s]], device=device, dtype=torch.float32).repeat(n, 1)


def cache_latents(vae, captions_scenes, tok, device, chunk: int = 1024):
    scenes, caps = captions_scenes
    lat = []
    with torch.no_grad():
        for i in range(0, len(scenes), chunk):
            x = world.render(scenes[i:i + chunk], device)
            lat.append(vae.encode(x).latent_dist.mode() * vae.config.scaling_factor)
    uniq = sorted(set(caps))  # a few thousand distinct captions: tokenize each once
    ids_u = tok(uniq, padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids
    where = {c: i for i, c in enumerate(uniq)}
    ids = ids_u[torch.tensor([where[c] for c in caps], dtype=torch.long)].to(device)
    return torch.cat(lat), ids


def train_teacher(family: str, out: Path, work: Path, device: str, max_seconds: float = 1e9):
    from diffusers import AutoencoderKL, DDPMScheduler

    cfg = RECIPE["teacher"]
    if device.startswith("cuda"):
        max_seconds = min(max_seconds, cfg["budget_s"])
    torch.manual_seed(cfg["seed"])
    pipe = arch.build_pipeline(family, seed=cfg["seed"])
    pipe.vae = AutoencoderKL.from_pretrained(work / "vae")
    pipe.to(device)
    tok = pipe.tokenizer
    log(f"{family}: rendering + encoding {cfg['n_scenes']} scenes")
    latents, ids = cache_latents(pipe.vae, render_dataset(cfg["n_scenes"], cfg["seed"]), tok, device)
    empty_ids = tok([""], padding="max_length", max_length=tok.model_max_length,
                    return_tensors="pt").input_ids.to(device)
    noise_sched = DDPMScheduler.from_config(arch.SD15_SCHEDULER)
    acp = noise_sched.alphas_cumprod.to(device)
    unet = pipe.unet
    tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "xl" else [])
    params_u = list(unet.parameters())
    params_t = [p for te in tes for p in te.parameters()]
    opt = torch.optim.AdamW([{"params": params_u, "lr": cfg["lr"]}, {"params": params_t, "lr": cfg["te_lr"]}],
                            weight_decay=1e-2)
    ema = [p.detach().clone() for p in params_u + params_t]
    unet.train()
    for te in tes:
        te.train()
    g = torch.Generator(device=device).manual_seed(cfg["seed"])
    losses, t0 = [], time.time()
    amp = autocast(device)
    n = latents.shape[0]
    total = cfg["steps"]
    step, t40 = 0, t0
    while step < total:
        if step == 40 and device.startswith("cuda"):
            # fit the schedule to the time budget: the cosine decay must reach its end, not be cut off
            per_step = (time.time() - t40) / 39
            total = min(total, int(0.97 * (max_seconds - (time.time() - t0)) / per_step) + step)
            log(f"{family}: {per_step * 1000:.1f} ms/step -> {total} steps")
        if step == 1:
            t40 = time.time()
        idx = torch.randint(0, n, (cfg["batch"],), device=device, generator=g)
        z0, tid = latents[idx], ids[idx]
        drop = torch.rand(cfg["batch"], device=device, generator=g) < cfg["drop"]
        if family == "sd":  # SD uses the empty prompt as the unconditional input
            tid = torch.where(drop[:, None], empty_ids.expand_as(tid), tid)
        noise = torch.randn(z0.shape, device=device, generator=g)
        t = torch.randint(0, 1000, (cfg["batch"],), device=device, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        for i, grp in enumerate(opt.param_groups):
            grp["lr"] = lr_at(step, cfg["lr"] if i == 0 else cfg["te_lr"], cfg["warmup"], total)
        with amp:
            emb, pooled = encode_text(family, pipe, tid)
            kw = {}
            if family == "xl":  # SDXL uses zeros as the unconditional input (force_zeros_for_empty_prompt)
                keep = (~drop).float()
                emb = emb * keep[:, None, None]
                pooled = pooled * keep[:, None]
                kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": xl_time_ids(len(t), device)}
            pred = unet(zt, t, emb, **kw).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params_u + params_t, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(cfg["ema"], (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params_u + params_t], 1 - d)
        if step % 100 == 0:
            losses.append(loss.item())
        if step % 500 == 0:
            log(f"{family} step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        step += 1
        if time.time() - t0 > max_seconds:
            log(f"{family}: time budget reached at step {step}")
            break
    with torch.no_grad():
        for p, e in zip(params_u + params_t, ema):
            p.copy_(e)
    name = f"demo-{family}"
    # UNet and VAE ship in fp16 (size budget; diffusers loads them as fp32 unless told otherwise); the text
    # encoders stay fp32 because transformers keeps the saved dtype and the pipeline's dtypes must agree.
    pipe.to("cpu", torch.float16)
    for te in tes:
        te.to(torch.float32)
    pipe.save_pretrained(out / name)
    line_chart({"loss (every 100 steps)": smooth(losses, 5)}, out / name / "loss.png", title=f"{name} teacher loss")
    info = dict(steps=step, seconds=round(time.time() - t0, 1), device=device,
                final_loss=sum(losses[-10:]) / max(len(losses[-10:]), 1), recipe=cfg)
    atomic_write_text(out / name / "train.json", json.dumps(info, indent=2))
    log(f"{family} teacher done: {info}")
    return info


# ---------------------------------------------------------------- style LoRAs
def train_style(family: str, style: str, out: Path, work: Path, device: str, quick: bool = False):
    """A style vector tau_style: `lcmtool finetune --config configs/finetune/demo-style-<style>.yaml` on the
    teacher (a rank-4 LoRA, plain denoising loss on styled renders with their trigger phrase)."""
    run = work / f"style-run-{style}-{family}"
    shipped = out.resolve() == ASSETS.resolve()
    teacher = f"demo:{family}" if shipped else str(out / f"demo-{family}")
    sets = ["device=" + device] + (STYLE_XL_SETS if family == "xl" else [])
    sets += ["max_steps=3", "batch_size=8", "num_samples=64"] if quick else []
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "lcmtool", "finetune", "--config",
                    str(REPO / f"configs/finetune/demo-style-{style}.yaml"), "--model", teacher, "--out", str(run)]
                   + [a for s in sets for a in ("--set", s)], check=True)
    shutil.copy(run / "lora.safetensors", out / f"style-{style}-demo-{family}.safetensors")
    shutil.copy(run / "loss.png", out / f"style-{style}-demo-{family}.loss.png")
    info = dict(seconds=round(time.time() - t0, 1), **json.loads((run / "summary.json").read_text()))
    log(f"style {style} {family} done: {info}")
    return info


def run_parallel(stages: list[str], common: list[str], work: Path, timings: dict) -> None:
    """Independent stages as concurrent subprocesses: the tiny models are launch-bound, so one GPU runs
    several at once at nearly full speed each. Each stage logs to WORK/<stage>.log."""
    procs = {}
    for st in stages:
        logf = open(work / f"{st}.log", "w")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", st, *common]
        # each stage leads its own process group, so stopping it also stops what it started (lcm: the distill)
        procs[st] = (subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True), logf,
                     time.time())
    failed = []
    try:
        log(f"running {', '.join(stages)} in parallel (logs in {work})")
        for st, (proc, logf, t) in procs.items():
            rc = proc.wait()
            logf.close()
            timings[st] = round(time.time() - t, 1)
            log(f"{st}: exit {rc} after {timings[st]:.0f} s")
            if rc:
                failed.append(st)
    except BaseException:  # Ctrl-C, SIGTERM (main turns it into SystemExit), or an error here: no orphans
        def signal_group(proc, sig):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)

        for proc, _f, _ in procs.values():
            signal_group(proc, signal.SIGTERM)
        for proc, logf, _ in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                signal_group(proc, signal.SIGKILL)
                proc.wait()
            logf.close()
        raise
    if failed:
        for st in failed:
            tail = (work / f"{st}.log").read_text(errors="replace").splitlines()[-15:]
            print(f"--- {st} (last lines of {work / (st + '.log')})", *tail, sep="\n", file=sys.stderr)
        raise SystemExit(f"demo-train: stage {', '.join(failed)} failed")


def run_stage(st: str, a, out: Path, work: Path, dev: str) -> None:
    if st == "vae":
        train_vae(work, dev, a.max_seconds)
        for art in ("train.json", "loss.png"):  # the VAE's record ships beside the weights (it lives in demo-*/vae)
            shutil.copy(work / "vae" / art, out / f"vae.{art}")
    elif st.startswith("teacher-"):
        train_teacher(st.split("-")[1], out, work, dev, a.max_seconds)
    elif st.startswith("style-"):
        for style in a.styles.split(","):
            train_style(st.split("-")[1], style, out, work, dev, a.quick)
    elif st.startswith("lcm-"):
        fam = st.split("-")[1]
        run = work / f"lcm-run-{fam}"
        # the shipped teacher is named by its spec (demo:sd), so the LoRA's metadata holds no local path
        shipped = out.resolve() == ASSETS.resolve()
        teacher = f"demo:{fam}" if shipped else str(out / f"demo-{fam}")
        # the distillations in order, each from the LoRA before it (configs/distill/demo-<fam>.yaml, then
        # LATER_STAGES[fam]): w in [2, 6.5], then a fixed low w, 2 for sd and 0.5 for xl (issue 13: the student's
        # FD-demo follows the guidance it is distilled at); sd's stage 2 trains the whole UNet and ships its SVD
        # extract
        last = None  # the run folder of the stage before
        for i, config in enumerate([f"demo-{fam}", *LATER_STAGES[fam]]):
            dst = run if i == 0 else work / f"lcm-run-{fam}-stage{i + 1}"
            init = ["--init-lora", str(last / "lcm-lora.safetensors")] if last else []
            subprocess.run([sys.executable, "-m", "lcmtool", "distill", "--config",
                            str(REPO / f"configs/distill/{config}.yaml"), "--model", teacher, "--out", str(dst),
                            "--set", f"device={dev}", *init]
                           + (["--set", f"max_steps={a.distill_steps}"] if a.distill_steps else []), check=True)
            last = dst
        shutil.copy(last / "lcm-lora.safetensors", out / f"lcm-lora-demo-{fam}.safetensors")
        for art in ("loss", "validation"):  # the curve and the LCM 1/2/4/8-step grid ship beside the LoRA
            if (last / f"{art}.png").exists():
                shutil.copy(last / f"{art}.png", out / f"lcm-lora-demo-{fam}.{art}.png")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--stage", default="all",
                    choices=["all", "vae", "teacher-sd", "teacher-xl", "style-sd", "style-xl", "lcm-sd", "lcm-xl"])
    ap.add_argument("--out", default=str(ASSETS))
    ap.add_argument("--work", default="runs/demo-train", help="intermediates: the fp32 VAE, distill runs, logs")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--distill-steps", type=int, default=None, help="lcm stages: override the config's max_steps")
    ap.add_argument("--styles", default="outline,striped", help="style stages: which style LoRAs to train")
    ap.add_argument("--quick", action="store_true", help="smoke test: a few steps of every stage")
    ap.add_argument("--max-seconds", type=float, default=1e9, help="stop a stage early (recorded in train.json)")
    ap.add_argument("--parallel", choices=["auto", "yes", "no"], default="auto",
                    help="--stage all: run independent stages concurrently (auto: on CUDA)")
    ap.add_argument("--waves", default="1,2,3",
                    help="--stage all: which waves to run (1 VAE, 2 teachers, 3 style + LCM LoRAs), e.g. '1,2' then "
                         "'3' where one command may not run as long as the whole recipe")
    a = ap.parse_args(argv)
    bad = [x for x in a.styles.split(",") if x not in world.STYLES or x == "solid"]
    if bad:
        ap.error(f"--styles: unknown style {bad[0]!r} (choose from {', '.join(world.STYLE_NAMES[1:])})")
    try:
        chosen = sorted({int(w) for w in a.waves.split(",")})
    except ValueError:
        chosen = []
    if not chosen or not all(1 <= w <= len(WAVES) for w in chosen):
        ap.error(f"--waves: expected numbers from 1 to {len(WAVES)} separated by commas, got {a.waves!r}")
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if dev.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if a.quick:
        for r in RECIPE.values():
            r.update(steps=3, batch=8, **{k: 64 for k in ("n_scenes", "pool") if k in r})
    if a.stage != "all":
        return run_stage(a.stage, a, out, work, dev)
    # a SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so run_parallel stops the stages it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    waves = [WAVES[w - 1] for w in chosen]
    parallel = a.parallel == "yes" or (a.parallel == "auto" and dev.startswith("cuda"))
    common = ["--out", str(out), "--work", str(work), "--device", dev, "--max-seconds", str(a.max_seconds)]
    common += (["--distill-steps", str(a.distill_steps)] if a.distill_steps else []) + (["--quick"] if a.quick else [])
    timings: dict[str, float] = {}
    t_all = time.time()
    for wave in waves:
        if parallel and len(wave) > 1:
            run_parallel(wave, common, work, timings)
            continue
        for st in wave:
            t = time.time()
            run_stage(st, a, out, work, dev)
            timings[st] = round(time.time() - t, 1)
    timings["total"] = round(time.time() - t_all, 1)
    info = dict(timings_s=timings, device=torch.cuda.get_device_name() if dev.startswith("cuda") else dev,
                parallel=parallel, quick=a.quick, waves=chosen)
    path = work / "timings.json"  # one entry per call: the waves may run as separate commands
    try:  # a missing, older-format or unreadable file starts the list afresh: the run's own record must land
        runs = list(json.loads(path.read_text())["runs"])
    except (OSError, ValueError, KeyError, TypeError):
        runs = []
    atomic_write_text(path, json.dumps(dict(runs=runs + [info]), indent=2))
    log(f"demo models done in {timings['total']:.0f} s: {info}")


if __name__ == "__main__":
    main()
