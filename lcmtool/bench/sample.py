"""`bench_sample()`: plain diffusers (as its docs show) vs lcmtool's sampling loop, same run, same device, same inputs.

Plain diffusers: the pipeline call with LCMScheduler.from_config, the LoRA as a peft adapter via `load_lora_weights`
(unfused), then `fuse_lora()`; DPM-Solver++ 25 steps CFG 7.5 on the teacher. lcmtool: `FastSampler` (the engines'
loop: pinned no-sync schedulers, LoRA fused by lcmtool, fused QKV, channels_last) on its own copy of the
UNet and VAE, eager and with graphs (`lcmtool_compiled`, default on: torch.compile on CUDA, TorchScript traces on
CPU; the row's `compile_mode` says which, `compile_s` what the first call of its shapes cost). The paths of one
case run in alternation, round after round (medians), so that a machine whose load changes (a shared CPU) charges
them alike. Text is
encoded on every call on both paths (lcmtool's prompt cache is cleared), so the rows compare the same work.

Every row: ms/image (end to end: text, denoising, VAE decode, PIL images), images/s, peak memory (CUDA), compile
time, ratio to plain diffusers, fraction of the FLOP bound (CUDA, at PEAK_TFLOPS), and `outputs_match` /
`max_abs_diff`: the final latents of that path vs plain diffusers' (the fused LoRA for LCM rows) on the same
prompt and seeds, within `tolerance`.
Models: anything `load_pipeline` takes, plus `random:sd15|sdxl|ssd1b` (the real architectures from
lcmtool/presets with random weights; compute does not depend on the values).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from lcmtool.errors import LcmError

PROMPT = "a large red circle on the left"
TOLERANCE = {"float32": 2e-3, "float16": 5e-2, "bfloat16": 1e-1}  # max |latent difference| counted as a match
PEAK_TFLOPS = {"H100": 790.0, "H200": 790.0}  # dense bf16/fp16 reachable on one chip (ANCHORS.md's bound)


def random_pipeline(family: str, device: str, dtype):
    """The real SD-1.5 / SDXL / SSD-1B pipeline (lcmtool/presets configs, CLIP's tokenizer) with random weights."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from lcmtool.models.schedulers import scheduler_class
    from lcmtool.models.single_file import single_file_config_dir

    with tempfile.TemporaryDirectory(prefix="lcmtool-random-") as tmp:
        d = single_file_config_dir(family, dst=Path(tmp))
        torch.manual_seed(0)
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(d / "unet")).to(dtype)
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(d / "vae")).to(dtype)
            te = CLIPTextModel(CLIPTextConfig.from_pretrained(d / "text_encoder")).to(dtype)
            te2 = (CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(d / "text_encoder_2")).to(dtype)
                   if family != "sd15" else None)
        tok = CLIPTokenizer.from_pretrained(d / "tokenizer")
        sched = scheduler_class("ddim").from_pretrained(d / "scheduler")  # any: only its noise schedule is read
    if family == "sd15":
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                         unet=unet, scheduler=sched, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _rounds(fns: dict, device: str, n: int, warm: int) -> dict[str, float]:
    """Median ms per call of each callable, the callables taking turns `n` rounds long (after `warm` rounds)."""
    for _ in range(warm):
        for fn in fns.values():
            fn()
    ts: dict[str, list] = {k: [] for k in fns}
    for _ in range(n):
        for k, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            ts[k].append((time.perf_counter() - t) * 1000)
    return {k: statistics.median(v) for k, v in ts.items()}


def _plain(pipe, device: str, batch: int, steps: int, g: float, h: int, w: int, output: str = "pil"):
    import torch

    def call():
        gens = [torch.Generator(device).manual_seed(i) for i in range(batch)]
        return pipe([PROMPT] * batch, num_inference_steps=steps, guidance_scale=g, height=h, width=w,
                    generator=gens, output_type=output).images
    return call


