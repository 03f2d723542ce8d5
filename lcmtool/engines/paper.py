"""`lcmtool paper` (`make paper`): the LCM-LoRA paper's three claims measured on the demo world (issue 15).

One process, one pipeline per model (loaded once; LoRAs are fused into its UNet and the UNet's weights restored
between settings), images scored by `engines.evaluate.evaluate` exactly as `lcmtool eval` scores a folder:
- Table 1 (claim 1, LCD, Fig. 2): LCM 1/2/4/8 steps vs DPM-Solver++ 4/8/25 and DDIM 4/25 at CFG 7.5, per teacher.
- Table 2 (claim 2, universality): the LCM-LoRA, untouched, on fine-tuned variants: LCM 4 vs the variant's own
  DPM-Solver++ 25; the base teacher for reference; the SD LoRA on the XL teacher must be refused.
- Table 3 (claim 3, style, eq. 2-3, Fig. 3): style LoRA at DPM-Solver++ 25 CFG 7.5, merged tau'_LCM (0.8, 1.0) at
  LCM 2/4/8, the style LoRA alone at LCM 4, tau_LCM alone at LCM 4; the lambda sweep and per-block lambdas.
Missing artefacts (XL style LoRAs, fine-tuned variants) are made with `finetune` (--rebuild remakes all);
engines/paper_report.py writes results.md and the figures.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

from lcmtool.errors import LcmError, to_stderr
from lcmtool.options import PaperConfig

REPO = Path(__file__).resolve().parents[2]
TABLE1 = [("lcm", 1), ("lcm", 2), ("lcm", 4), ("lcm", 8), ("dpmpp", 4), ("dpmpp", 8), ("dpmpp", 25), ("ddim", 4),
          ("ddim", 25)]
CFG = 7.5            # the teachers' baselines (paper Fig. 3: DPM-Solver++ at w = 7.5)
PAPER_LAMBDAS = (0.8, 1.0)  # paper sec. 3.2
ACC_BOUND, FD_BOUND, STYLE_BOUND = 0.9, 1.5, 0.8  # the bars
WEAK_STYLE = 0.5  # a style LoRA below this style accuracy at DPM-Solver++ 25 makes its claim-3 ratio say little
VARIANT_STYLE = "striped"  # configs/finetune/demo-variant.yaml fine-tunes on striped renders
BLOCK_TRIALS = {  # per-block lambda1 (style) against the uniform pair; lambda2 (tau_LCM) stays 1.0
    "style up-weighted in up blocks": {"down": 0.6, "mid": 0.8, "up": 1.0},
    "style up-weighted in down blocks": {"down": 1.0, "mid": 0.8, "up": 0.6},
    "style 1.0 everywhere": {"down": 1.0, "mid": 1.0, "up": 1.0},
}


def attr_acc(row: dict) -> float:
    """Attribute accuracy: the mean of the evaluator's shape, colour, size and position accuracies."""
    return sum(row[k] for k in ("shape_acc", "color_acc", "size_acc", "position_acc")) / 4


def spread(prompts: list[str], n: int) -> list[str]:
    """n of the prompts, evenly spread (every pair, position and size stays represented)."""
    return [prompts[int(i * len(prompts) / n)] for i in range(min(n, len(prompts)))]


