"""Sample engine (issue 4) on random-weight demo fixtures, CPU.

Oracle: a plain diffusers pipeline with the stock scheduler, configured as the diffusers docs show.
Tolerance: max abs pixel difference <= 2 (of 255) on the uint8 PNGs.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lcmtool.cli import app

PROMPT = "a large red circle on the left"
TOL = 2  # of 255


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on 2 shared cores: one intra-op thread avoids OpenMP spin-wait thrashing (~10x here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def demo_folders(tmp_path_factory):
    from lcmtool.demo.arch import build_pipeline

    root = tmp_path_factory.mktemp("demo")
    out = {}
    for fam in ("sd", "xl"):
        build_pipeline(fam).save_pretrained(root / fam)
        out[fam] = str(root / fam)
    return out


@pytest.fixture(scope="session")
def loras(demo_folders, tmp_path_factory):
    """One random LoRA on the SD fixture's 14 LCM target kinds, in kohya and diffusers formats; one for XL."""
    from diffusers import UNet2DConditionModel

    from lcmtool.lora.io import save_lora
    from lcmtool.lora.synth import synth_lora, target_shapes

    root = tmp_path_factory.mktemp("loras")
    out = {}
    for fam in ("sd", "xl"):
        unet = UNet2DConditionModel.from_pretrained(demo_folders[fam], subfolder="unet")
        lf = synth_lora(target_shapes(unet), rank=4, alpha=2, seed=1)
        for fmt in ("kohya", "diffusers"):
            out[f"{fam}-{fmt}"] = str(save_lora(lf, root / f"{fam}-{fmt}.safetensors", format=fmt))
    return out


