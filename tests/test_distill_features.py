"""Issue 13's engine features on the tiny demo teachers (CPU, a few steps): full LCD (lora_rank 0) with an SVD
LoRA extract, init_lora, the lr schedules, and the held-out validation hook with its best checkpoint."""
import copy
import json
import math
from pathlib import Path

import pytest
import test_distill_run as base
import torch

from lcmtool.distill import lcd as lcd_mod
from lcmtool.distill import student
from lcmtool.engines import distill_eval
from lcmtool.engines.distill import distill
from lcmtool.lora.io import load_lora

cfg_for, lora_of = base.cfg_for, base.lora_of
SHIPPED_SD = Path(__file__).resolve().parents[1] / "lcmtool" / "demo" / "assets" / "lcm-lora-demo-sd.safetensors"


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def fixed_draw_loss_full(teacher_unet, student_unet, cfg, cache_root: str) -> float:
    """The LCD loss of a whole student UNet against the frozen teacher on 8 fixed (t, w, noise) draws."""
    from diffusers import DDPMScheduler

    from lcmtool.distill.data import LatentCache

    abar = DDPMScheduler.from_pretrained(str(Path(cfg.model) / "scheduler")).alphas_cumprod.double()
    grid = lcd_mod.SkippingGrid(abar)
    data = LatentCache(Path(cache_root), 0)
    b = data.batch(0, len(data))
    z, cond = b["latents"].float(), b["prompt_embeds"].float()
    unc = data.text["uncond_embeds"].float().expand_as(cond)
    g = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        for _ in range(8):
            index, t, tp, w, noise = lcd_mod.draw(g, grid, z.shape, cfg.w_min, cfg.w_max)
            z_t = lcd_mod.add_noise(z, noise, t, abar)
            pred, target = student.lcd_pred_target(student_unet, student_unet, z_t, t, tp, index, w, cond, unc, None,
                                                   None, grid, abar, "epsilon", 10.0, torch.no_grad,
                                                   teacher=teacher_unet)
            total += lcd_mod.distance(pred, target, cfg.loss, cfg.huber_c).item() / 8
    return total


def test_full_lcd_lowers_the_loss_saves_a_diffusers_unet_and_an_exact_extract(teachers, cache, tmp_path):
    """lora_rank 0: the whole UNet trains against a frozen copy; unet/ loads with diffusers and distils better than
    the teacher itself; a full-rank extract_rank LoRA fused into the teacher gives the student's targeted weights."""
    from diffusers import UNet2DConditionModel

    from lcmtool.lora.fuse import fuse_into_unet

    cfg = cfg_for(teachers, cache, tmp_path, lora_rank=0, extract_rank=4096, max_steps=12, num_samples=4,
                  batch_size=4, lr=2e-4, save_dtype="fp32")
    s = distill(cfg)
    assert s["full"] and Path(s["unet"], "config.json").is_file()
    trained = UNet2DConditionModel.from_pretrained(s["unet"])
    teacher = UNet2DConditionModel.from_pretrained(str(teachers / "sd" / "unet"))
    before = fixed_draw_loss_full(teacher, copy.deepcopy(teacher), cfg, s["cache"])
    after = fixed_draw_loss_full(teacher, trained, cfg, s["cache"])
    assert after < 0.9 * before, (before, after)
    losses = [r["loss"] for r in records(tmp_path)]
    assert len(losses) == 12
    # the extract: exact at full rank for every targeted Linear / Conv2d weight
    lf = load_lora(s["lora"])
    fused = copy.deepcopy(teacher)
    fuse_into_unet(fused, [(lf, 1.0)])
    f_mods, t_mods = dict(fused.named_modules()), dict(trained.named_modules())
    changed = 0
    for name, mod in teacher.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and student.targeted(name, cfg.target_modules):
            err = (f_mods[name].weight - t_mods[name].weight).abs().max().item()
            assert err < 1e-5, (name, err)
            changed += name in lf.modules
    assert changed == len(lf.modules) > 50