class Bench:
    """One loaded pipeline; `run` samples one setting (LoRAs fused, scheduler pinned), writes the PNGs and scores
    them with the evaluator. Results are memoised by setting."""

    def __init__(self, spec: str, name: str, cfg: PaperConfig, work: Path, log):
        import torch

        from lcmtool.engines import sample as S

        self.spec, self.name, self.cfg, self.work, self.log = spec, name, cfg, work, log
        self.pipe, self.family, self.device, self.load_ms = S.load(spec, cfg.device, "fp32")
        self.base_config = dict(self.pipe.scheduler.config)
        self.size = S.image_size(self.pipe, None, None)
        self.base_state = {k: v.detach().clone() for k, v in self.pipe.unet.state_dict().items()}
        self.rows: dict[str, dict] = {}
        self.images: dict[str, list] = {}
        # TorchScript traces: the same pixels, ~1.7x faster at the demo's sizes; they keep the UNet's parameter
        # tensors, so the in-place load_state_dict and LoRA fusing of each setting below reach them (QKV unfused)
        S.sampler_of(self.pipe, compile=True, mode="trace")
        with torch.no_grad():  # warm-up: no setting pays for first-call allocation
            S.set_scheduler(self.pipe, self.base_config, "ddim", 1, "leading")
            S.generate(self.pipe, [S.Job("a large red circle on the left", "", 0)], "ddim", 1, 1.0, *self.size,
                       self.device)

    def run(self, key: str, loras: list[tuple[str, float]], scheduler: str, steps: int, prompts: list[str]) -> dict:
        from lcmtool.engines import sample as S
        from lcmtool.engines.evaluate import evaluate
        from lcmtool.outputs.png import save_png

        if key in self.rows:
            return self.rows[key]
        cfg = self.cfg
        guidance = CFG if scheduler in ("dpmpp", "ddim") else 1.0
        self.pipe.unet.load_state_dict(self.base_state)
        S.apply_loras(self.pipe, self.family, self.spec, loras, fuse=True)
        S.set_scheduler(self.pipe, self.base_config, scheduler, steps, "leading")
        jobs = [S.Job(p, "", cfg.seed + i) for i, p in enumerate(x for p in prompts
                                                                 for x in [p] * cfg.images_per_prompt)]
        folder = self.work / "images" / self.name / key
        folder.mkdir(parents=True, exist_ok=True)
        images, total_ms, lines = [], 0.0, []
        for b in range(0, len(jobs), cfg.batch_size):
            ims, ms = S.generate(self.pipe, jobs[b:b + cfg.batch_size], scheduler, steps, guidance, *self.size,
                                 self.device, steady=True)
            images += ims
            total_ms += ms
        for i, (job, im) in enumerate(zip(jobs, images, strict=True)):
            path = folder / f"{i:05d}-{job.seed}.png"
            save_png(im, path, {"prompt": job.prompt, "seed": job.seed, "scheduler": scheduler, "steps": steps,
                                "guidance": guidance, "model": self.spec,
                                "loras": [{"path": p, "weight": w} for p, w in loras]}, a1111=False)
            lines.append(json.dumps({"path": path.name, "prompt": job.prompt}) + "\n")
        (folder / "samples.jsonl").write_text("".join(lines))
        res = evaluate(folder, device="cpu")
        row = {"key": key, "model": self.name, "scheduler": scheduler, "steps": steps, "guidance": guidance,
               "loras": [[Path(p).name, w] for p, w in loras], "n": res["n"],
               **{k: res[k] for k in ("shape_acc", "color_acc", "size_acc", "position_acc", "style_acc", "fd")},
               "ms_per_image": round(total_ms / len(jobs), 2)}
        row["attr_acc"] = attr_acc(row)
        self.rows[key], self.images[key] = row, images[:len(prompts) * cfg.images_per_prompt:cfg.images_per_prompt]
        self.log(f"  {self.name} {key}: attr {row['attr_acc']:.3f} style {row['style_acc']} fd {row['fd']:.2f} "
                 f"({row['ms_per_image']:.0f} ms/img)")
        return row


# ------------------------------------------------------------------------------------------------ artefacts

def made_by_finetune(config: str, model: str, out: Path, cfg: PaperConfig, log, commands: list) -> Path:
    """Run configs/finetune/<config> on `model` into `out` (kept for reuse); -> its LoRA or pipeline folder."""
    from lcmtool.config import resolve
    from lcmtool.engines.finetune import finetune
    from lcmtool.options import FinetuneConfig

    sets = list(cfg.finetune_set) + [f"device={cfg.device}"]
    ft = resolve(FinetuneConfig, str(REPO / "configs" / "finetune" / config), {"model": model, "out": str(out)},
                 sets)
    commands.append(f"lcmtool finetune --config configs/finetune/{config} --model {model} --out {out} "
                    + " ".join(f"--set {s}" for s in sets))
    log(f"making {out.name} with finetune ({ft.max_steps} steps x {ft.batch_size})")
    summary = finetune(ft, log=log)
    return Path(summary.get("lora") or summary["pipeline"])


