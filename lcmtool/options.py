"""Every command's options, declared once: each field is a config key (YAML, --set) and, with its help text, a CLI
flag (`--num-images` for `num_images`), derived by cli.py. Defaults live here and nowhere else.

No torch here (the CLI builds its help from this module). The engines take these configs: engines/sample.py
(SampleConfig, CompareConfig), engines/merge.py (MergeConfig, InspectConfig, ConvertConfig), engines/distill.py
(DistillConfig), engines/evaluate.py (EvalConfig), bench/ (BenchConfig).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from lcmtool.config import opt
from lcmtool.lora.formats import LCM_TARGETS

SchedulerName = Literal["lcm", "dpmpp", "ddim", "euler", "tcd"]
DEFAULT_RUNS = ["lcm:1", "lcm:2", "lcm:4", "lcm:8", "dpmpp:4", "dpmpp:8", "dpmpp:25"]
DEMO_PROMPTS = ["a large red circle on the left", "a small blue square at the top",
                "a large white triangle in the centre",
                "a small green cross on the right and a large red square on the left"]
MODEL_HELP = "demo:sd (default) | demo:xl | diffusers folder | .safetensors/.ckpt single file | hub id."


@dataclass
class GenerationConfig:
    """What `sample` and `compare` share: the model, the prompts, the seeds, the size, the machine."""
    model: str = opt("demo:sd", MODEL_HELP)
    model_config: Optional[str] = opt(None, "Single-file checkpoints: a diffusers config folder to use instead of "
                                            "the shipped preset.")
    tokenizer: Optional[str] = opt(None, "Single-file checkpoints: a tokenizer folder (default: the shipped CLIP "
                                         "tokenizer).")
    prompt: Optional[str] = opt(None, "The prompt.")
    prompts: Optional[str] = opt(None, "File: a prompt a line, or JSONL {prompt, seed, negative_prompt}; - reads "
                                       "stdin.")
    negative_prompt: str = opt("", "Negative prompt (has an effect only at guidance > 1).")
    lora: list[str] = opt([], "PATH[:WEIGHT], repeatable; 'none' = no LoRA (on demo models the shipped LCM-LoRA is "
                              "the lcm/tcd default).")
    gamma: float = opt(0.3, "TCD stochasticity gamma in [0, 1] (TCD paper's gamma; diffusers' eta).", min=0, max=1)
    timestep_spacing: Literal["leading", "trailing", "linspace"] = opt("leading")  # dpmpp/ddim/euler only
    seed: int = opt(0, "Seed of the first image; image k of a prompt gets seed+k.", min=-2 ** 63, max=2 ** 64 - 1)
    num_images: int = opt(1, "Images per prompt.", min=1, max=100_000)
    height: Optional[int] = opt(None, "Height in pixels (default: the model's).", min=1, max=16384)
    width: Optional[int] = opt(None, "Width in pixels (default: the model's).", min=1, max=16384)
    device: str = opt("auto", "auto | cpu | cuda | cuda:N.")
    dtype: str = opt("auto", "auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16.")


@dataclass
class SampleConfig(GenerationConfig):
    fuse: bool = opt(True, "Fuse LoRAs into the weights (default; unfused costs ~+88% latency) or keep peft "
                           "adapters.")
    scheduler: SchedulerName = opt("lcm", "lcm (default) | dpmpp | ddim | euler | tcd.")
    steps: int = opt(4, "Denoising steps.", min=1, max=1000)
    guidance: Optional[float] = opt(None, "CFG scale w (default 1.0 for lcm/tcd, 7.5 otherwise).", min=0, max=1000)
    timesteps: Optional[list[int]] = opt(None, "lcm/tcd: explicit timesteps, e.g. 999,759,499,259 (overrides "
                                               "--steps).", min=0, max=999)
    batch_size: int = opt(4, "Images per pipeline call.", min=1, max=4096)
    out: str = opt("outputs/sample", "Output folder.")
    compile: Optional[bool] = opt(None, "Graphs of the UNet and VAE decoder: torch.compile on CUDA (default on), "
                                        "TorchScript traces on CPU (same pixels, ~1 s per shape; default on from "
                                        "100 UNet calls in the run). LCMTOOL_COMPILE_MODE=default: inductor on "
                                        "CPU (minutes to compile).")


@dataclass
class CompareConfig(GenerationConfig):
    runs: list[str] = opt(list(DEFAULT_RUNS), "Columns scheduler:steps[:guidance], comma separated "
                                              "(lcm:1,lcm:2,lcm:4,lcm:8,dpmpp:4,dpmpp:8,dpmpp:25).")
    out: str = opt("outputs/compare.png", "Grid PNG path.")


@dataclass
class MergeConfig:
    style: Optional[str] = opt(None, "Style LoRA tau' (safetensors).")
    lcm: Optional[str] = opt(None, "LCM-LoRA tau_LCM (default: the one shipped for --model).")
    lambda1: float = opt(0.8, "Weight of the style vector (paper eq. 3).", min=-1000, max=1000)
    lambda2: float = opt(1.0, "Weight of the LCM vector (paper eq. 3).", min=-1000, max=1000)
    add: list[str] = opt([], "More vectors: PATH:WEIGHT (repeatable, <0 allowed).")
    method: Literal["concat", "svd", "fuse"] = opt("concat", "concat (exact) | svd (needs --rank) | fuse (into "
                                                             "--model).")
    rank: Optional[int] = opt(None, "Output rank for --method svd.", min=1, max=65536)
    model: Optional[str] = opt("demo:sd", "Base model (picks the default --lcm; fuse target).")
    format: Literal["auto", "kohya", "kohya-sgm", "kohya-diffusers", "diffusers", "peft", "single-file"] = opt(
        "auto", "kohya (SGM block names for SDXL, as kohya/A1111/ComfyUI read) | kohya-diffusers | diffusers | peft; "
                "with fuse: diffusers (folder) | single-file.")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = opt("auto", "auto (the inputs' dtype; fuse: the base model's) "
                                                                 "| fp32 | fp16 | bf16.")
    lambda1_blocks: dict = opt({}, "Per-block lambda1: down=1,mid=1,up=0.8 (or module-path prefixes).")
    lambda2_blocks: dict = opt({}, "Per-block lambda2: down=1,mid=1,up=0.8 (or module-path prefixes).")
    out: Optional[str] = opt(None, "Output .safetensors (fuse: folder or .safetensors).")
    drop_unknown: bool = opt(False, "Drop (and count) LoRA modules that the model family does not have, instead of "
                                    "refusing the merge.")


@dataclass
class InspectConfig:
    file: str = opt("", "LoRA .safetensors to describe.", argument=True)
    family: Optional[Literal["sd15", "sdxl", "ssd1b"]] = opt(None, "sd15 | sdxl | ssd1b (override the guess).")


@dataclass
class ConvertConfig:
    file: str = opt("", "LoRA .safetensors to rewrite.", argument=True)
    format: Literal["kohya", "kohya-sgm", "kohya-diffusers", "diffusers", "peft"] = opt(
        "kohya", "kohya (SGM block names for SDXL; what kohya, A1111 and ComfyUI read: use it for ComfyUI) | "
                 "kohya-diffusers | diffusers (diffusers' load_lora_weights) | peft.")
    out: str = opt("", "Output .safetensors.")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = opt("auto", "auto | fp32 | fp16 | bf16.")


@dataclass
class DistillConfig:
    """Defaults follow the LCM-LoRA release (diffusers train_lcm_distill_lora_*.py); see configs/distill/*.yaml."""
    name: str = opt("distill", "Run name: output goes to runs/<name> unless --out.")
    model: str = opt("demo:sd", "Teacher: demo:sd, demo:xl, a diffusers folder or hub id.")
    family: Literal["auto", "sd15", "sdxl", "ssd1b"] = opt("auto")  # expected family; a mismatch is an error
    out: str = opt("", "Output folder (default runs/<name>).")
    # data
    data: str = opt("demo:shapes", "demo:shapes, an image folder, or WebDataset tar glob.")
    num_samples: int = opt(32768, min=1)  # demo:shapes only: how many scenes to render and cache
    resolution: int = opt(0, min=0, max=16384)  # 0: the UNet's native size (sample_size * VAE factor)
    center_crop: bool = opt(True)       # else a random crop (seeded); SDXL crop coordinates go into time ids
    cache_dir: str = opt("")            # latent/text cache root ("" -> $LCMTOOL_CACHE or ~/.cache/lcmtool)
    uncond: Literal["auto", "empty", "zeros"] = opt("auto")  # auto: empty prompt for SD-1.5, zeros for SDXL
    # > 0: LCD starts from noised *teacher samples* (DPM-Solver++ teacher_steps steps at this CFG scale, one per cached
    # record's caption) instead of the encoded training images: the points the guided ODE and the LCM sampler visit
    teacher_data: float = opt(0.0, min=0, max=100)
    teacher_steps: int = opt(25, min=1, max=1000)  # DPM-Solver++(2M) steps of each teacher sample
    teacher_samples: int = opt(0, min=0)  # teacher samples made (the cache's first records); 0: one per record
    # LoRA (LCM-LoRA: rank 64, alpha 64 on 14 module kinds)
    lora_rank: int = opt(64, "LoRA rank; 0: the whole UNet trains (full LCD: writes unet/, a diffusers folder).",
                         min=0, max=65536)
    lora_alpha: float = opt(64.0, gt=0)
    # the modules the LoRA trains, or in full LCD the ones extract_rank extracts (demo-sd adds conv_in, conv_out and
    # time_embedding.linear_1/2: lcmtool.lora.formats.EMBED_TARGETS)
    target_modules: list[str] = opt(list(LCM_TARGETS), min_items=1)
    conv_rank: int = opt(0, min=0)  # 0: lora_rank; else the rank of the LoRA on 3x3 convs (smaller files)
    conv_alpha: float = opt(0.0, min=0)  # 0: conv_rank * lora_alpha / lora_rank (the same scale alpha / r)
    init_lora: str = opt("", "Start from this LoRA file (its modules, ranks and alphas replace lora_rank, "
                             "lora_alpha, conv_rank and target_modules; with lora_rank 0 the whole UNet starts "
                             "from teacher + its delta).")
    extract_rank: int = opt(0, min=0, max=65536)  # lora_rank 0: the UNet's change also as an SVD LoRA of this rank
    extract_conv_rank: int = opt(0, min=0, max=65536)  # 0: extract_rank; else the extract's rank on 3x3 convs
    # > 0: each module of the extract gets the smallest rank (at most extract_rank / extract_conv_rank) that keeps this
    # fraction of its change's Frobenius norm (kohya resize_lora's sv_fro): rank goes where the change needs it
    extract_fro: float = opt(0.0, min=0, max=1)
    # > 0: the extract's factors take at most this many MB (1e6 bytes at save_dtype); ranks (at most extract_rank /
    # extract_conv_rank) go where sigma^2 per stored value is largest, over all modules (instead of extract_fro)
    extract_budget_mb: float = opt(0.0, min=0)
    # > 0: an activation-aware extract: so many training captions sampled by the trained UNet (LCM 2 / 4 / 8 steps)
    # weigh each module's SVD by its inputs' second moment, so the truncation keeps what changes the layer's output
    extract_calibrate: int = opt(0, min=0, max=100000)
    # LCD (Algorithm 1)
    num_ddim_timesteps: int = opt(50, min=1, max=1000)  # N solver steps over 1000 training steps: interval k = 20
    w_min: float = opt(5.0, min=0)  # guidance scale w ~ U[w_min, w_max]
    w_max: float = opt(15.0, min=0)
    loss: Literal["huber", "l2"] = opt("huber")
    huber_c: float = opt(0.001, gt=0)
    timestep_scaling: float = opt(10.0, gt=0)  # must equal LCMScheduler's timestep_scaling
    ema_decay: float = opt(0.0, min=0, lt=1)  # 0: target = stop-grad student (released LCM-LoRAs); else EMA LoRA
    # optimisation
    max_steps: int = opt(1000, "Optimizer steps.", min=1)
    batch_size: int = opt(16, min=1)  # per device, per micro-step
    grad_accum: int = opt(1, min=1)
    lr: float = opt(1e-4, gt=0)
    adam_beta1: float = opt(0.9, min=0, lt=1)
    adam_beta2: float = opt(0.999, min=0, lt=1)
    adam_eps: float = opt(1e-8, gt=0)
    weight_decay: float = opt(0.0, min=0)
    max_grad_norm: float = opt(1.0, min=0)  # 0: no clipping
    warmup_steps: int = opt(500, min=0)  # constant schedule after a linear warm-up
    lr_schedule: Literal["constant", "cosine"] = opt("constant")  # after the warm-up: constant, or cosine decay to 0
    gradient_checkpointing: bool = opt(False)
    # machine
    device: str = opt("auto")           # auto | cpu | cuda | cuda:N (under accelerate launch: its devices)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = opt("auto")  # auto: bf16 on CUDA, fp32 on CPU
    seed: int = opt(0, min=0, max=2 ** 32 - 1)  # accelerate.set_seed seeds numpy too (32 bits)
    # outputs
    checkpoint_every: int = opt(500, min=0)  # 0: only the final checkpoint
    keep_checkpoints: int = opt(2, min=0)
    resume: str = opt("", "latest, or a checkpoint folder.")
    validate_every: int = opt(500, min=0)  # 0: only at the end; validation grids use LCM 1/2/4/8 steps
    validation_steps: list[int] = opt([1, 2, 4, 8], min=1, max=1000, min_items=1)
    validation_prompts: list[str] = opt(list(DEMO_PROMPTS), min_items=1)
    validation_seed: int = opt(1234, min=-2 ** 63, max=2 ** 64 - 1)
    log_every: int = opt(10, min=1)
    eval_every: int = opt(0, "Every N steps score LCM 2 and 4 steps on held-out prompts (demo models: FD-demo and "
                             "accuracies; others: a grid); keeps checkpoints/best. 0: off.", min=0)
    eval_prompts: str = opt("", "Held-out prompts file, one a line (default: the demo's held-out prompts on demo "
                                "models, else validation_prompts).")
    eval_images: int = opt(80, min=2, max=100000)  # images per eval call (prompts cycled, seed validation_seed + i)
    scale_search: list[float] = opt([], "After training: score tau_LCM at these weights (e.g. 0.6,0.7,0.8,0.9,1) "
                                        "with the held-out hook and write the best into the file. Needs eval_every "
                                        "and the demo evaluator.", min=0.01, max=4)
    # metrics.jsonl always; TensorBoard (accelerate's tracker, <out>/tensorboard) when installed (auto) or required
    report_to: Literal["auto", "tensorboard", "none"] = opt("auto")
    format: Literal["kohya", "kohya-sgm", "kohya-diffusers", "diffusers", "peft"] = opt(
        "kohya", "LoRA file format: kohya, kohya-sgm, kohya-diffusers, diffusers or peft.")
    save_dtype: Literal["fp16", "bf16", "fp32"] = opt("fp16")


@dataclass
class EvalConfig:
    source: str = opt("", "Folder of PNGs (prompts from samples.jsonl or PNG metadata), or a .jsonl file of "
                          "{\"path\", \"prompt\"} lines.", argument=True)
    classifier: Optional[str] = opt(None, "Demo classifier weights (default: the shipped one).")
    device: str = opt("cpu", "cpu, cuda, cuda:N or auto.")
    refs: int = opt(4, "Rendered references per image for FD-demo.", min=1, max=10_000)


@dataclass
class BenchConfig:
    sample: bool = opt(False, "Sampling: plain diffusers vs lcmtool, same run (the default when nothing is named).")
    merge: bool = opt(False, "Merge two SDXL-size rank-64 LoRAs (concat, svd).")
    distill: bool = opt(False, "LCD training step: plain loop vs lcmtool, same run.")
    startup: bool = opt(False, "A one-image `lcmtool sample` command vs a bare diffusers import (wall time, fresh "
                               "processes in alternation).")
    rounds: int = opt(3, "--startup: alternating rounds (medians).", min=1, max=100)
    model: str = opt("demo:sd", "--sample / --startup: demo:sd | random:sd15 | random:sdxl | random:ssd1b | a "
                                "model spec (--startup: a model spec).")
    device: str = opt("auto", "auto | cpu | cuda.")


STYLE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                 "conv2"]  # the style LoRAs' modules (attention, feed-forward and the ResNet convs)


@dataclass
class FinetuneConfig:
    """A style LoRA (tau', paper eq. 2-3) or, with --full, a fine-tuned variant of the model, by the standard
    denoising loss; the data pipeline, checkpoints and outputs are distill's. See configs/finetune/*.yaml."""
    name: str = opt("finetune", "Run name: output goes to runs/<name> unless --out.")
    model: str = opt("demo:sd", "Model to fine-tune: demo:sd, demo:xl, a diffusers folder or hub id.")
    out: str = opt("", "Output folder (default runs/<name>).")
    full: bool = opt(False, "Full fine-tune of the UNet: writes a diffusers pipeline folder (a fine-tuned variant) "
                            "instead of a LoRA.")
    # data (distill's pipeline and latent cache)
    data: str = opt("demo:shapes", "demo:shapes[:outline|striped], an image folder, or WebDataset tar glob.")
    num_samples: int = opt(30000, min=1)  # demo:shapes only: how many scenes to render and cache
    resolution: int = opt(0, min=0, max=16384)  # 0: the UNet's native size
    center_crop: bool = opt(True)
    cache_dir: str = opt("")
    uncond: Literal["auto", "empty", "zeros"] = opt("auto")  # the caption-dropout embedding: auto as distill
    caption_dropout: float = opt(0.0, min=0, max=1)  # share of captions replaced by the unconditional embedding
    # LoRA (ignored with --full)
    lora_rank: int = opt(4, min=1, max=65536)
    lora_alpha: float = opt(4.0, gt=0)
    target_modules: list[str] = opt(list(STYLE_TARGETS), min_items=1)
    # optimisation
    max_steps: int = opt(800, "Optimizer steps.", min=1)
    batch_size: int = opt(256, min=1)
    grad_accum: int = opt(1, min=1)
    lr: float = opt(1e-3, gt=0)
    lr_schedule: Literal["constant", "cosine"] = opt("cosine")  # diffusers.optimization, after warmup_steps
    warmup_steps: int = opt(100, min=0)
    adam_beta1: float = opt(0.9, min=0, lt=1)
    adam_beta2: float = opt(0.999, min=0, lt=1)
    adam_eps: float = opt(1e-8, gt=0)
    weight_decay: float = opt(0.0, min=0)
    max_grad_norm: float = opt(0.0, min=0)  # 0: no clipping
    # machine
    device: str = opt("auto")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = opt("auto")
    seed: int = opt(3)
    # outputs
    checkpoint_every: int = opt(0, min=0)  # 0: only the final checkpoint
    keep_checkpoints: int = opt(2, min=0)
    resume: str = opt("", "latest, or a checkpoint folder.")
    validate_every: int = opt(0, min=0)  # 0: only at the end; grids use DPM-Solver++ at CFG 7.5
    validation_steps: list[int] = opt([8, 25], min=1, max=1000, min_items=1)
    validation_prompts: list[str] = opt(list(DEMO_PROMPTS), min_items=1)
    validation_seed: int = opt(1234)
    log_every: int = opt(10, min=1)
    report_to: Literal["auto", "tensorboard", "none"] = opt("auto")
    format: Literal["kohya", "kohya-sgm", "kohya-diffusers", "diffusers", "peft"] = opt(
        "kohya", "LoRA file format: kohya, kohya-sgm, kohya-diffusers, diffusers or peft.")
    save_dtype: Literal["fp16", "bf16", "fp32"] = opt("fp16")
    style: str = opt("")  # recorded in the LoRA's metadata (lcmtool.style); default: the demo data's style


@dataclass
class PaperConfig:
    """`lcmtool paper`: the LCM-LoRA paper's three claims measured on the demo world (issue 15)."""
    out: str = opt("docs/results", "Folder for results.json, results.md and the figures.")
    work: str = opt("runs/paper", "Intermediates: images, merged LoRAs, made style LoRAs and fine-tuned variants.")
    families: list[str] = opt(["sd", "xl"], "Demo teachers to measure (sd, xl).")
    styles: list[str] = opt(["outline", "striped"], "Styles for Table 3 and the sweep.")
    parts: list[str] = opt(["lcd", "universality", "style", "sweep", "blocks"], "Which parts to run.")
    prompts: int = opt(40, "Held-out prompts per setting (spread over the 40; >= 2).", min=2, max=40)
    images_per_prompt: int = opt(1, "Images per prompt and setting.", min=1, max=1000)
    sweep_prompts: int = opt(0, "Prompts per lambda-sweep cell (0: --prompts).", min=0, max=40)
    lambdas: list[float] = opt([0.2, 0.4, 0.6, 0.8, 1.0, 1.2], "lambda1 and lambda2 values of the sweep.",
                               min=-10, max=10)
    rebuild: bool = opt(False, "Remake the style LoRAs and fine-tuned variants with finetune (and the LCM-LoRAs "
                               "with distill) instead of reusing shipped or earlier ones.")
    finetune_set: list[str] = opt([], "KEY=VALUE overrides of the configs/finetune runs that make missing "
                                      "artefacts (e.g. max_steps=100), repeatable.")
    distill_set: list[str] = opt([], "--rebuild: KEY=VALUE overrides of the LCM-LoRA distillation, repeatable.")
    seed: int = opt(0, "Seed of the first image; every setting samples the same seeds.")
    batch_size: int = opt(40, "Images per pipeline call.", min=1, max=4096)
    device: str = opt("cpu", "cpu | cuda | auto.")