@pytest.mark.parametrize("fam", ["sd", "xl"])
def test_full_lcd_extract_of_the_embedding_layers_is_what_diffusers_loads(teachers, cache, tmp_path, fam):
    """target_modules with EMBED_TARGETS (the demo-sd stage 2): the extract holds conv_in / conv_out / the timestep
    MLP under the names kohya tools write, every key of it loads in diffusers' load_lora_weights, and its fuse_lora
    gives the weights our fuse gives, which are the trained UNet's (full rank)."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    from safetensors import safe_open

    from lcmtool.lora.formats import EMBED_TARGETS, LCM_TARGETS
    from lcmtool.lora.fuse import fuse_into_unet

    cfg = cfg_for(teachers, cache, tmp_path, fam, lora_rank=0, extract_rank=4096, max_steps=2, num_samples=4,
                  batch_size=4, lr=2e-4, save_dtype="fp32", target_modules=list(LCM_TARGETS + EMBED_TARGETS))
    s = distill(cfg)
    lf = load_lora(s["lora"])
    embed = set(EMBED_TARGETS)
    assert embed <= set(lf.modules)
    with safe_open(s["lora"], "pt") as f:  # the tiny demo-xl is not SDXL's block layout, so diffusers names here
        stems = {k.split(".")[0] for k in f.keys()}
    assert {"lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding_linear_1",
            "lora_unet_time_embedding_linear_2"} <= stems, sorted(stems)[:8]
    trained = UNet2DConditionModel.from_pretrained(s["unet"])
    ours = UNet2DConditionModel.from_pretrained(str(teachers / fam / "unet"))
    fuse_into_unet(ours, [(lf, 1.0)])
    pipe = DiffusionPipeline.from_pretrained(str(teachers / fam))
    pipe.load_lora_weights(s["lora"], adapter_name="lcm")
    loaded = {n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "lcm" in m.lora_A}
    assert loaded == set(lf.modules)  # every module of the file, and nothing else
    pipe.fuse_lora(lora_scale=1.0)
    theirs, ours_m = dict(pipe.unet.named_modules()), dict(ours.named_modules())
    trained_m = dict(trained.named_modules())
    for name in lf.modules:
        w = getattr(theirs[name], "base_layer", theirs[name]).weight
        assert (w - ours_m[name].weight).abs().max().item() < 1e-5, name
        assert (ours_m[name].weight - trained_m[name].weight).abs().max().item() < 1e-5, name
    for name in embed:  # the embedding layers did train, so the test sees their delta
        assert lf.modules[name].delta().abs().max().item() > 1e-7, name


def test_embedding_targets_have_the_sgm_names_kohya_writes_and_diffusers_maps():
    """On the real SDXL layout EMBED_TARGETS are written with kohya's SGM names, read back, and diffusers' kohya
    key converter maps both spellings (SGM and diffusers-named) to the same module path."""
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key

    from lcmtool.lora import formats
    from lcmtool.lora.io import unet_preset

    conf = unet_preset("sdxl")
    sgm = {p: formats.from_canonical(p, "kohya-sgm", "sdxl", conf) for p in formats.EMBED_TARGETS}
    assert sgm == {"conv_in": "lora_unet_input_blocks_0_0", "conv_out": "lora_unet_out_2",
                   "time_embedding.linear_1": "lora_unet_time_embed_0",
                   "time_embedding.linear_2": "lora_unet_time_embed_2"}
    for p, stem in sgm.items():
        flat = formats.from_canonical(p, "kohya", "sd15")
        assert formats.to_canonical(stem, "kohya-sgm", conf) == formats.to_canonical(flat, "kohya") == p
        assert _convert_unet_lora_key(stem) == _convert_unet_lora_key(flat) == p


def test_extract_ranks_per_kind_and_by_frobenius_norm_kept():
    """extract_lora's conv_rank caps 3x3 convs only; fro picks each module's smallest rank keeping that fraction of
    the change's Frobenius norm (closed form on known singular values), never above the cap."""
    g = torch.Generator().manual_seed(0)

    def with_singular_values(out, inp, sv):
        u, _ = torch.linalg.qr(torch.randn(out, len(sv), generator=g))
        v, _ = torch.linalg.qr(torch.randn(inp, len(sv), generator=g))
        return u @ torch.diag(torch.tensor(sv)) @ v.T

    teacher = torch.nn.Module()
    teacher.to_q, teacher.conv1, teacher.conv_shortcut = (torch.nn.Linear(16, 12), torch.nn.Conv2d(4, 10, 3),
                                                         torch.nn.Conv2d(4, 10, 1))
    trained = copy.deepcopy(teacher)
    sv = [3.0, 2.0, 1.0, 0.5, 0.25, 0.1]
    with torch.no_grad():
        trained.to_q.weight += with_singular_values(12, 16, sv)
        trained.conv1.weight += with_singular_values(10, 36, sv).reshape(10, 4, 3, 3)
        trained.conv_shortcut.weight += with_singular_values(10, 4, sv[:4]).reshape(10, 4, 1, 1)
    targets = ["to_q", "conv1", "conv_shortcut"]
    mods, _ = student.extract_lora(trained, teacher, targets, 5, conv_rank=2)
    assert {n: m.rank for n, m in mods.items()} == {"to_q": 5, "conv1": 2, "conv_shortcut": 4}  # 1x1: not a conv
    # sqrt of the kept share of sum sigma^2 = 14.3225: k = 2 keeps sqrt(13 / 14.3225) = 0.953, k = 3 keeps 0.991
    for fro, want in ((0.95, 2), (0.96, 3), (0.991, 4), (0.9999, 6)):
        assert student.fro_rank(trained.to_q.weight - teacher.to_q.weight, fro) == want, fro
    mods, err = student.extract_lora(trained, teacher, targets, 5, fro=0.96)
    assert {n: m.rank for n, m in mods.items()} == {"to_q": 3, "conv1": 3, "conv_shortcut": 3}
    assert err == pytest.approx(math.sqrt((0.25 + 0.0625 + 0.01) / 14.3225), rel=1e-4)  # to_q / conv1 at rank 3
    mods, _ = student.extract_lora(trained, teacher, targets, 5, conv_rank=2, fro=0.991)
    # conv_shortcut's sigma are 3, 2, 1, 0.5: rank 3 keeps sqrt(14 / 14.25) = 0.9912
    assert {n: m.rank for n, m in mods.items()} == {"to_q": 4, "conv1": 2, "conv_shortcut": 3}