def cli(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res


def pixels(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def stock_pipeline(folder: str):
    """A plain diffusers pipeline, loaded as the docs show."""
    from diffusers import DiffusionPipeline

    kw = {"safety_checker": None, "requires_safety_checker": False} if folder.endswith("sd") else {}
    pipe = DiffusionPipeline.from_pretrained(folder, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_scheduler(name: str, cfg):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler

    if name == "lcm":
        return LCMScheduler.from_config(cfg)
    if name == "dpmpp":
        return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++")
    # SDXL's shipped config is Euler's and lacks these two; DDIM's class defaults would clip latents to [-1, 1]
    return DDIMScheduler.from_config(cfg, set_alpha_to_one=False, clip_sample=False)


# ---- equality with plain diffusers ----

@pytest.mark.parametrize("fam", ["sd", "xl"])
def test_schedulers_match_plain_diffusers(demo_folders, fam):
    """lcm 4 steps w=1, dpmpp 4 steps w=7.5, ddim 4 steps w=7.5: lcmtool's image == stock diffusers' image."""
    from lcmtool.engines.sample import Job, generate, set_scheduler
    from lcmtool.models.load import load_pipeline

    ours, family = load_pipeline(demo_folders[fam], torch.float32, "cpu")
    assert family == ("sd15" if fam == "sd" else "sdxl")
    base = dict(ours.scheduler.config)
    stock = stock_pipeline(demo_folders[fam])
    for name, g in (("lcm", 1.0), ("dpmpp", 7.5), ("ddim", 7.5)):
        set_scheduler(ours, base, name, 4, "leading")
        (mine,), _ = generate(ours, [Job(PROMPT, "", 3)], name, 4, g, 64, 64, "cpu")
        stock.scheduler = stock_scheduler(name, base)
        ref = stock(PROMPT, num_inference_steps=4, guidance_scale=g, height=64, width=64,
                    generator=torch.Generator().manual_seed(3)).images[0]
        assert max_diff(mine, ref) <= TOL, (fam, name)
        assert np.asarray(mine).std() > 1, "blank image"  # a real image, not a constant


@pytest.mark.parametrize("fam", ["sd", "xl"])
def test_fast_loop_matches_pipeline_all_schedulers(demo_folders, fam):
    """lcmtool's loop (fused QKV, prompt cache) == diffusers' pipeline call on the same components, for all five
    schedulers, two prompts with their own seeds, negative prompts under CFG; a second call hits the prompt cache
    (each text is encoded once) and still matches."""
    from lcmtool.engines.sample import set_scheduler
    from lcmtool.models.load import load_pipeline
    from lcmtool.models.pipeline import FastSampler

    pipe, _ = load_pipeline(demo_folders[fam], torch.float32, "cpu")
    base = dict(pipe.scheduler.config)
    fast = FastSampler(pipe)
    encoded = []
    real_encode = pipe.encode_prompt

    def counting(*a, **kw):
        encoded.extend(a[0] if a else kw["prompt"])
        return real_encode(*a, **kw)

    pipe.encode_prompt = counting
    prompts, negs, seeds = [PROMPT, "a small blue square at the top"], ["a green cross", "blurry"], [3, 4]
    for name, g in (("lcm", 1.0), ("tcd", 1.0), ("dpmpp", 7.5), ("ddim", 7.5), ("euler", 7.5)):
        sched = set_scheduler(pipe, base, name, 4, "leading")
        eta = {"eta": 0.3} if name == "tcd" else {}
        encoded.clear()
        for _ in range(2):
            mine = fast(prompts, negs, seeds, sched, 4, g, 64, 64, eta=eta.get("eta"), output="uint8").numpy()
        assert sorted(encoded) == sorted(prompts + (negs if g > 1 else [])), "each text encoded once"
        fast.weights_changed()  # the stock call below runs on the plain attention processors
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        ref = pipe(prompts, negative_prompt=negs if g > 1 else None, num_inference_steps=4, guidance_scale=g,
                   height=64, width=64, generator=gens, output_type="np", **eta).images
        assert max_diff(mine, (ref * 255).round()) <= TOL, (fam, name)
        assert max_diff(mine[0], mine[1]) > 10, "two prompts and seeds, one image"


@pytest.mark.parametrize("fam", ["sd", "xl"])
def test_traced_loop_equals_eager_loop(demo_folders, loras, fam):
    """TorchScript traces (CPU --compile's mode) give the eager loop's pixels exactly, for all five schedulers with
    and without CFG: one UNet graph per input shape, reused at every step (its timestep is an input, not a
    constant); another batch size is traced anew; a LoRA fused into the weights in place afterwards reaches the
    traces (they hold the parameter tensors); trace time is counted in trace_s and no trace failed."""
    from lcmtool.engines.sample import set_scheduler
    from lcmtool.lora.fuse import fuse_into_pipeline
    from lcmtool.lora.io import load_lora
    from lcmtool.models.load import load_pipeline
    from lcmtool.models.pipeline import FastSampler

    pipe, _ = load_pipeline(demo_folders[fam], torch.float32, "cpu")
    base = dict(pipe.scheduler.config)
    eager, traced = FastSampler(pipe, fuse_qkv=False), FastSampler(pipe, compile=True, mode="trace", fuse_qkv=False)
    prompts, negs, seeds = [PROMPT, "a small blue square at the top"], ["a green cross", ""], [3, 4]

    def both(name, g, n=2):
        sched = set_scheduler(pipe, base, name, 4, "leading")
        eta = 0.3 if name == "tcd" else None
        a = eager(prompts[:n], negs[:n], seeds[:n], sched, 4, g, 64, 64, eta=eta, output="uint8")
        b = traced(prompts[:n], negs[:n], seeds[:n], sched, 4, g, 64, 64, eta=eta, output="uint8")
        return a, b

    for name, g in (("lcm", 1.0), ("tcd", 1.0), ("dpmpp", 7.5), ("ddim", 7.5), ("euler", 7.5), ("ddim", 1.0)):
        a, b = both(name, g)
        assert torch.equal(a, b), (fam, name, g, int((a.int() - b.int()).abs().max()))
        assert a.float().std() > 1
    graphs = traced.traced_unet.graphs
    # UNet graphs: batch 2 (no CFG: lcm, tcd, ddim at 1) and 4 (CFG) with int timesteps, 4 with euler's floats
    assert len(graphs) == 3 and not traced.traced_unet.failed and not traced.traced_decode.failed, list(graphs)
    before = traced.trace_s
    a, b = both("lcm", 1.0, n=1)  # a new batch size: a new trace
    assert torch.equal(a, b) and len(graphs) == 4 and traced.trace_s > before > 0
    fuse_into_pipeline(pipe, [(load_lora(loras[f"{fam}-diffusers"]), 1.0)])  # in place, no weights_changed()
    eager._text.clear(), traced._text.clear()
    a2, b2 = both("lcm", 1.0, n=1)
    assert torch.equal(a2, b2) and (a2.int() - a.int()).abs().max() > 2, "the fused LoRA reached the traces"


def test_generate_steady_times_a_tracing_batch_again():
    """generate(steady=True): a batch during which the sampler traced a new shape runs again and the second run is
    timed (paper's ms/image columns); a batch that traced nothing runs once; without steady the wall time stays."""
    import time as _time
    from types import SimpleNamespace

    from lcmtool.engines.sample import Job, generate

    class Fake:
        def __init__(self):
            self.trace_s, self.calls = 0.0, 0

        def __call__(self, prompts, *a, **kw):
            self.calls += 1
            if self.calls == 1:  # the first call traces: slow, and counted in trace_s
                _time.sleep(0.3)
                self.trace_s += 0.3
            return ["img"] * len(prompts)

    pipe, jobs = SimpleNamespace(scheduler=None), [Job(PROMPT, "", 0)]
    fake = Fake()
    images, ms = generate(pipe, jobs, "lcm", 4, 1.0, 64, 64, "cpu", sampler=fake, steady=True)
    assert images == ["img"] and fake.calls == 2 and ms < 250
    generate(pipe, jobs, "lcm", 4, 1.0, 64, 64, "cpu", sampler=fake, steady=True)
    assert fake.calls == 3
    slow = Fake()
    _, ms = generate(pipe, jobs, "lcm", 4, 1.0, 64, 64, "cpu", sampler=slow)
    assert slow.calls == 1 and ms >= 300


def test_traced_falls_back_to_the_call_it_cannot_trace():
    """A call whose trace fails runs eagerly (same result), and the failure is recorded once per signature."""
    from lcmtool.models.pipeline import Traced

    calls = []

    def fn(x):
        calls.append(1)
        return x.tolist()  # a Python list: not traceable

    t = Traced(fn, torch.nn.Linear(1, 1))
    x = torch.ones(2)
    assert t(x=x) == [1.0, 1.0] and t(x=x) == [1.0, 1.0]
    assert len(t.failed) == 1 and not t.graphs and t.setup_s == 0


def test_compile_default_by_device_and_run_length():
    """--compile auto: CUDA always; CPU traces from TRACE_MIN_CALLS UNet calls (unknown length: a long run)."""
    from lcmtool.engines.sample import _resolve_compile
    from lcmtool.models.pipeline import COMPILE_MODES, TRACE_MIN_CALLS, compile_by_default
    from lcmtool.options import SampleConfig

    assert COMPILE_MODES["cpu"] == "trace"
    assert compile_by_default("cuda", 1) and compile_by_default("cuda:1") and compile_by_default("cpu")
    assert not compile_by_default("cpu", TRACE_MIN_CALLS - 1) and compile_by_default("cpu", TRACE_MIN_CALLS)
    assert not compile_by_default("mps", 10 ** 6)
    cfg = SampleConfig()
    assert not _resolve_compile(cfg, "cpu", 4) and _resolve_compile(cfg, "cpu", 400)
    cfg.compile = True
    assert _resolve_compile(cfg, "cpu", 4)
    cfg.compile = False
    assert not _resolve_compile(cfg, "cuda", 400)


def test_no_sync_schedulers_equal_stock():
    """All five wrapped schedulers step exactly like diffusers' (same timesteps, same trajectory)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler, TCDScheduler

    from lcmtool.demo.arch import SD15_SCHEDULER
    from lcmtool.models.schedulers import make_scheduler

    stock = {"lcm": LCMScheduler, "ddim": DDIMScheduler, "tcd": TCDScheduler, "euler": EulerDiscreteScheduler,
             "dpmpp": DPMSolverMultistepScheduler}
    for name, cls in stock.items():
        ours = make_scheduler(name, SD15_SCHEDULER)
        ref = cls.from_config(ours.config)  # the stock class with the same pinned config
        xs = []
        for sch in (ours, ref):
            sch.set_timesteps(6)
            x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sch.init_noise_sigma
            gen = torch.Generator().manual_seed(1)
            for t in sch.timesteps:
                eps = torch.sin(sch.scale_model_input(x, t) * 3 + float(t) / 100)
                kw = {"eta": 0.3} if name == "tcd" else {}
                x = sch.step(eps, t, x, generator=gen, return_dict=False, **kw)[0]
            xs.append(x)
        assert ours.timesteps.tolist() == ref.timesteps.tolist(), name
        torch.testing.assert_close(xs[0], xs[1], rtol=0, atol=1e-5, msg=name)


def test_pinned_config_ignores_checkpoint_scheduler_settings():
    """A checkpoint's own spacing/offset/karras settings do not leak in; its betas and prediction type do."""
    from lcmtool.models.schedulers import pinned_config

    odd = dict(num_train_timesteps=1000, beta_start=0.001, beta_end=0.02, beta_schedule="linear",
               prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0, use_karras_sigmas=True)
    cfg = pinned_config("dpmpp", odd)
    assert (cfg["timestep_spacing"], cfg["steps_offset"], cfg["use_karras_sigmas"]) == ("leading", 1, False)
    assert (cfg["beta_start"], cfg["beta_schedule"], cfg["prediction_type"]) == (0.001, "linear", "v_prediction")
    assert pinned_config("lcm", odd)["original_inference_steps"] == 50


# ---- LoRAs ----

def test_lora_formats_weights_and_fusing(demo_folders, loras, tmp_path):
    """kohya == diffusers format; weight 0 == teacher; a real LoRA changes the image; --no-fuse == fused."""
    base = ["sample", "--model", demo_folders["sd"], "--prompt", PROMPT, "--steps", 2, "--seed", 5]
    outs = {}
    for name, extra in {"teacher": ["--lora", "none"], "kohya": ["--lora", loras["sd-kohya"]],
                        "diffusers": ["--lora", loras["sd-diffusers"]],
                        "zero": ["--lora", loras["sd-kohya"] + ":0"],
                        "unfused": ["--lora", loras["sd-diffusers"], "--no-fuse"]}.items():
        res = cli(*base, *extra, "--out", tmp_path / name)
        assert res.exit_code == 0, res.output
        outs[name] = pixels(next((tmp_path / name).glob("*.png")))
    assert max_diff(outs["kohya"], outs["diffusers"]) <= TOL
    assert max_diff(outs["zero"], outs["teacher"]) <= TOL
    assert max_diff(outs["unfused"], outs["kohya"]) <= TOL
    assert max_diff(outs["kohya"], outs["teacher"]) > 10, "the LoRA had no visible effect"


# ---- bad inputs: exit 2, one line, no PNG ----

@pytest.mark.parametrize("case", ["missing-model", "corrupt-model", "corrupt-lora", "other-family-lora",
                                  "unknown-scheduler", "steps-0", "size-60", "empty-prompts", "missing-lora"])
def test_bad_inputs(case, demo_folders, loras, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    sd = demo_folders["sd"]
    args = {
        "missing-model": ["--model", tmp_path / "nope" / "model.safetensors"],
        "corrupt-model": ["--model", bad],
        "corrupt-lora": ["--model", sd, "--lora", bad],
        "other-family-lora": ["--model", sd, "--lora", loras["xl-kohya"]],
        "unknown-scheduler": ["--model", sd, "--scheduler", "plms"],
        "steps-0": ["--model", sd, "--steps", 0],
        "size-60": ["--model", sd, "--height", 60, "--lora", "none"],
        "empty-prompts": ["--model", sd, "--prompts", empty],
        "missing-lora": ["--model", sd, "--lora", tmp_path / "nope.safetensors"],
    }[case]
    if "--prompts" not in args:
        args += ["--prompt", PROMPT]
    out = tmp_path / "out"
    res = cli("sample", *args, "--out", out)
    assert res.exit_code == 2, (case, res.output)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), (case, res.stderr)
    assert not list(out.glob("**/*.png")) if out.exists() else True


def test_default_model_is_demo_sd(monkeypatch, tmp_path):
    """`lcmtool sample` with no --model samples demo:sd; where the demo assets are missing: one clear line, exit 2."""
    from lcmtool.demo import ASSETS, DEMO_MODELS
    from lcmtool.engines.sample import SampleConfig

    assert SampleConfig().model == "demo:sd"
    if (ASSETS / DEMO_MODELS["sd"] / "model_index.json").is_file():
        pytest.skip("demo assets are built; covered by make demo")
    res = cli("sample", "--prompt", PROMPT, "--steps", 4, "--out", tmp_path)
    assert res.exit_code == 2 and "demo:sd" in res.stderr and "make demo-models" in res.stderr
    assert not list(tmp_path.glob("*.png"))


# ---- outputs, seeds, --json ----

def test_json_metadata_and_seeds(demo_folders, loras, tmp_path):
    """--json lines parse; PNG metadata round-trips; same seed -> same image; image k uses seed + k."""
    from lcmtool.fileio import sha256_file
    from lcmtool.outputs.png import read_png_meta

    common = ["sample", "--model", demo_folders["sd"], "--prompt", PROMPT, "--steps", 2, "--lora",
              loras["sd-kohya"] + ":0.5"]
    res = cli(*common, "--num-images", 3, "--batch-size", 2, "--seed", 7, "--json", "--out", tmp_path / "a")
    assert res.exit_code == 0, res.output
    recs = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert [r["seed"] for r in recs] == [7, 8, 9] and all(r["ms_per_image"] > 0 for r in recs)
    meta = read_png_meta(recs[1]["path"])
    assert meta["parameters"].startswith(PROMPT + " <lora:sd-kohya:0.5>\n")  # A1111 re-applies the LoRA (issue 17)
    assert "Steps: 2, Sampler: LCM, CFG scale: 1.0, Seed: 8, Size: 64x64" in meta["parameters"]
    m = meta["lcmtool"]
    assert (m["prompt"], m["seed"], m["steps"], m["scheduler"], m["guidance"]) == (PROMPT, 8, 2, "lcm", 1.0)
    assert m["loras"][0]["weight"] == 0.5 and m["loras"][0]["sha256"] == sha256_file(loras["sd-kohya"])
    assert m["scheduler_config"]["original_inference_steps"] == 50 and m["version"]

    # the same seed alone, in another run and batch: the same image
    res = cli(*common, "--seed", 8, "--out", tmp_path / "b")
    assert res.exit_code == 0, res.output
    again = pixels(next((tmp_path / "b").glob("*.png")))
    assert max_diff(again, pixels(recs[1]["path"])) <= TOL
    assert max_diff(pixels(recs[0]["path"]), pixels(recs[1]["path"])) > 10  # other seed, other image


def test_prompts_file_jsonl_and_compare_grid(demo_folders, tmp_path):
    """JSONL prompts with per-line seeds; compare writes one labelled grid with timings per column."""
    from PIL import Image

    from lcmtool.outputs.png import read_png_meta

    pf = tmp_path / "p.jsonl"
    pf.write_text(json.dumps({"prompt": PROMPT, "seed": 11}) + "\n" + "a small blue square at the top\n")
    res = cli("sample", "--model", demo_folders["xl"], "--prompts", pf, "--steps", 1, "--lora", "none",
              "--json", "--out", tmp_path / "s")
    assert res.exit_code == 0, res.output
    recs = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert [(r["prompt"], r["seed"]) for r in recs] == [(PROMPT, 11), ("a small blue square at the top", 0)]

    grid = tmp_path / "cmp.png"
    res = cli("compare", "--model", demo_folders["sd"], "--prompt", PROMPT, "--runs", "lcm:1,lcm:2,dpmpp:2",
              "--lora", "none", "--num-images", 2, "--out", grid, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [(r["scheduler"], r["steps"], r["guidance"]) for r in out["runs"]] == [
        ("lcm", 1, 1.0), ("lcm", 2, 1.0), ("dpmpp", 2, 7.5)]
    assert all(r["ms_per_image"] > 0 for r in out["runs"])
    w, h = Image.open(grid).size
    assert w > 3 * 192 and h > 2 * 192  # 3 columns x 2 rows of >= 192 px cells plus labels
    assert read_png_meta(grid)["lcmtool"]["runs"] == out["runs"]


# ---- review fixes ----

def test_read_prompts_null_negative_bad_encoding_and_seed_range(tmp_path):
    from lcmtool.engines.inputs import read_prompts
    from lcmtool.errors import LcmError

    pf = tmp_path / "p.jsonl"
    pf.write_text(json.dumps({"prompt": PROMPT, "negative_prompt": None}) + "\n")
    assert read_prompts(None, str(pf), "blurry", 0, 1)[0].negative_prompt == "blurry"  # not "None"
    pf.write_bytes(b"caf\xe9 au lait\n")
    with pytest.raises(LcmError, match="not UTF-8"):
        read_prompts(None, str(pf), "", 0, 1)
    with pytest.raises(LcmError, match="out of range"):
        read_prompts(PROMPT, None, "", 2 ** 64 - 1, 2)  # image 2 would get seed 2**64


def test_out_that_is_a_file_fails_before_loading(demo_folders, tmp_path):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    res = cli("sample", "--model", demo_folders["sd"], "--prompt", PROMPT, "--lora", "none", "--out", out)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "is a file" in lines[0]
    assert out.read_text() == "not a folder"


def test_summary_ms_per_image_and_grad_left_on(monkeypatch, demo_folders, tmp_path):
    """The summary line averages ms per image (batch_ms is the whole batch's); sampling leaves autograd on."""
    import lcmtool.engines.sample as engine

    res = cli("sample", "--model", demo_folders["sd"], "--prompt", PROMPT, "--steps", 1, "--lora", "none",
              "--out", tmp_path / "real")
    assert res.exit_code == 0, res.output
    assert torch.is_grad_enabled()

    recs = [{"batch_ms": 400.0, "ms_per_image": 100.0, "load_ms": 1000.0} for _ in range(4)]
    monkeypatch.setattr(engine, "sample", lambda cfg, **kw: recs)
    res = cli("sample", "--prompt", PROMPT, "--out", tmp_path / "fake")
    assert res.exit_code == 0, res.output
    assert "(100 ms/image" in " ".join(res.stderr.split())  # rich wraps the line


def test_compare_reads_each_lora_once(monkeypatch, demo_folders, loras, tmp_path):
    import lcmtool.lora.io as lio

    calls = []
    real = lio.load_lora
    monkeypatch.setattr(lio, "load_lora", lambda p, *a, **k: calls.append(p) or real(p, *a, **k))
    res = cli("compare", "--model", demo_folders["sd"], "--prompt", PROMPT, "--runs", "ddim:1,lcm:1",
              "--lora", loras["sd-kohya"], "--out", tmp_path / "g.png")
    assert res.exit_code == 0, res.output
    assert calls == [loras["sd-kohya"]]


def test_deterministic_names_rerun_skips_and_other_settings_do_not_overwrite(demo_folders, tmp_path):
    """<prompt index>-<seed>-<digest>.png; the same command again writes nothing (records say skipped, the files are
    untouched); other steps write new files beside them."""
    pf = tmp_path / "p.txt"
    pf.write_text(PROMPT + "\na small blue square at the top\n")
    cmd = ["sample", "--model", demo_folders["sd"], "--prompts", pf, "--num-images", 2, "--steps", 1, "--lora",
           "none", "--seed", 5, "--batch-size", 3, "--json", "--out", tmp_path / "o"]
    res = cli(*cmd)
    assert res.exit_code == 0, res.output
    first = [json.loads(ln) for ln in res.stdout.splitlines()]
    names = [p.rsplit("/", 1)[1].rsplit("-", 1)[0] for p in (r["path"] for r in first)]
    assert names == ["00000-5", "00000-6", "00001-5", "00001-6"] and not any(r["skipped"] for r in first)
    mtimes = {r["path"]: (tmp_path / "o" / r["path"].rsplit("/", 1)[1]).stat().st_mtime_ns for r in first}
    res = cli(*cmd)
    assert res.exit_code == 0, res.output
    again = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert [r["path"] for r in again] == list(mtimes) and all(r["skipped"] for r in again)
    assert all((tmp_path / "o" / p.rsplit("/", 1)[1]).stat().st_mtime_ns == t for p, t in mtimes.items())
    res = cli(*[("2" if a == 1 else a) for a in cmd])  # --steps 2
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "o").glob("*.png"))) == 8
