"""lcmtool's denoising loop over a diffusers SD-1.5 / SDXL pipeline's own components (the fast path, issue 14).

`FastSampler(pipe)` runs what `pipe(...)` runs, with the same numbers, minus the per-call work that repeats:
- the text is encoded once per prompt (an LRU cache), by the pipeline's own `encode_prompt`;
- classifier-free guidance is one UNet call on [negative, positive], as diffusers does;
- the schedule is set once per batch before the loop; the loop itself has no host-device sync (the schedulers
  of lcmtool.models.schedulers keep their tables on the host) and no per-step Python beyond UNet + step;
- latents, step noise and the extra step arguments come from the pipeline's own `prepare_latents` /
  its step-kwargs rule (eta, generator) with one generator per image (an image depends on its seed, not on its batch);
- fused QKV projections (diffusers' `fuse_qkv_projections`, exact: the same products in one matrix) once the
  weights are final, channels_last (CUDA and CPU: measured 13-15% faster UNet and VAE on the demo CPU models),
  inference mode, SDPA (diffusers' default attention);
- optional graphs of the UNet call and the VAE decode with static shapes: torch.compile (CUDA: CUDA graphs; a
  short last batch is padded to the compiled batch size) or, the CPU default, TorchScript traces (`torch.jit.trace`:
  the same aten ops in the same order, so the same numbers, run by TorchScript's C++ interpreter instead of
  diffusers' Python; one trace per input shape, about a second each for the demo models; measured 2.0x on the
  demo UNet call at batch 1, where Python and dispatch overhead is half the time);
- the VAE output becomes uint8 on the device (the same float32 arithmetic as diffusers' postprocess), so only
  bytes cross to the host.
The schedulers stay diffusers' (no hand-written math); the pipeline object is used for its components only.
"""
from __future__ import annotations

import collections
import os
import time

TEXT_CACHE_SIZE = 1024  # prompts kept encoded (SDXL: ~0.3 MB each in fp16)
# Graph modes by device type: "trace" is TorchScript (torch.jit.trace), any other value a torch.compile mode.
# CUDA: CUDA graphs at few steps (launch overhead dominates, ANCHORS.md: 26.5 ms eager vs 5.1 ms reduce-overhead
# UNet at batch 1). CPU: traces (measured on demo:sd, 2 cores, batch 1: UNet call 22 -> 11 ms, VAE decode
# 24 -> 16 ms, bit-identical, ~1.3 s to trace both); inductor ("default", with frozen weights) reaches 1.9x / 1.4x
# but takes 200-340 s to compile cold (19 s / 5 s from its cache). LCMTOOL_COMPILE_MODE overrides either.
COMPILE_MODES = {"cuda": "reduce-overhead", "cpu": "trace"}
TRACE_MIN_CALLS = 100  # CPU auto: trace when a run makes at least this many UNet calls (~1 s saved per 100 calls)


def compile_by_default(device, unet_calls: int | None = None) -> bool:
    """--compile auto. CUDA: on (compiling pays after a few images). CPU: traces, when the run makes at least
    TRACE_MIN_CALLS UNet calls (`unet_calls` None: a long run, such as a benchmark or an evaluation)."""
    if str(device).startswith("cuda"):
        return True
    return str(device) == "cpu" and (unet_calls is None or unet_calls >= TRACE_MIN_CALLS)