def _ours(sampler, base: dict, name: str, batch: int, steps: int, g: float, h: int, w: int, output: str = "pil"):
    from lcmtool.models.schedulers import LCM_ORIGINAL_STEPS, make_scheduler

    orig = LCM_ORIGINAL_STEPS if name in ("lcm", "tcd") else None

    sched = make_scheduler(name, base, timestep_spacing="leading", original_inference_steps=orig)

    def call():  # one scheduler for every call, as pipe.scheduler on the plain path (set_timesteps resets it)
        sampler._text.clear()  # encode the prompt on every call, as the pipeline does
        return sampler([PROMPT] * batch, [""] * batch, list(range(batch)), sched, steps, g, h, w, output=output)
    return call


def _load(model: str, dev: str, dt):
    from lcmtool.models.load import load_pipeline

    if model.startswith("random:"):
        family = model.split(":", 1)[1]
        if family not in ("sd15", "sdxl", "ssd1b"):
            raise LcmError(f"unknown model family '{family}' (known: sd15, sdxl, ssd1b)")
        return random_pipeline(family, dev, dt), family
    return load_pipeline(model, dt, dev)


def _twin(pipe):
    """The same pipeline with its own UNet, VAE and text encoders (lcmtool fuses, fuses QKV and compiles those)."""
    import copy

    comps = dict(pipe.components)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):  # a LoRA may change the text encoders too
        if comps.get(name) is not None:
            comps[name] = copy.deepcopy(comps[name])
    extra = {"requires_safety_checker": False} if "safety_checker" in comps else {}
    twin = type(pipe)(**comps, **extra)
    twin.set_progress_bar_config(disable=True)
    return twin


def _lora_file(model: str, pipe, tmp: Path, lora: str | None) -> str:
    from lcmtool.engines.inputs import default_loras
    from lcmtool.lora.io import save_lora
    from lcmtool.lora.synth import synth_lora, target_shapes

    if lora is None and model.startswith("demo:"):
        lora = default_loras(model, "lcm")[0][0]
    if lora is None:  # rank 64 on the 14 LCM-LoRA target kinds, like the released LCM-LoRAs
        lora = str(save_lora(synth_lora(target_shapes(pipe.unet), rank=64, std=1e-3), tmp / "lora.safetensors",
                             format="diffusers"))
    return lora