def test_full_lcd_resume_is_bit_identical(teachers, cache, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    distill(cfg_for(teachers, cache, straight, lora_rank=0, max_steps=3, lr=1e-4))
    with base.raising_in_call(monkeypatch, 3, KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
        distill(cfg_for(teachers, cache, tmp_path / "resumed", lora_rank=0, max_steps=3, lr=1e-4))
    distill(cfg_for(teachers, cache, tmp_path / "resumed", lora_rank=0, max_steps=3, lr=1e-4, resume="latest"))
    a, b = lora_of(straight / "checkpoints" / "step-0000003"), lora_of(tmp_path / "resumed" / "checkpoints" /
                                                                        "step-0000003")
    assert len(a) == len(b) > 100 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_init_lora_step_0_student_is_base_plus_delta(teachers):
    """The shipped demo LCM-LoRA (kohya; an SVD extract with per-module ranks 4-32, conv_in / conv_out / time
    embedding included) loaded into peft layers: the student's output equals the base UNet with the file's delta
    fused in, within 1e-5."""
    from diffusers import UNet2DConditionModel

    from lcmtool.lora.fuse import fuse_into_unet

    lf = load_lora(SHIPPED_SD)
    unet = UNet2DConditionModel.from_pretrained(str(teachers / "sd" / "unet"))
    fused = copy.deepcopy(unet)
    fuse_into_unet(fused, [(lf, 1.0)])
    unet.requires_grad_(False)
    params = student.add_lora_from(unet, lf)
    assert len(params) == 2 * len(lf.modules)
    assert len({m.rank for m in lf.modules.values()}) > 5  # mixed ranks: rank_pattern is exercised
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g)
    cond = torch.randn(2, 24, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([999, 259])
    with torch.no_grad():
        got = unet(z, t, encoder_hidden_states=cond).sample
        want = fused(z, t, encoder_hidden_states=cond).sample
        with student.adapters_off(unet):
            plain = unet(z, t, encoder_hidden_states=cond).sample
    assert (got - want).abs().max().item() < 1e-5
    assert (got - plain).abs().max().item() > 1e-2  # the delta is there
    exported = student.lora_modules(unet)  # and it exports back to the same delta
    for name, m in lf.modules.items():
        assert torch.allclose(exported[name].delta(), m.delta(), atol=1e-6), name


def test_init_lora_run_continues_from_the_file(teachers, cache, tmp_path):
    s = distill(cfg_for(teachers, cache, tmp_path, init_lora=str(SHIPPED_SD), max_steps=2, lr=1e-4))
    out, shipped = load_lora(s["lora"]), load_lora(SHIPPED_SD)
    assert set(out.modules) == set(shipped.modules)
    assert {n: m.rank for n, m in out.modules.items()} == {n: m.rank for n, m in shipped.modules.items()}
    # moved a little from the file as a whole (from B = 0 it would be ~1). Per module, Adam's first steps move every
    # factor by ~lr, so the shipped extract's smallest modules (rank 1, tiny change) move by more, relatively
    moved = sum((out.modules[n].delta() - m.delta()).norm().item() ** 2 for n, m in shipped.modules.items())
    rel = math.sqrt(moved / sum(m.delta().norm().item() ** 2 for m in shipped.modules.values()))
    assert 0 < rel < 0.2, rel


def test_full_lcd_from_init_lora_starts_at_teacher_plus_delta(teachers, cache, tmp_path):
    """lora_rank 0 with init_lora: the whole UNet starts at teacher + the file's delta while the frozen teacher stays
    the plain UNet: after one step at a vanishing lr, unet/ equals the fused teacher and the full-rank extract (the
    change against that teacher) equals the file's delta."""
    from diffusers import UNet2DConditionModel

    from lcmtool.lora.formats import EMBED_TARGETS, LCM_TARGETS
    from lcmtool.lora.fuse import fuse_into_unet

    s = distill(cfg_for(teachers, cache, tmp_path, lora_rank=0, init_lora=str(SHIPPED_SD), extract_rank=4096,
                        max_steps=1, lr=1e-12, save_dtype="fp32", target_modules=list(LCM_TARGETS + EMBED_TARGETS)))
    trained = UNet2DConditionModel.from_pretrained(s["unet"])
    shipped = load_lora(SHIPPED_SD)
    fused = UNet2DConditionModel.from_pretrained(str(teachers / "sd" / "unet"))
    fuse_into_unet(fused, [(shipped, 1.0)])
    got, want = dict(trained.named_parameters()), dict(fused.named_parameters())
    assert set(got) == set(want)
    assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-5
    extract = load_lora(s["lora"])
    assert set(extract.modules) == set(shipped.modules)
    for name, m in shipped.modules.items():
        assert torch.allclose(extract.modules[name].delta().float(), m.delta().float(), atol=1e-5), name


@pytest.mark.parametrize("kind", ["constant", "cosine"])
def test_lr_schedules_start_above_zero_and_never_reach_it(kind):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = student.lr_schedule(opt, warmup_steps=4, kind=kind, max_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])  # the lr optimizer step s (1-based) runs at
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    if kind == "constant":
        assert lrs[4:] == [1.0] * 16
    else:  # cosine over max_steps + 1: from 1 down, strictly, and never 0 within the run
        assert all(a > b for a, b in zip(lrs[3:], lrs[4:], strict=False)) and 0 < lrs[-1] < 0.01
        assert lrs[11] == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 17)))