def _has_adapters(module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def _trace_module(fn, names: tuple, module):
    """An nn.Module whose forward(*tensors) calls fn(**dict(zip(names, tensors))), with `module` (whose parameters
    fn uses) as its submodule: torch.jit.trace takes positional tensors only, and traces the parameters of the
    module it is given as parameters, not constants."""
    import torch

    class Call(torch.nn.Module):
        def forward(self, *tensors):
            return fn(**dict(zip(names, tensors)))
    call = Call()
    call.add_module("module", module)
    return call


class Traced:
    """TorchScript traces of `fn(**tensors)`, one per signature (names, shapes, dtypes, devices of the tensors):
    the aten ops one Python call ran, replayed without Python. A trace is exact for the inputs' shapes and dtypes
    (their values flow through it) but bakes in any Python decision: use it only on shape-static code whose
    weights change in place (a trace keeps the modules' parameter tensors, not their values). A signature whose
    trace fails runs `fn` itself from then on (counted in `failed`)."""

    def __init__(self, fn, module):
        self.fn, self.module = fn, module  # module: the nn.Module whose parameters fn uses (held by the traces)
        self.graphs: dict = {}
        self.failed: dict = {}
        self.setup_s = 0.0  # seconds spent tracing, with each graph's first run (TorchScript optimises it then)

    def __call__(self, **tensors):
        import torch

        names = tuple(k for k, v in tensors.items() if v is not None)
        args = tuple(tensors[k] for k in names)
        key = tuple((k, tuple(a.shape), a.dtype, a.device.type) for k, a in zip(names, args))
        g = self.graphs.get(key)
        if g is None:
            if key in self.failed:
                return self.fn(**tensors)
            import warnings

            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():  # TracerWarning (shape checks baked in: static shapes here) and
                    warnings.simplefilter("ignore")  # torch.jit's deprecation notice
                    g = torch.jit.trace(_trace_module(self.fn, names, self.module).eval(), args, check_trace=False)
                    out = g(*args)
            except Exception as e:  # noqa: BLE001 - untraceable code runs eagerly, with the same numbers
                self.failed[key] = f"{type(e).__name__}: {e}"
                return self.fn(**tensors)
            self.graphs[key] = g
            self.setup_s += time.perf_counter() - t0
            return out
        return g(*args)


class NonFiniteImage(ValueError):
    """The decoded pixels of these batch positions hold NaN or inf (what is there is not an image)."""

    def __init__(self, positions: list[int]):
        super().__init__(f"non-finite pixels in batch positions {positions}")
        self.positions = positions


class FastSampler:
    """Sampling with `pipe`'s components; `sampler(prompts, negatives, seeds, ...)` -> uint8 images or PIL."""

    def __init__(self, pipe, compile: bool = False, fuse_qkv: bool = True, mode: str | None = None):
        self.pipe = pipe
        self.unet, self.vae = pipe.unet, pipe.vae
        self.device = pipe.unet.device
        self.xl = getattr(pipe, "text_encoder_2", None) is not None
        self.compile, self.fuse_qkv = compile, fuse_qkv
        self.mode = mode or os.environ.get("LCMTOOL_COMPILE_MODE") or COMPILE_MODES.get(self.device.type, "default")
        self.compile_s = 0.0          # first-call cost of the compiled graphs (seconds, all shapes so far)
        self.compile_times: dict = {}  # graph -> its first call's seconds: (batch, h, w, cfg) UNet, ("decode", shape)
        self.static_batch: int | None = None  # compiled: every batch padded to this size
        self._text: collections.OrderedDict = collections.OrderedDict()
        self._unet = self._decode = None
        self.traced_unet = self.traced_decode = None  # mode "trace": the Traced callables (their graphs, failures)
        self._traces: list = []  # every Traced made so far (trace_s sums their time, dropped ones included)
        self._qkv = False
        self._step_params: dict = {}  # scheduler class -> the parameter names of its step()
        self._vae_dtype = None
        self._stale: set = set()

    # ---- weights ----

    def prepare(self) -> None:
        """Once the weights are final (LoRAs fused): fused QKV, channels_last, torch.compile. Outside inference
        mode: the weights stay ordinary tensors (a LoRA can be fused into them in place later)."""
        import torch

        if self._unet is not None:
            return
        decode_ready = self._decode is not None
        if self.fuse_qkv and not self._qkv and not _has_adapters(self.unet):  # peft adapters: to_qkv bypasses them
            self.unet.fuse_qkv_projections()
            self._qkv = True
        vae = self.vae
        if self.xl and vae.dtype == torch.float16 and vae.config.force_upcast:  # SDXL's VAE overflows in fp16:
            vae.to(torch.float32)                                    # diffusers upcasts it for each decode, we once
        self.unet.to(memory_format=torch.channels_last)
        self.vae.to(memory_format=torch.channels_last)
        self._vae_dtype = vae.dtype

        def decode(z):
            return vae.decode(z, return_dict=False)[0]

        self._unet = self.unet
        if not decode_ready:
            self._decode = decode
        if self.compile and self.mode == "trace":
            self.traced_unet = None
            if not _has_adapters(self.unet):  # an adapter's scale or on/off switch is Python: it would be baked in
                unet = self.unet

                def unet_call(x, t, cond, tcond=None, **added):
                    return unet(x, t, encoder_hidden_states=cond, timestep_cond=tcond,
                                added_cond_kwargs=added or None, return_dict=False)[0]
                traced = self.traced_unet = Traced(unet_call, unet)
                self._traces.append(traced)

                def traced_call(x, t, encoder_hidden_states=None, timestep_cond=None, added_cond_kwargs=None,
                                return_dict=False):
                    return (traced(x=x, t=t, cond=encoder_hidden_states, tcond=timestep_cond,
                                   **(added_cond_kwargs or {})),)
                self._unet = traced_call
            if not decode_ready:
                traced_vae = self.traced_decode = Traced(decode, vae)
                self._traces.append(traced_vae)
                self._decode = lambda z: traced_vae(z=z)
        elif self.compile:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.expanduser("~/.cache/lcmtool/inductor"))
            # CPU: inductor with frozen weights (prepacked mkldnn convs: measured 1.9x on the demo UNet, 1.4x on
            # its VAE, where plain inductor gave 1.4x / 1.0x); weights_changed() compiles again
            kw = dict(options={"freezing": True}) if self.device.type == "cpu" else dict(mode=self.mode)
            self._unet = torch.compile(self.unet, dynamic=False, **kw)
            if not decode_ready:
                self._decode = torch.compile(decode, dynamic=False, **kw)

    @property
    def trace_s(self) -> float:
        """Seconds spent so far tracing (mode "trace"; with each graph's first run): a one-off cost per shape."""
        return sum(t.setup_s for t in self._traces)

    def set_compile(self, on: bool) -> None:
        """Compile (or not) from the next call on; the weights stay as they are."""
        if on != self.compile:
            self.compile = on
            self._unet = self._decode = None

    def weights_changed(self) -> None:
        """Call after changing weights in place (fusing a LoRA, which may change the text encoders too): the prompt
        cache is emptied, QKV is fused again and compiled graphs are made again on the next call."""
        self._text.clear()
        if self._qkv:
            self.unet.unfuse_qkv_projections()
            self._qkv = False
        self.traced_unet = None  # its graphs go (their time stays counted in trace_s)
        self._unet = None  # the VAE's weights are not a LoRA's: its compiled decode stays
        self._stale = {k for k in self.compile_times if k[0] != "decode"}  # compiled again on their next call

    # ---- text ----

    def _encode(self, texts: list[str]) -> None:
        """Encode the texts not yet cached, in one text-encoder call, with the pipeline's own encode_prompt."""
        todo = list(dict.fromkeys(t for t in texts if t is not None and t not in self._text))
        if todo:
            out = self.pipe.encode_prompt(todo, device=self.device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
            embeds, pooled = out[0], (out[2] if self.xl else None)
            for i, t in enumerate(todo):
                self._text[t] = (embeds[i:i + 1], pooled[i:i + 1] if pooled is not None else None)
        for t in texts:
            if t in self._text:
                self._text.move_to_end(t)
        while len(self._text) > TEXT_CACHE_SIZE:
            self._text.popitem(last=False)

    def _rows(self, texts: list[str | None]):
        """Stacked rows of `texts`; None: zeros (SDXL's empty negative prompt)."""
        import torch

        self._encode(texts)
        rows = [self._text[t] for t in texts if t is not None]
        e, p = rows[0]
        zero = (torch.zeros_like(e), torch.zeros_like(p) if p is not None else None)
        rows = [zero if t is None else self._text[t] for t in texts]
        embeds = torch.cat([e for e, _ in rows])
        return embeds, (torch.cat([p for _, p in rows]) if self.xl else None)

    def conditioning(self, prompts: list[str], negatives: list[str], cfg: bool, height: int, width: int):
        """-> (encoder_hidden_states, added_cond_kwargs or None) for one UNet call, [negatives; prompts] with CFG."""
        import torch

        zeros = self.xl and self.pipe.config.force_zeros_for_empty_prompt  # as diffusers for negative_prompt=None
        negs = [None if zeros and not t else t for t in negatives] if cfg else []
        embeds, pooled = self._rows(list(prompts) + negs)
        if cfg:
            n = len(prompts)
            embeds, pooled = torch.cat([embeds[n:], embeds[:n]]), (
                torch.cat([pooled[n:], pooled[:n]]) if pooled is not None else None)
        if not self.xl:
            return embeds, None
        proj = self.pipe.text_encoder_2.config.projection_dim
        ids = self.pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=embeds.dtype,
                                          text_encoder_projection_dim=proj)
        ids = ids.to(self.device).repeat(embeds.shape[0], 1)
        return embeds, {"text_embeds": pooled, "time_ids": ids}

    # ---- the loop ----

    def __call__(self, prompts: list[str], negatives: list[str], seeds: list[int], scheduler, steps: int,
                 guidance: float, height: int, width: int, timesteps: list[int] | None = None,
                 eta: float | None = None, output: str = "pil"):
        """Images for prompts[i] with seeds[i]; `scheduler` is a pinned scheduler (lcmtool.models.schedulers).

        output "pil" (PIL images), "uint8" (a host tensor B x H x W x 3) or "latent" (final latents, on device)."""
        import torch

        self.prepare()
        n = len(prompts)
        pad = max(0, (self.static_batch or n) - n) if self.compile and self.mode != "trace" else 0  # a trace: ~1 s
        prompts, negatives = list(prompts) + [prompts[-1]] * pad, list(negatives) + [negatives[-1]] * pad
        seeds = list(seeds) + [seeds[-1]] * pad
        with torch.inference_mode():
            latents = self.denoise(prompts, negatives, seeds, scheduler, steps, guidance, height, width,
                                   timesteps, eta)
            if output == "latent":
                return latents[:n]
            images = self.decode(latents)[:n]
        if output == "uint8":
            return images
        from PIL import Image

        return [Image.fromarray(im) for im in images.numpy()]

    def denoise(self, prompts, negatives, seeds, scheduler, steps, guidance, height, width, timesteps=None,
                eta=None):
        """Final latents (on the device) of the batch; the loop has no host-device sync."""
        import torch
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        pipe, unet = self.pipe, self.unet
        cfg = guidance > 1 and unet.config.time_cond_proj_dim is None  # diffusers' do_classifier_free_guidance
        cond, added = self.conditioning(prompts, negatives, cfg, height, width)
        gens = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        pipe.scheduler = scheduler  # prepare_latents reads pipe.scheduler (init_noise_sigma)
        ts, _ = retrieve_timesteps(scheduler, None if timesteps else steps, self.device,
                                   list(timesteps) if timesteps else None)
        latents = pipe.prepare_latents(len(prompts), unet.config.in_channels, height, width, cond.dtype,
                                       self.device, gens)
        extra = self._step_kwargs(scheduler, gens, 0.0 if eta is None else eta)
        tcond = None
        if unet.config.time_cond_proj_dim is not None:
            w = torch.tensor(guidance - 1).repeat(len(prompts))
            tcond = pipe.get_guidance_scale_embedding(w, embedding_dim=unet.config.time_cond_proj_dim).to(
                device=self.device, dtype=latents.dtype)
        kw = dict(encoder_hidden_states=cond, timestep_cond=tcond, added_cond_kwargs=added, return_dict=False)
        graphs = self._graphs()
        t0, key = time.perf_counter(), (len(prompts), height, width, cfg)
        for t in ts:
            x = torch.cat([latents] * 2) if cfg else latents
            x = scheduler.scale_model_input(x, t)
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            eps = self._unet(x, t, **kw)[0]
            if graphs:
                eps = eps.clone()  # the graph's output buffer is reused by the next replay
            if cfg:
                uncond, text = eps.chunk(2)
                eps = uncond + guidance * (text - uncond)
            latents = scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
        self._note_compile(key, t0)
        return latents

    def _step_kwargs(self, scheduler, gens, eta: float) -> dict:
        """diffusers' prepare_extra_step_kwargs (eta and generator where step() takes them), its signature
        look-up done once per scheduler class."""
        import inspect

        params = self._step_params.get(type(scheduler))
        if params is None:
            params = self._step_params[type(scheduler)] = set(inspect.signature(scheduler.step).parameters)
        return {k: v for k, v in (("eta", eta), ("generator", gens)) if k in params}

    def decode(self, latents):
        """Final latents -> uint8 images (B x H x W x 3) on the host, as diffusers' postprocess rounds them."""
        import torch

        vae = self.vae
        latents = latents.to(self._vae_dtype)  # (diffusers' ModelMixin.dtype walks the parameters: ~1 ms)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        if self._graphs():
            torch.compiler.cudagraph_mark_step_begin()
        t0 = time.perf_counter()
        image = self._decode(latents)
        finite = torch.isfinite(image).flatten(1).all(1)  # clamp would turn NaN into a black image, silently
        image = (image * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()  # diffusers' denormalize, pt_to_numpy
        out = (image * 255).round().to(torch.uint8).cpu()                      # and numpy_to_pil
        bad = [i for i, ok in enumerate(finite.tolist()) if not ok]  # one sync, after the copy above
        if bad:
            raise NonFiniteImage(bad)
        self._note_compile(("decode", tuple(latents.shape)), t0)
        return out

    def _graphs(self) -> bool:
        return self.compile and self.device.type == "cuda" and self.mode == "reduce-overhead"

    def _note_compile(self, key, t0: float) -> None:
        """The first call of each compiled shape pays the compile: add its time to compile_s."""
        if self.compile and (key not in self.compile_times or key in self._stale):
            self._stale.discard(key)
            if self.device.type == "cuda":
                import torch

                torch.cuda.synchronize()
            self.compile_times[key] = time.perf_counter() - t0
            self.compile_s += self.compile_times[key]
