"""`lcmtool paper` on a tiny budget with the shipped demo teachers, and its claims against the issue's bars."""
import json
import math
from pathlib import Path

import pytest

from lcmtool.engines import paper_report
from lcmtool.engines.paper import run_paper, spread
from lcmtool.errors import LcmError
from lcmtool.options import PaperConfig

METRICS = ("shape_acc", "color_acc", "size_acc", "position_acc", "attr_acc")


def test_tiny_run_writes_results_with_every_part_and_sane_numbers(tmp_path):
    cfg = PaperConfig(out=str(tmp_path / "results"), work=str(tmp_path / "work"), families=["sd"],
                      styles=["outline"], parts=["lcd", "universality", "style"], prompts=2,
                      finetune_set=["max_steps=1", "batch_size=2", "num_samples=2", "validation_steps=1",
                                    f"cache_dir={tmp_path / 'cache'}", "report_to=none"])
    run_paper(cfg, log=lambda msg: None)
    res = json.loads((tmp_path / "results" / "results.json").read_text())
    for key in ("table1", "table2", "table3", "claims", "bars", "machine", "seeds", "config", "command", "wall_s",
                "artefacts", "artefact_commands", "figures"):
        assert key in res, key
    rows = res["table1"]["sd"]
    assert [(r["scheduler"], r["steps"]) for r in rows] == [("lcm", 1), ("lcm", 2), ("lcm", 4), ("lcm", 8),
                                                            ("dpmpp", 4), ("dpmpp", 8), ("dpmpp", 25), ("ddim", 4),
                                                            ("ddim", 25), ("lcm", 4)]
    assert rows[-1]["control"] and rows[-1]["loras"] == [] and rows[2]["loras"][0][0] == "lcm-lora-demo-sd.safetensors"
    t3 = res["table3"]["sd"]["outline"]["rows"]
    every = rows + list(t3.values()) + [r[k] for r in res["table2"]["variants"] + res["table2"]["base"]
                                        for k in ("lcm4", "dpmpp25")]
    for r in every:
        assert r["n"] == 2 and r["ms_per_image"] > 0 and r["fd"] >= 0
        assert all(0 <= r[k] <= 1 for k in METRICS), r
        assert math.isclose(r["attr_acc"], sum(r[k] for k in METRICS[:4]) / 4)
    assert 0 <= t3["style_dpmpp25"]["style_acc"] <= 1 and t3["lcm_only_lcm4"]["guidance"] == 1.0
    assert [r["guidance"] for r in rows] == [1.0] * 4 + [7.5] * 5 + [1.0]
    assert isinstance(res["table3"]["sd"]["outline"]["weak_reference"], bool)
    refusal = res["table2"]["refusal"]
    assert refusal["refused"] and "does not fit demo:xl" in refusal["message"]
    assert str(Path.cwd()) not in refusal["message"] and "lcm-lora-demo-sd.safetensors" in refusal["message"]
    assert res["artefacts"]["origin"][res["artefacts"]["style"]["sd"]["outline"]] == "shipped"
    assert res["artefacts"]["origin"][res["artefacts"]["variant"]["sd"]] == "made by finetune --full"
    assert not any(p.startswith("/") for p in res["artefacts"]["origin"])  # no machine paths in the record
    assert all(isinstance(res["claims"][k], bool) for k in ("lcd", "universality", "style"))
    assert all(Path(p).is_file() for p in res["figures"]) and len(res["figures"]) == 4  # fig2, 2 line plots, fig3
    md = (tmp_path / "results" / "results.md").read_text()
    assert "## Table 1" in md and "## Table 2" in md and "## Table 3" in md and "Claim 3" in md


def row(scheduler, steps, acc, fd, style=None):
    return {"scheduler": scheduler, "steps": steps, "attr_acc": acc, "fd": fd, "style_acc": style}


def test_claims_follow_the_bars():
    """Claim 1 at the bounds (0.9x accuracy, 1.5x FD) passes; just beyond either, it fails."""
    def res(acc, fd):
        return {"table1": {"sd": [row("lcm", 4, acc, fd), row("dpmpp", 25, 1.0, 10.0)],
                           "xl": [row("lcm", 4, 1.0, 10.0), row("dpmpp", 25, 1.0, 10.0)]}}

    assert paper_report.claims(res(0.9, 15.0))["lcd"] is True
    assert paper_report.claims(res(0.89, 15.0))["lcd"] is False
    assert paper_report.claims(res(0.9, 15.1))["lcd"] is False
    assert paper_report.claims({}) == {"lcd": None, "universality": None, "style": None}
    refused = {"refused": True, "message": ""}
    uni = {"table2": {"variants": [{"pass": True}], "refusal": refused}}
    assert paper_report.claims(uni)["universality"] is True
    uni["table2"]["refusal"] = {"refused": False, "message": ""}
    assert paper_report.claims(uni)["universality"] is False  # the wrong-family LoRA must be refused
    sty = {"table3": {"sd": {"outline": {"pass": True}, "striped": {"pass": False}}}}
    assert paper_report.claims(sty)["style"] is False


def test_spread_and_bad_requests():
    prompts = [str(i) for i in range(40)]
    assert spread(prompts, 4) == ["0", "10", "20", "30"] and spread(prompts, 40) == prompts
    with pytest.raises(LcmError, match="--parts"):
        run_paper(PaperConfig(parts=["tables"]))
    with pytest.raises(LcmError, match="--families"):
        run_paper(PaperConfig(families=["sd3"]))
    assert paper_report.finite({"a": [float("nan"), 1.0, float("inf")]}) == {"a": [None, 1.0, None]}