def artefacts(cfg: PaperConfig, work: Path, log, commands: list) -> dict:
    """{lcm: {fam: path}, style: {fam: {style: path}}, variant: {fam: folder}, origin: {path: how}}: shipped ones
    reused, earlier made ones reused, the rest made (all remade with --rebuild)."""
    from lcmtool.demo import ASSETS, DEMO_LCM_LORAS

    out: dict = {"lcm": {}, "style": {}, "variant": {}, "origin": {}}
    made = work / "made"
    for fam in cfg.families:
        lcm = ASSETS / DEMO_LCM_LORAS[fam]
        if cfg.rebuild:
            lcm = rebuild_lcm(fam, made / f"lcm-{fam}", cfg, log, commands)
        out["lcm"][fam] = str(lcm)
        out["origin"][str(lcm)] = "made by distill" if cfg.rebuild else "shipped"
        need_style = {"style", "sweep", "blocks"} & set(cfg.parts)
        for style in cfg.styles if need_style else []:
            shipped = ASSETS / f"style-{style}-demo-{fam}.safetensors"
            mine = made / f"style-{style}-{fam}" / "lora.safetensors"
            if shipped.is_file() and not cfg.rebuild:
                path, how = shipped, "shipped"
            elif mine.is_file() and not cfg.rebuild:
                path, how = mine, f"made earlier by finetune (reused; {_budget(mine.parent)})"
            else:
                path = made_by_finetune(f"demo-style-{style}.yaml", f"demo:{fam}", mine.parent, cfg, log, commands)
                how = "made by finetune"
            out["style"].setdefault(fam, {})[style] = str(path)
            out["origin"][str(path)] = how
        if "universality" in cfg.parts:
            folder = made / f"variant-{fam}" / "pipeline"
            how = f"made earlier by finetune --full (reused; {_budget(folder.parent)})"
            if cfg.rebuild or not (folder / "model_index.json").is_file():
                folder = made_by_finetune("demo-variant.yaml", f"demo:{fam}", folder.parent, cfg, log, commands)
                how = "made by finetune --full"
            out["variant"][fam] = str(folder)
            out["origin"][str(folder)] = how
    return out


BUDGET_KEYS = ("max_steps", "batch_size", "num_samples", "lr")


def _budget(run: Path) -> str:
    """What a reader of the results needs of an earlier finetune run's config (run/config.yaml): its budget."""
    import yaml

    try:
        conf = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return f"its config {run / 'config.yaml'} unreadable"
    return ", ".join(f"{k} {conf[k]}" for k in BUDGET_KEYS if k in conf) + f"; config {run / 'config.yaml'}"


def rebuild_lcm(fam: str, out: Path, cfg: PaperConfig, log, commands: list) -> Path:
    from lcmtool.config import resolve
    from lcmtool.engines.distill import distill
    from lcmtool.options import DistillConfig

    sets = list(cfg.distill_set) + [f"device={cfg.device}"]
    dc = resolve(DistillConfig, str(REPO / "configs" / "distill" / f"demo-{fam}.yaml"),
                 {"model": f"demo:{fam}", "out": str(out)}, sets)
    commands.append(f"lcmtool distill --config configs/distill/demo-{fam}.yaml --out {out} "
                    + " ".join(f"--set {s}" for s in sets))
    log(f"distilling the {fam} LCM-LoRA ({dc.max_steps} steps)")
    return Path(distill(dc, log=log)["lora"])


# ------------------------------------------------------------------------------------------------ the parts

def table1(bench: Bench, lcm: str, prompts: list[str]) -> list[dict]:
    """TABLE1's settings, then a control: the teacher alone under the LCM sampler at 4 steps (no tau_LCM)."""
    rows = [bench.run(f"{s}-{n}", [(lcm, 1.0)] if s == "lcm" else [], s, n, prompts) for s, n in TABLE1]
    return rows + [dict(bench.run("lcm-4-no-lora", [], "lcm", 4, prompts), control=True)]


def within(fast: dict, ref: dict) -> dict:
    """The claim-1 bounds of `fast` against `ref`: attribute accuracy ratio, FD ratio, and whether both hold."""
    acc = fast["attr_acc"] / ref["attr_acc"] if ref["attr_acc"] else float("inf")
    fd = fast["fd"] / ref["fd"] if ref["fd"] else float("inf")
    return {"acc_ratio": acc, "fd_ratio": fd, "pass": acc >= ACC_BOUND and fd <= FD_BOUND}


