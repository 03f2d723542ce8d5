"""What `lcmtool paper` writes besides results.json: results.md (the tables, the claims, the figure links) and the
figures (Fig. 2 sample grids, Fig. 3 style grids, accuracy / FD-demo vs steps, lambda-sweep heat maps)."""
from __future__ import annotations

import math
from pathlib import Path

from lcmtool.engines.paper import ACC_BOUND, FD_BOUND, STYLE_BOUND, TABLE1, WEAK_STYLE, row_of, within
from lcmtool.fileio import json_safe as finite  # noqa: F401 - results.json is strict JSON (paper.py calls it)

NAMES = {"lcm": "LCM", "dpmpp": "DPM-Solver++", "ddim": "DDIM"}
FIG_ROWS = 4  # prompts per figure


def _f(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _label(row: dict) -> str:
    if row.get("control"):
        return f"{NAMES[row['scheduler']]} {row['steps']}, no LCM-LoRA (control)"
    return f"{NAMES[row['scheduler']]} {row['steps']}" + (f", w={row['guidance']:g}" if row["guidance"] > 1 else "")


def _grid_png(bench, keys: list[str], labels: list[str], path: Path) -> str | None:
    from lcmtool.outputs.grid import grid
    from lcmtool.outputs.png import save_png

    cols = [bench.images[k][:FIG_ROWS] for k in keys if k in bench.images]
    if not cols:
        return None
    prompts = [r for r in range(min(len(c) for c in cols))]
    cells = [[c[r] for c in cols] for r in prompts]
    save_png(grid(cells, labels, min_cell=96), path, {"figure": path.stem}, a1111=False)
    return str(path)


def figures(res: dict, benches: dict, out: Path) -> list[str]:
    """Every figure the results allow; -> their paths."""
    from lcmtool.outputs.plot import heatmap, line_chart

    paths = []
    for fam, rows in res.get("table1", {}).items():  # Fig. 2: every method of Table 1 on the same seeds
        p = _grid_png(benches[fam], [r["key"] for r in rows], [_label(r) for r in rows], out / f"fig2-{fam}.png")
        paths += [p] if p else []
        xs = sorted({n for _, n in TABLE1})
        for metric, name, log_y in (("attr_acc", "attribute accuracy", False), ("fd", "FD-demo", True)):
            series = {NAMES[s]: [next((r[metric] for r in rows if r["scheduler"] == s and r["steps"] == n
                                       and not r.get("control")), float("nan")) for n in xs] for s in NAMES}
            p = out / f"steps-{fam}-{metric}.png"
            line_chart(series, p, title=f"demo-{fam}: {name} vs steps (x: {', '.join(map(str, xs))})",
                       log_y=log_y, x=xs)
            paths.append(str(p))
    for fam, styles in res.get("table3", {}).items():  # Fig. 3: the style at DPM-Solver++ 25 vs merged at LCM
        for style, t in styles.items():
            keys = [r["key"] for r in t["rows"].values()]
            labels = ["style LoRA, DPM++ 25", "merged, LCM 2", "merged, LCM 4", "merged, LCM 8", "style LoRA, LCM 4",
                      "tau_LCM, LCM 4"]
            p = _grid_png(benches[fam], keys, labels, out / f"fig3-{fam}-{style}.png")
            paths += [p] if p else []
    for fam, styles in res.get("sweep", {}).items():
        for style, sw in styles.items():
            lams, mark = sw["lambdas"], (sw["best"]["index"] if sw["best"] else None)
            for metric, better in (("style_acc", True), ("fd", False)):
                p = out / f"sweep-{fam}-{style}-{metric}.png"
                heatmap(sw[metric], p, lams, lams, title=f"demo-{fam} {style}: {metric} at LCM 4 (box: best pair)",
                        row_name="lambda1 (style)", col_name="lambda2 (tau_LCM)", mark=tuple(mark) if mark else None,
                        higher_is_better=better)
                paths.append(str(p))
    return paths


def claims(res: dict) -> dict:
    """One boolean per bar (None where that part did not run), computed from the numbers in `res`."""
    t1 = res.get("table1", {})
    lcd = [within(row_of(rows, "lcm", 4), row_of(rows, "dpmpp", 25))["pass"] for rows in t1.values()]
    uni = [r["pass"] for r in res.get("table2", {}).get("variants", [])]
    sty = [t["pass"] for fam in res.get("table3", {}).values() for t in fam.values()]
    return {"lcd": all(lcd) if lcd else None,
            "universality": (all(uni) and res["table2"]["refusal"]["refused"]) if uni else None,
            "style": all(sty) if sty else None}


BARS = {"lcd": f"LCM 4 attribute accuracy >= {ACC_BOUND}x and FD-demo <= {FD_BOUND}x DPM-Solver++ 25 "
               "(CFG 7.5), every teacher",
        "universality": "the same bounds on every fine-tuned variant against its own DPM-Solver++ 25; "
                        "the SD LoRA refused on the XL teacher",
        "style": f"merged tau'_LCM (0.8, 1.0) at LCM 4 keeps >= {STYLE_BOUND:.0%} of the style LoRA's "
                 f"DPM-Solver++ 25 style accuracy, attribute accuracy >= {ACC_BOUND}x, every style"}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _verdict(ok) -> str:
    return "n/a (not run)" if ok is None else ("**PASS**" if ok else "**FAIL**")


def table1_md(res: dict) -> list[str]:
    out = []
    for fam, rows in res.get("table1", {}).items():
        ref = row_of(rows, "dpmpp", 25)
        body = [[_label(r), _f(r["attr_acc"]), _f(r["shape_acc"]), _f(r["color_acc"]), _f(r["fd"], 2),
                 f"{r['attr_acc'] / ref['attr_acc']:.2f}" if ref["attr_acc"] else "n/a",
                 f"{r['fd'] / ref['fd']:.2f}" if ref["fd"] else "n/a", f"{r['ms_per_image']:.0f}"] for r in rows]
        out += [f"**demo:{fam}** ({rows[0]['n']} images per row)", ""]
        out += _table(["method", "attr acc", "shape", "colour", "FD-demo", "acc / DPM++25", "FD / DPM++25",
                       "ms/image"], body) + [""]
    return out


def table2_md(res: dict) -> list[str]:
    t2 = res.get("table2")
    if not t2:
        return []
    body = [[r["model"], r["what"], _f(r["lcm4"]["attr_acc"]), _f(r["dpmpp25"]["attr_acc"]), _f(r["lcm4"]["fd"], 2),
             _f(r["dpmpp25"]["fd"], 2), _f(r["lcm4"]["style_acc"]), _f(r["dpmpp25"]["style_acc"]),
             f"{r['acc_ratio']:.2f} / {r['fd_ratio']:.2f}", "pass" if r["pass"] else "FAIL"]
            for r in t2["variants"] + t2["base"]]
    out = _table(["model", "what", "attr LCM 4", "attr DPM++ 25", "FD LCM 4", "FD DPM++ 25", "style LCM 4",
                  "style DPM++ 25", "acc / FD ratio", "bar"], body)
    ref = t2.get("refusal") or {}
    out += ["", f"SD LCM-LoRA on the XL teacher: {'refused' if ref.get('refused') else 'NOT refused'}: "
                f"`{ref.get('message', 'n/a')}`", ""]
    return out


def table3_md(res: dict) -> list[str]:
    out = []
    names = {"style_dpmpp25": "style LoRA, DPM-Solver++ 25, w=7.5", "merged_lcm2": "merged (0.8, 1.0), LCM 2",
             "merged_lcm4": "merged (0.8, 1.0), LCM 4", "merged_lcm8": "merged (0.8, 1.0), LCM 8",
             "style_lcm4": "style LoRA alone, LCM 4", "lcm_only_lcm4": "tau_LCM alone, LCM 4"}
    for fam, styles in res.get("table3", {}).items():
        for style, t in styles.items():
            body = [[names[k], _f(r["style_acc"]), _f(r["attr_acc"]), _f(r["fd"], 2), f"{r['ms_per_image']:.0f}"]
                    for k, r in t["rows"].items()]
            out += [f"**demo:{fam}, {style}**: style kept {t['style_keep']:.0%} (bar {STYLE_BOUND:.0%}), attribute "
                    f"ratio {t['acc_ratio']:.2f} (bar {ACC_BOUND}): {'pass' if t['pass'] else 'FAIL'}", ""]
            if t.get("weak_reference"):
                out += [f"Note: the style LoRA itself reaches only {_f(t['rows']['style_dpmpp25']['style_acc'])} style "
                        f"accuracy at DPM-Solver++ 25 (< {WEAK_STYLE}), so this ratio says little about keeping a "
                        "style.", ""]
            out += _table(["setting", "style acc", "attr acc", "FD-demo", "ms/image"], body) + [""]
    return out


def sweep_md(res: dict) -> list[str]:
    out = []
    for fam, styles in res.get("sweep", {}).items():
        for style, sw in styles.items():
            b = sw["best"]
            best = (f"best pair lambda1={b['lambda1']:g}, lambda2={b['lambda2']:g} (style acc {_f(b['style_acc'])}, "
                    f"FD {_f(b['fd'], 2)})") if b else "no pair keeps the attribute bound"
            out.append(f"- demo:{fam} {style} ({sw['prompts']} prompts per cell): {best}; "
                       f"figures sweep-{fam}-{style}-style_acc.png, sweep-{fam}-{style}-fd.png")
    for fam, styles in res.get("blocks", {}).items():
        for style, trials in styles.items():
            uni = res.get("table3", {}).get(fam, {}).get(style, {}).get("rows", {}).get("merged_lcm4")
            if uni:
                out.append(f"- demo:{fam} {style} per-block lambda1 at LCM 4, against uniform (0.8, 1.0) "
                           f"(style {_f(uni['style_acc'])}, attr {_f(uni['attr_acc'])}, FD {_f(uni['fd'], 2)}):")
            out += [f"  - {t['trial']} {t['lambda1_blocks']}: style {_f(t['style_acc'])}, attr {_f(t['attr_acc'])}, "
                    f"FD {_f(t['fd'], 2)}" for t in trials]
    return out + [""] if out else []


def write_markdown(res: dict, path: Path) -> None:
    from lcmtool.fileio import atomic_write_text

    c = res["claims"]
    cfg = res["config"]
    lines = ["# Results: the LCM-LoRA paper in miniature (demo world)", "",
             f"`{res['command']}`: {res['wall_s']:.0f} s wall ({res['wall_s_artefacts']:.0f} s making artefacts) on "
             f"{res['machine']['platform']}, {res['machine']['threads']} threads; {cfg['prompts']} held-out "
             f"prompts x {cfg['images_per_prompt']} image(s) per setting, seeds {cfg['seed']}+i. Attribute accuracy "
             "= mean of shape, colour, size and position accuracy; FD-demo and accuracies from `lcmtool eval`.", "",
             "## Claims", "",
             f"- Claim 1 (LCD, both teachers): {_verdict(c['lcd'])}: {res['bars']['lcd']}.",
             f"- Claim 2 (universality): {_verdict(c['universality'])}: {res['bars']['universality']}.",
             f"- Claim 3 (style): {_verdict(c['style'])}: {res['bars']['style']}.", "",
             f"Bounds: accuracy ratio >= {ACC_BOUND}, FD ratio <= {FD_BOUND}.", ""]
    for title, part in (("Table 1: quality vs steps", table1_md(res)), ("Table 2: universality", table2_md(res)),
                        ("Table 3: style", table3_md(res)), ("Lambda sweep and per-block lambdas", sweep_md(res))):
        if part:
            lines += [f"## {title}", "", *part]
    lines += ["## Artefacts", ""] + [f"- {Path(p).name if how == 'shipped' else p}: {how}"
                                     for p, how in res["artefacts"]["origin"].items()]
    lines += [f"- `{cmd}`" for cmd in res["artefact_commands"]]
    lines += ["", "## Figures", ""] + [f"- ![{Path(p).stem}]({Path(p).name})" for p in res["figures"]] + [""]
    atomic_write_text(path, "\n".join(lines))