class _Bench:
    """Both paths on one model and device: cases are measured in rounds, final latents kept for the match check."""

    def __init__(self, pipe, twin, model: str, family: str, device: str, h: int, w: int, n: int, warm: int,
                 compile: bool, log):
        import torch

        from lcmtool.models.pipeline import FastSampler

        self.pipe, self.twin, self.device, self.h, self.w, self.n, self.warm, self.log = (
            pipe, twin, device, h, w, n, warm, log)
        self.base = dict(pipe.scheduler.config)
        self.cuda = device.startswith("cuda")
        self.eager = FastSampler(twin)
        self.compiled = FastSampler(twin, compile=True, fuse_qkv=False) if compile else None  # eager fuses QKV
        gpu = torch.cuda.get_device_name() if self.cuda else None
        peak = next((v for k, v in PEAK_TFLOPS.items() if gpu and k in gpu), None)
        self.peak = peak * 1e12 if peak else None
        dtype = str(pipe.unet.dtype).replace("torch.", "")
        self.tol = TOLERANCE[dtype]
        self.common = {"model": model, "family": family, "device": device, "gpu": gpu, "dtype": dtype,
                       "size": f"{w}x{h}", "torch": torch.__version__, "tolerance": self.tol}
        self.rows: list[dict] = []
        self.latents: dict = {}
        self.flops: dict = {}

    def weights_changed(self) -> None:
        for s in (self.eager, self.compiled):
            if s is not None:
                s.weights_changed()

    def case(self, case: str, batch: int, steps: int, g: float, diffusers: dict[str, str], ours: str) -> dict:
        """Time diffusers' path(s) (name -> row path) against lcmtool's (scheduler `ours`) in alternation."""
        h, w, dev = self.h, self.w, self.device
        fns = {path: _plain(self.pipe, dev, batch, steps, g, h, w) for path in diffusers.values()}
        lats = {path: _plain(self.pipe, dev, batch, steps, g, h, w, "latent") for path in diffusers.values()}
        for path, s in (("lcmtool", self.eager), ("lcmtool_compiled", self.compiled)):
            if s is None:
                continue
            fns[path] = _ours(s, self.base, ours, batch, steps, g, h, w)
            lats[path] = _ours(s, self.base, ours, batch, steps, g, h, w, "latent")
            fns[path]()  # the first call of a shape: the compile, for the compiled path
        for path, fn in lats.items():
            self.latents[case, path, batch] = fn().float()
        ms = _rounds(fns, dev, self.n, self.warm)
        if self.peak and case not in self.flops:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as fc:
                fns[next(iter(diffusers.values()))]()
            self.flops[case] = fc.get_total_flops() / batch
        for path, t in ms.items():
            row = dict(self.common, case=case, path=path, batch=batch, ms_per_image=round(t / batch, 2),
                       images_per_s=round(1000 * batch / t, 2), peak_mem_gb=self._peak(fns[path], path),
                       compile_s=self._compile_s(path, batch, g, ms_call=t),
                       compile_mode=self.compiled.mode if path == "lcmtool_compiled" else None,
                       flop_bound_fraction=(round(self.flops[case] * batch / self.peak * 1000 / t, 3)
                                            if case in self.flops else None))
            self.rows.append(row)
        return ms

    def _compile_s(self, path: str, batch: int, g: float, ms_call: float) -> float | None:
        """Seconds the compiled path's graphs for this case took to compile (their first calls, less one call)."""
        if path != "lcmtool_compiled":
            return None
        f, s = self.twin.vae_scale_factor, self.compiled
        unet = s.compile_times.get((batch, self.h, self.w, g > 1), 0.0)
        decode = s.compile_times.get(("decode", (batch, self.twin.unet.config.in_channels, self.h // f, self.w // f)),
                                     0.0)
        return round(max(0.0, unet + decode - ms_call / 1000), 1)

    def _peak(self, fn, path: str) -> float | None:
        """Peak GB of one call of `fn`, less the weights of the other path's copies."""
        if not self.cuda:
            return None
        import torch

        other = self.pipe if path.startswith("lcmtool") else self.twin
        mods = [m for m in (other.unet, other.vae, other.text_encoder, getattr(other, "text_encoder_2", None)) if m]
        other_bytes = sum(p.numel() * p.element_size() for m in mods for p in m.parameters())
        torch.cuda.reset_peak_memory_stats()
        fn()
        _sync(self.device)
        return round((torch.cuda.max_memory_allocated() - other_bytes) / 2 ** 30, 2)

    def finish(self, refs: dict[str, str]) -> list[dict]:
        """Ratios to plain diffusers and the match check: each row's final latents vs its case's reference path."""
        base = {(r["case"], r["batch"]): r["ms_per_image"] for r in self.rows if r["path"] == refs[r["case"]]}
        for r in self.rows:
            lat = self.latents[r["case"], r["path"], r["batch"]]
            ref = self.latents[r["case"], refs[r["case"]], r["batch"]]
            diff = float((lat - ref).abs().max()) if lat.shape == ref.shape else float("inf")
            b = base.get((r["case"], r["batch"]))
            r.update(reference=refs[r["case"]], max_abs_diff=diff, outputs_match=bool(diff <= self.tol),
                     speedup_vs_diffusers=round(b / r["ms_per_image"], 3) if b else None)
            self.log(f"{r['case']:>15} b{r['batch']:<3} {r['path']:<24} {r['ms_per_image']:9.2f} ms/img "
                     f"{r['images_per_s']:8.2f} img/s  x{r['speedup_vs_diffusers'] or '-':<6} "
                     f"match {r['outputs_match']} ({diff:.1e})"
                     + (f"  {r['compile_mode']} {r['compile_s']} s" if r["compile_s"] is not None else "")
                     + (f"  {r['peak_mem_gb']} GB" if r["peak_mem_gb"] is not None else "")
                     + (f"  {r['flop_bound_fraction']:.1%} of FLOP bound" if r["flop_bound_fraction"] else ""))
        return self.rows


def bench_sample(model: str = "demo:sd", device: str = "auto", dtype: str = "auto", lora: str | None = None,
                 batches: tuple[int, ...] = (1, 16), height: int | None = None, width: int | None = None, n: int = 5,
                 warm: int = 1, dpm_steps: int = 25, compile: bool | None = None, log=print) -> list[dict]:
    """Rows (one per case, batch and path) of ms/image, images/s, peak memory, compile time, ratio to plain
    diffusers and outputs_match; cases: DPM-Solver++ `dpm_steps` CFG 7.5 (teacher; 0: skipped), LCM 4 steps (LoRA)
    at each of `batches`. `compile` None: rows with graphs too (on by default: CUDA torch.compile, CPU traces)."""
    import torch

    from lcmtool.lora.fuse import fuse_into_pipeline
    from lcmtool.lora.io import load_lora
    from lcmtool.models.load import quiet_libraries, resolve_device, resolve_dtype
    from lcmtool.models.pipeline import compile_by_default

    quiet_libraries()
    dev = resolve_device(device)
    pipe, family = _load(model, dev, resolve_dtype(dtype, dev))
    h = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    w = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    B = _Bench(pipe, _twin(pipe), model, family, dev, h, w, n, warm,
               compile_by_default(dev) if compile is None else compile, log)
    dpm = f"dpmpp{dpm_steps}_cfg7.5"
    with tempfile.TemporaryDirectory(prefix="lcmtool-bench-") as tmp, torch.no_grad():
        from diffusers import DPMSolverMultistepScheduler, LCMScheduler

        lora = _lora_file(model, pipe, Path(tmp), lora)
        if dpm_steps:  # 0: the LCM cases only
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(B.base, algorithm_type="dpmsolver++")
            B.case(dpm, 1, dpm_steps, 7.5, {"dpm": "diffusers"}, "dpmpp")
        pipe.scheduler = LCMScheduler.from_config(B.base)
        pipe.load_lora_weights(lora, adapter_name="lcm")  # the docs' way: a peft adapter, unfused
        fuse_into_pipeline(B.twin, [(load_lora(lora), 1.0)])  # lcmtool's way (sample's fused path)
        B.weights_changed()
        unfused = B.case("lcm4", 1, 4, 1.0, {"unfused": "diffusers_lora_unfused"}, "lcm")
        B.rows = [r for r in B.rows if not (r["case"] == "lcm4" and r["path"].startswith("lcmtool"))]
        pipe.fuse_lora()  # then fused, as the docs show next
        for b in batches:
            B.case("lcm4", b, 4, 1.0, {"fused": "diffusers_lora_fused"}, "lcm")
        rows = B.finish({dpm: "diffusers", "lcm4": "diffusers_lora_fused"})
    for r in rows:  # the unfused adapter, timed in its own rounds against lcmtool's
        if r["case"] == "lcm4" and r["batch"] == 1 and r["path"].startswith("lcmtool") and r["path"] in unfused:
            r["speedup_vs_diffusers_unfused"] = round(unfused["diffusers_lora_unfused"] / unfused[r["path"]], 3)
    return rows


def main(argv: list[str]) -> None:
    """`python -m lcmtool.bench.sample key=value ...` (bench_sample's arguments; batches=1,16; out=FILE.jsonl):
    the table on stderr, one JSON row a line on stdout (and in `out`)."""
    import json
    import sys

    args = dict(a.split("=", 1) for a in argv)
    out = args.pop("out", None)
    for k in ("n", "warm", "dpm_steps", "height", "width"):
        if k in args:
            args[k] = int(args[k])
    if "batches" in args:
        args["batches"] = tuple(int(b) for b in args["batches"].split(","))
    if "compile" in args:
        args["compile"] = args["compile"].lower() in ("1", "true", "on", "yes")
    rows = bench_sample(**args, log=lambda *a: print(*a, file=sys.stderr, flush=True))
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    sys.stdout.write(lines)
    if out:
        from lcmtool.fileio import atomic_write_text

        atomic_write_text(out, lines)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