def table2_rows(bench: Bench, lcm: str, prompts: list[str], what: str) -> dict:
    fast = bench.run(f"{VARIANT_STYLE}-lcm-4", [(lcm, 1.0)], "lcm", 4, prompts)
    ref = bench.run(f"{VARIANT_STYLE}-dpmpp-25", [], "dpmpp", 25, prompts)
    return {"model": bench.name, "what": what, "lcm4": fast, "dpmpp25": ref, **within(fast, ref)}


def refusal(lcm_sd: str, cfg: PaperConfig, work: Path) -> dict:
    """The SD LCM-LoRA on the XL teacher, through `lcmtool sample`'s own path: it must be refused."""
    from lcmtool.engines.sample import sample
    from lcmtool.options import SampleConfig

    try:
        sample(SampleConfig(model="demo:xl", lora=[lcm_sd], prompt="a large red circle on the left",
                            device=cfg.device, out=str(work / "refused")), progress=False)
    except LcmError as e:  # results are committed: the LoRA's path as the repository (or its name) says it
        return {"refused": True, "message": str(e).replace(lcm_sd, _display_path(lcm_sd))}
    return {"refused": False, "message": "the SD LoRA was accepted by the XL teacher"}


def _display_path(path: str) -> str:
    """`path` relative to the working directory when it lies under it, else its file name (no machine paths)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return p.name


def _portable(arts: dict) -> dict:
    """The artefacts record of results.json with every path shown by `_display_path` (no machine paths)."""
    def path(x: str) -> str:  # a path, not one of the origin notes (which have spaces)
        return _display_path(x) if "/" in x and " " not in x else x

    def walk(x):
        return {path(k): walk(v) for k, v in x.items()} if isinstance(x, dict) else path(x) if isinstance(x, str) else x

    return walk(arts)


def merged(style: str, lcm: str, out: Path, l1: float, l2: float, blocks: dict | None = None) -> str:
    """tau'_LCM = lambda1 tau' + lambda2 tau_LCM (eq. 3) written by the merge engine (concat: exact)."""
    from lcmtool.engines.merge import run_merge
    from lcmtool.options import MergeConfig

    run_merge(MergeConfig(style=style, lcm=lcm, lambda1=l1, lambda2=l2, lambda1_blocks=blocks or {},
                          out=str(out), model=None))
    return str(out)


def table3(bench: Bench, style_path: str, lcm: str, style: str, prompts: list[str], work: Path) -> dict:
    l1, l2 = PAPER_LAMBDAS
    tau = merged(style_path, lcm, work / "merged" / f"{bench.name}-{style}-{l1}-{l2}.safetensors", l1, l2)
    rows = {"style_dpmpp25": bench.run(f"{style}-style-dpmpp-25", [(style_path, 1.0)], "dpmpp", 25, prompts)}
    for n in (2, 4, 8):
        rows[f"merged_lcm{n}"] = bench.run(f"{style}-merged-lcm-{n}", [(tau, 1.0)], "lcm", n, prompts)
    rows["style_lcm4"] = bench.run(f"{style}-style-lcm-4", [(style_path, 1.0)], "lcm", 4, prompts)
    rows["lcm_only_lcm4"] = bench.run(f"{style}-lcm-4", [(lcm, 1.0)], "lcm", 4, prompts)
    ref, fast = rows["style_dpmpp25"], rows["merged_lcm4"]
    keep = fast["style_acc"] / ref["style_acc"] if ref["style_acc"] else float("inf")
    acc = fast["attr_acc"] / ref["attr_acc"] if ref["attr_acc"] else float("inf")
    return {"rows": rows, "style_keep": keep, "acc_ratio": acc, "pass": keep >= STYLE_BOUND and acc >= ACC_BOUND,
            "weak_reference": (ref["style_acc"] or 0.0) < WEAK_STYLE}


def sweep(bench: Bench, style_path: str, lcm: str, style: str, prompts: list[str], lambdas: list[float],
          ref: dict | None) -> dict:
    """Style accuracy, FD-demo and attribute accuracy at LCM 4 for every (lambda1, lambda2); fusing the two LoRAs
    at weights (l1, l2) is eq. 3 exactly (the concat merge's delta). Best: the highest style accuracy whose
    attribute accuracy keeps the claim-1 bound against the style LoRA at DPM-Solver++ 25 (ties: lower FD)."""
    grid = {k: [[float("nan")] * len(lambdas) for _ in lambdas] for k in ("style_acc", "fd", "attr_acc")}
    for i, l1 in enumerate(lambdas):
        for j, l2 in enumerate(lambdas):
            row = bench.run(f"{style}-sweep-{l1:g}-{l2:g}", [(style_path, l1), (lcm, l2)], "lcm", 4, prompts)
            for k in grid:
                grid[k][i][j] = row[k] if row[k] is not None else float("nan")
    floor = ACC_BOUND * ref["attr_acc"] if ref else 0.0
    cands = [(grid["style_acc"][i][j], -grid["fd"][i][j], i, j) for i in range(len(lambdas))
             for j in range(len(lambdas)) if grid["attr_acc"][i][j] >= floor]
    best = max(cands) if cands else None
    return {"lambdas": lambdas, **grid, "prompts": len(prompts), "attr_floor": floor,
            "best": None if best is None else {"lambda1": lambdas[best[2]], "lambda2": lambdas[best[3]],
                                               "index": [best[2], best[3]], "style_acc": best[0], "fd": -best[1]}}


def blocks(bench: Bench, style_path: str, lcm: str, style: str, prompts: list[str], work: Path) -> list[dict]:
    out = []
    for name, b in BLOCK_TRIALS.items():
        tag = "-".join(f"{k}{v:g}" for k, v in b.items())
        tau = merged(style_path, lcm, work / "merged" / f"{bench.name}-{style}-blocks-{tag}.safetensors",
                     PAPER_LAMBDAS[0], PAPER_LAMBDAS[1], b)
        out.append({"trial": name, "lambda1_blocks": b, "lambda2": PAPER_LAMBDAS[1],
                    **bench.run(f"{style}-blocks-{tag}-lcm-4", [(tau, 1.0)], "lcm", 4, prompts)})
    return out


# ------------------------------------------------------------------------------------------------ the run

def row_of(rows: list[dict], scheduler: str, steps: int) -> dict:
    """The row of a setting of Table 1 (not its control)."""
    return next(r for r in rows if r["scheduler"] == scheduler and r["steps"] == steps and not r.get("control"))


def measure(cfg: PaperConfig, arts: dict, work: Path, log) -> tuple[dict, dict]:
    """Every part on every family: -> (results, {bench name: Bench}) (the benches keep images for the figures)."""
    from lcmtool.demo.world import heldout_prompts

    plain = spread(heldout_prompts(), cfg.prompts)
    styled = {s: spread(heldout_prompts(s), cfg.prompts) for s in set(cfg.styles) | {VARIANT_STYLE}}
    sweep_n = cfg.sweep_prompts or cfg.prompts
    res: dict = {}
    benches: dict = {}
    for fam in cfg.families:
        lcm = arts["lcm"][fam]
        log(f"demo:{fam}")
        bench = benches[fam] = Bench(f"demo:{fam}", f"demo-{fam}", cfg, work, log)
        if "lcd" in cfg.parts:
            res.setdefault("table1", {})[fam] = table1(bench, lcm, plain)
        if "universality" in cfg.parts:
            t2 = res.setdefault("table2", {"variants": [], "base": []})
            t2["base"].append(table2_rows(bench, lcm, styled[VARIANT_STYLE], "base teacher (reference)"))
        for style, path in arts["style"].get(fam, {}).items():
            if "style" in cfg.parts or "blocks" in cfg.parts:
                t3 = table3(bench, path, lcm, style, styled[style], work)
                res.setdefault("table3", {}).setdefault(fam, {})[style] = t3
            ref = res.get("table3", {}).get(fam, {}).get(style, {}).get("rows", {}).get("style_dpmpp25")
            if "sweep" in cfg.parts:
                res.setdefault("sweep", {}).setdefault(fam, {})[style] = sweep(
                    bench, path, lcm, style, spread(styled[style], sweep_n), cfg.lambdas, ref)
            if "blocks" in cfg.parts:
                res.setdefault("blocks", {}).setdefault(fam, {})[style] = blocks(bench, path, lcm, style,
                                                                                 styled[style], work)
        if "universality" in cfg.parts and fam in arts["variant"]:
            vb = benches[f"variant-{fam}"] = Bench(arts["variant"][fam], f"variant-{fam}", cfg, work, log)
            res["table2"]["variants"].append(table2_rows(vb, lcm, styled[VARIANT_STYLE],
                                                         f"demo:{fam} fully fine-tuned on {VARIANT_STYLE} renders"))
    if "universality" in cfg.parts:
        res["table2"]["refusal"] = refusal(arts["lcm"].get("sd") or str(_shipped_lcm("sd")), cfg, work)
    return res, benches


def _shipped_lcm(fam: str) -> Path:
    from lcmtool.demo import ASSETS, DEMO_LCM_LORAS

    return ASSETS / DEMO_LCM_LORAS[fam]


def check(cfg: PaperConfig) -> None:
    """Refuse unknown families, styles and parts (a repeatable flag may also hold a comma list: --parts lcd,style)."""
    for key in ("families", "styles", "parts"):
        setattr(cfg, key, [x.strip() for v in getattr(cfg, key) for x in v.split(",") if x.strip()])
    bad = [f for f in cfg.families if f not in ("sd", "xl")]
    if bad or not cfg.families:
        raise LcmError(f"--families: choose from sd, xl (got {', '.join(bad) or 'none'})")
    bad = [s for s in cfg.styles if s not in ("outline", "striped")]
    if bad:
        raise LcmError(f"--styles: choose from outline, striped (got {', '.join(bad)})")
    known = ("lcd", "universality", "style", "sweep", "blocks")
    bad = [p for p in cfg.parts if p not in known]
    if bad or not cfg.parts:
        raise LcmError(f"--parts: choose from {', '.join(known)} (got {', '.join(bad) or 'none'})")
    if cfg.sweep_prompts == 1:
        raise LcmError("--sweep-prompts must be 0 (= --prompts) or >= 2: FD-demo needs two images")
    from lcmtool.models.load import resolve_device

    resolve_device(cfg.device)  # before anything is made or written (a finetune run would start first)


def run_paper(cfg: PaperConfig, log=None) -> dict:
    """Make what is missing, measure every part, write results.json, results.md and the figures; -> results."""
    import torch

    from lcmtool import __version__
    from lcmtool.config import to_dict
    from lcmtool.engines import paper_report
    from lcmtool.fileio import atomic_write_json

    check(cfg)
    log = log or to_stderr
    t0 = time.time()
    out, work = Path(cfg.out), Path(cfg.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    commands: list[str] = []
    arts = artefacts(cfg, work, log, commands)
    t_made = time.time() - t0
    res, benches = measure(cfg, arts, work, log)
    res.update(version=__version__, config=to_dict(cfg), command=" ".join(["lcmtool", *sys.argv[1:]])
               if Path(sys.argv[0]).name in ("lcmtool", "__main__.py") else "lcmtool paper (Python API)",
               artefact_commands=commands, artefacts=_portable(arts),
               seeds={"images": f"image i of every setting has seed {cfg.seed} + i (same seeds in every setting)",
                      "fd_references": "metrics.reference_scenes seed 0"},
               machine={"platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": cfg.device,
                        "cpu": platform.processor() or platform.machine()},
               definitions={"attr_acc": "mean of shape, colour, size and position accuracy (lcmtool eval)",
                            "fd": "FD-demo (lcmtool eval)", "ms_per_image": "wall time of the pipeline calls / "
                            "images, model loaded and warmed up"})
    res["claims"], res["bars"] = paper_report.claims(res), paper_report.BARS
    res["figures"] = paper_report.figures(res, benches, out)
    res["wall_s"] = round(time.time() - t0, 1)
    res["wall_s_artefacts"] = round(t_made, 1)
    res = paper_report.finite(res)
    atomic_write_json(out / "results.json", res)
    paper_report.write_markdown(res, out / "results.md")
    return res