def test_best_checkpoint_selection_picks_the_lower_score():
    assert distill_eval.is_better(30.0, None) and distill_eval.is_better(20.0, 30.0)
    assert not distill_eval.is_better(40.0, 30.0) and not distill_eval.is_better(30.0, 30.0)
    assert not distill_eval.is_better(float("nan"), None) and not distill_eval.is_better(None, 30.0)
    best = None
    for score in (35.0, 21.5, 27.0):  # two synthetic scores after a first: the better (21.5) is kept
        if distill_eval.is_better(score, best):
            best = score
    assert best == 21.5


def hooked(teachers, cache, out, **kw):
    return cfg_for(teachers, cache, out, max_steps=4, eval_every=2, eval_images=8, **kw)


def test_held_out_hook_logs_scores_and_keeps_the_best(teachers, cache, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    s = distill(hooked(teachers, cache, tmp_path, report_to="tensorboard"))
    evals = [r for r in records(tmp_path) if "eval_s" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        for steps in (2, 4):
            assert math.isfinite(r[f"eval_lcm{steps}_fd"]) and r[f"eval_lcm{steps}_fd"] > 0
            assert all(0 <= r[f"eval_lcm{steps}_{k}"] <= 1 for k in ("shape_acc", "color_acc", "position_acc"))
    best = min(evals, key=lambda r: r["eval_lcm4_fd"])
    state = json.loads((tmp_path / "checkpoints" / "best" / "trainer_state.json").read_text())
    assert state["step"] == best["step"] and state["eval"]["eval_lcm4_fd"] == best["eval_lcm4_fd"]
    assert s["best_score"] == best["eval_lcm4_fd"] and (tmp_path / "lcm-lora-best.safetensors").is_file()
    assert s["eval_lcm4_fd"] == evals[-1]["eval_lcm4_fd"]
    acc = EventAccumulator(str(next((tmp_path / "tensorboard").rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval_lcm4_fd")] == [2, 4]
    from PIL import Image

    with Image.open(tmp_path / "loss.png") as im:
        assert im.height == 800  # the loss chart and the held-out score chart below it


def test_resume_with_the_hook_on_is_bit_identical(teachers, cache, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    distill(hooked(teachers, cache, straight))
    resumed = tmp_path / "resumed"  # Ctrl-C in step 4, after step 2's eval and step 3
    with base.raising_in_call(monkeypatch, 4, KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
        distill(hooked(teachers, cache, resumed))
    distill(hooked(teachers, cache, resumed, resume="latest"))
    a, b = lora_of(straight / "checkpoints" / "step-0000004"), lora_of(resumed / "checkpoints" / "step-0000004")
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    strip = [{k: v for k, v in r.items() if k not in ("eval_s", "samples_per_s", "elapsed_s")} for r in
             records(straight)]
    assert strip == [{k: v for k, v in r.items() if k not in ("eval_s", "samples_per_s", "elapsed_s")}
                     for r in records(resumed)]
    best_a = json.loads((straight / "checkpoints" / "best" / "trainer_state.json").read_text())
    best_b = json.loads((resumed / "checkpoints" / "best" / "trainer_state.json").read_text())
    assert best_a["step"] == best_b["step"] and best_a["eval"] == best_b["eval"]
    assert all(torch.equal(x, y) for x, y in zip(lora_of(straight / "checkpoints" / "best"),
                                                 lora_of(resumed / "checkpoints" / "best"), strict=True))


def test_hook_on_a_model_without_evaluator_makes_the_grid(teachers, cache, tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 20, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo number {i}")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\n\na blue house\n")
    distill(cfg_for(teachers, cache, tmp_path / "run", data=str(folder), max_steps=1, eval_every=1, eval_images=4,
                    eval_prompts=str(prompts)))
    assert (tmp_path / "run" / "validation" / "eval-step-0000001.png").is_file()
    evals = [r for r in records(tmp_path / "run") if "eval_s" in r]
    assert len(evals) == 1 and set(evals[0]) == {"step", "eval_s"}
    assert not (tmp_path / "run" / "checkpoints" / "best").exists()


def test_conv_patterns_name_only_targeted_convs_so_peft_warns_of_nothing():
    """conv_rank's rank_pattern holds exactly the 3x3 convs that target_modules select (conv_in / conv_out are
    3x3 but untargeted: a pattern key for them made peft warn on every distill run)."""
    import warnings

    from lcmtool.demo.arch import build_pipeline
    from lcmtool.lora.formats import LCM_TARGETS

    unet = build_pipeline("sd", seed=0).unet
    ranks, alphas = student.conv_patterns(unet, 4, 4.0, list(LCM_TARGETS))
    convs = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)}
    assert {"conv_in", "conv_out"} <= convs and not {"conv_in", "conv_out"} & set(ranks)
    assert ranks and set(ranks) == set(alphas) and all(r == 4 for r in ranks.values())
    assert all(n.split(".")[-1] in ("conv1", "conv2", "conv") for n in ranks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft's "rank_pattern keys did not match" is a RuntimeWarning
        params = student.add_lora(unet, 8, 8.0, list(LCM_TARGETS), ranks, alphas)
    conv_lora = dict(unet.named_modules())["down_blocks.0.resnets.0.conv1"].lora_A["default"]
    assert params and conv_lora.weight.shape[0] == 4
    assert student.conv_patterns(unet, 0, 0.0, list(LCM_TARGETS)) == ({}, {})


@pytest.mark.parametrize("fam", ["sd", "xl"])
def test_later_stage_configs_continue_stage_1_and_made_the_shipped_lora(fam):
    """configs/distill/demo-<fam>-refine.yaml is stage 1's config but for the stage-2 keys and starts from stage 1's
    output; demo-xl-teacher.yaml (a recorded stage 3, not shipped) is demo-xl-refine.yaml but for the stage-3 keys
    (w = 2 on teacher samples at CFG 3, batch 512) and starts from stage 2's output; the last stage
    tools/demo_models.py runs (demo-sd: the full-UNet ceiling config) holds the training values recorded in the
    shipped LoRA's metadata (the file it made)."""
    import demo_models  # tools/demo_models.py (pytest pythonpath: tools)
    import yaml

    root = Path(__file__).resolve().parents[1]
    cfg = lambda name: yaml.safe_load((root / f"configs/distill/{name}.yaml").read_text())  # noqa: E731
    one, two = cfg(f"demo-{fam}"), cfg(f"demo-{fam}-refine")
    stage2 = {"name", "w_min", "w_max", "lr", "max_steps", "warmup_steps", "checkpoint_every", "validate_every",
              "eval_every", "init_lora", "scale_search"}
    assert {k: v for k, v in one.items() if k not in stage2} == {k: v for k, v in two.items() if k not in stage2}
    assert two["init_lora"] == f"runs/{one['name']}/lcm-lora.safetensors" and "init_lora" not in one
    assert two["w_min"] == two["w_max"] == {"sd": 2.0, "xl": 0.5}[fam] and two["lr"] < one["lr"]  # fixed, low w
    assert demo_models.LATER_STAGES[fam] == {"sd": ["demo-sd-ceiling"], "xl": ["demo-xl-refine"]}[fam]
    if fam == "xl":
        three = cfg("demo-xl-teacher")
        stage3 = stage2 | {"grad_accum", "log_every", "teacher_data", "teacher_steps", "teacher_samples"}
        assert {k: v for k, v in two.items() if k not in stage3} == {k: v for k, v in three.items()
                                                                     if k not in stage3}
        assert three["init_lora"] == f"runs/{two['name']}/lcm-lora.safetensors"
        assert three["w_min"] == three["w_max"] == three["teacher_data"] - 1 == 2.0  # the samples' CFG is 1 + w
        assert three["batch_size"] * three["grad_accum"] * three["max_steps"] == two["batch_size"] * two["max_steps"]
    shipped = load_lora(root / f"lcmtool/demo/assets/lcm-lora-demo-{fam}.safetensors").metadata
    made = json.loads(shipped["config"])
    from lcmtool.options import DistillConfig

    last = demo_models.LATER_STAGES[fam][-1]
    resolved, defaults = DistillConfig(**cfg(last)), DistillConfig()  # keys the YAML leaves out: defaults (seed)
    for key in ("w_min", "w_max", "lr", "max_steps", "warmup_steps", "batch_size", "grad_accum", "num_ddim_timesteps",
                "loss", "huber_c", "ema_decay", "lr_schedule", "seed", "model", "num_samples", "uncond", "lora_rank",
                "extract_rank", "extract_conv_rank", "extract_fro", "extract_budget_mb", "extract_calibrate",
                "teacher_data", "teacher_steps", "teacher_samples", "target_modules", "scale_search"):
        # a file made before a key existed ran at its default (the XL stage-2 file predates the extract_* keys
        # after extract_rank, the SD file the teacher_* keys)
        assert made.get(key, getattr(defaults, key)) == getattr(resolved, key), key
    # stage 1 = the LoRA shipped until 2026-12-01 (in git at 3297757 for sd), kept as stage1-<fam>.safetensors; the
    # stage after it started from the file the stage before made, kept as stage<k>-<fam>.safetensors
    assert made["init_lora"] == f"stage{len(demo_models.LATER_STAGES[fam])}-{fam}.safetensors"
    # the last stage's scale search picked the weight written into the file: the lowest of its held-out scores
    search = json.loads(shipped["lcm_scale_search"])
    assert [r["scale"] for r in search] == resolved.scale_search
    assert float(shipped["lcm_scale"]) == distill_eval.pick_scale(search) != 1.0


@pytest.mark.parametrize("fam", ["sd", "xl"])
def test_ceiling_config_is_stage_2_with_the_whole_unet_trainable(fam):
    """configs/distill/demo-<fam>-ceiling.yaml (docs/distill-recipe.md's full-UNet ceiling) is the stage-2 config
    with the LoRA keys replaced by full LCD (lora_rank 0, an SVD extract) at a smaller lr, from the same stage 1;
    demo-sd's (the shipped stage 2) extracts the embedding layers too."""
    import yaml

    from lcmtool.lora.formats import EMBED_TARGETS, LCM_TARGETS
    from lcmtool.options import DistillConfig

    root = Path(__file__).resolve().parents[1]
    two = yaml.safe_load((root / f"configs/distill/demo-{fam}-refine.yaml").read_text())
    ceiling = yaml.safe_load((root / f"configs/distill/demo-{fam}-ceiling.yaml").read_text())
    lora_keys = {"name", "lora_rank", "lora_alpha", "conv_rank", "extract_rank", "extract_fro", "extract_budget_mb",
                 "extract_calibrate", "lr", "target_modules", "scale_search"}  # scale_search: the shipped stages'
                                                                                 # weight search
    assert {k: v for k, v in two.items() if k not in lora_keys} == {k: v for k, v in ceiling.items()
                                                                        if k not in lora_keys}
    assert ceiling["lora_rank"] == 0 and ceiling["extract_rank"] == 32 and ceiling["lr"] < two["lr"]
    assert ceiling["init_lora"] == two["init_lora"] and ceiling["name"] == f"demo-{fam}-ceiling"
    targets = DistillConfig(**ceiling).target_modules  # valid as written
    assert targets == list(LCM_TARGETS + EMBED_TARGETS if fam == "sd" else LCM_TARGETS)
    # sd: a calibrated extract inside the shipped weights' budget (ranks <= 32 by sigma^2 per stored value)
    assert (ceiling.get("extract_budget_mb", 0), ceiling.get("extract_calibrate", 0)) == {"sd": (2.45, 64),
                                                                                          "xl": (0, 0)}[fam]
    assert "extract_fro" not in ceiling


def test_pick_scale_takes_the_lowest_finite_score():
    rows = [{"scale": 1.0, "eval_lcm4_fd": 30.0}, {"scale": 0.8, "eval_lcm4_fd": 22.0},
            {"scale": 0.6, "eval_lcm4_fd": float("nan")}, {"scale": 0.7, "eval_lcm4_fd": 22.0}]
    assert distill_eval.pick_scale(rows) == 0.8  # the first of equal scores
    assert distill_eval.pick_scale([{"scale": 0.5}, {"scale": 0.7, "eval_lcm4_fd": float("inf")}]) == 1.0


def test_scale_search_scores_each_weight_and_writes_the_best(teachers, cache, tmp_path, monkeypatch):
    """scale_search on a finished run: every weight scored by the hook on teacher + s * the written file (the
    teacher's weights put back after each: weight 1.0 scored twice gives the same numbers, and at 1.0 the file
    scores as the hook scored the student); the file is rewritten with delta = the picked weight * the trained one
    and says so in its metadata."""
    picked = []
    real_pick = distill_eval.pick_scale
    monkeypatch.setattr(distill_eval, "pick_scale", lambda rows: picked.append(real_pick(rows)) or 0.5)
    s = distill(cfg_for(teachers, cache, tmp_path, init_lora=str(SHIPPED_SD), max_steps=1, lr=1e-6,
                        eval_every=1, eval_images=8, save_dtype="fp32", scale_search=[1.0, 0.5, 1.0]))
    rows = s["scale_search"]
    assert [r["scale"] for r in rows] == [1.0, 0.5, 1.0] and s["scale"] == 0.5
    assert rows[0] == {**rows[2], "eval_s": rows[0]["eval_s"]}  # put back exactly
    for k in ("eval_lcm4_fd", "eval_lcm2_fd"):
        assert math.isfinite(rows[1][k]) and rows[1][k] != rows[0][k]
        assert rows[0][k] == pytest.approx(s[k], rel=1e-3, abs=1e-3)  # fused file = the peft student
    assert picked == [real_pick(rows)]
    assert [r for r in records(tmp_path) if "scale_search" in r][0]["scale"] == 0.5
    out, trained = load_lora(s["lora"]), load_lora(tmp_path / "lcm-lora-best.safetensors")  # same step, unscaled
    assert set(out.modules) == set(trained.modules)
    for name, m in trained.modules.items():
        assert torch.allclose(out.modules[name].delta(), 0.5 * m.delta(), atol=1e-7, rtol=1e-6), name
    assert out.metadata["lcm_scale"] == "0.5" and (tmp_path / "validation.png").is_file()
    assert [r["scale"] for r in json.loads(out.metadata["lcm_scale_search"])] == [1.0, 0.5, 1.0]
