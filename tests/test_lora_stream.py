"""The fast merge path (lazy pread inputs, modules spread over threads, inputs freed as they are merged, sha256 in
the background) gives the same file as a straightforward reference: eager load, one module at a time, one thread."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lcmtool.engines.merge import MergeConfig, run_merge
from lcmtool.lora import math as M
from lcmtool.lora import synth
from lcmtool.lora.io import SafetensorsReader, load_lora, save_lora
from lcmtool.lora.parallel import merge_modules

# real SD-1.5 modules and shapes (merge refuses modules the family does not have): linear, 3x3 conv, 1x1 conv and
# a linear LoRA on a 1x1-conv weight
SHAPES = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (320, 768),
          "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k": (320, 768),
          "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (640, 768),
          "down_blocks.0.resnets.0.conv1": (320, 320, 3, 3), "down_blocks.0.resnets.1.conv1": (320, 320, 3, 3),
          "down_blocks.1.resnets.0.conv1": (640, 320, 3, 3), "down_blocks.0.attentions.0.proj_in": (320, 320, 1, 1),
          "mid_block.attentions.0.proj_out": (1280, 1280),
          "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj": (10240, 1280)}


def reference(paths_weights, method, rank, dtype):
    """Eager load, M.concat / M.svd module by module on one thread, cast to the output dtype."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        terms = {}
        for path, w in paths_weights:
            for p, m in load_lora(path).modules.items():
                terms.setdefault(p, []).append((m, w))
        out, errs = {}, {}
        for p, ts in terms.items():
            m, errs[p] = (M.concat(p, ts), 0.0) if method == "concat" else M.svd(p, ts, rank)
            out[p] = type(m)(A=m.A.to(dtype), B=m.B.to(dtype), alpha=m.alpha)
        return out, errs
    finally:
        torch.set_num_threads(prev)


@pytest.fixture()
def inputs(tmp_path):
    names = sorted(SHAPES)
    style = synth.synth_lora(SHAPES, rank=lambda p: 2 + names.index(p) % 3, alpha=3.0, seed=1, dtype=torch.float16,
                             family="sd15")
    lcm = synth.synth_lora({p: s for i, (p, s) in enumerate(sorted(SHAPES.items())) if i % 4}, rank=8, alpha=4.0,
                           seed=2, dtype=torch.float16, family="sd15")
    save_lora(style, tmp_path / "style.safetensors")
    save_lora(lcm, tmp_path / "lcm.safetensors", format="diffusers")
    return tmp_path


@pytest.mark.parametrize("method,rank", [("concat", None), ("svd", 5)])
def test_fast_merge_equals_reference(inputs, method, rank):
    d = inputs
    rep = run_merge(MergeConfig(style=str(d / "style.safetensors"), lcm=str(d / "lcm.safetensors"), lambda1=0.8,
                                lambda2=-1.0, method=method, rank=rank, out=str(d / "fast.safetensors")))
    ref, errs = reference([(d / "style.safetensors", 0.8), (d / "lcm.safetensors", -1.0)], method, rank,
                          torch.float16)
    with safe_open(str(d / "fast.safetensors"), "pt") as f:
        md = f.metadata()
    save_lora(ref, d / "ref.safetensors", family="sd15", metadata=md, dtype=torch.float16)
    fast, want = load_file(str(d / "fast.safetensors")), load_file(str(d / "ref.safetensors"))
    assert set(fast) == set(want) and len(fast) == 3 * len(SHAPES)
    # the same per-module math on one intra-op thread per module: bit for bit, factors and all
    assert all(torch.equal(fast[k], want[k]) for k in want)
    if method == "svd":
        assert abs(rep["svd_rel_error"]["max"] - max(errs.values())) < 1e-6
        assert abs(rep["svd_rel_error"]["mean"] - sum(errs.values()) / len(errs)) < 1e-6
    rec = json.loads(md["lcmtool"])
    assert [len(i["sha256"]) for i in rec["inputs"]] == [64, 64]


def test_threaded_svd_matches_serial_in_fp32():
    """merge_modules over 2 threads == M.svd per module on one thread, fp32 factors, to 1e-6."""
    style = synth.synth_lora(SHAPES, rank=4, alpha=2.0, seed=3)
    lcm = synth.synth_lora(SHAPES, rank=6, alpha=6.0, seed=4)
    terms = {p: [(style.modules[p], 0.8), (lcm.modules[p], 1.0)] for p in SHAPES}
    fast, errs = merge_modules(dict(terms), "svd", 7, workers=2)
    for p, ts in terms.items():
        m, e = M.svd(p, ts, 7)
        want = m.delta()
        assert float((fast[p].delta() - want).norm() / want.norm()) < 1e-6 and abs(errs[p] - e) < 1e-6


def test_lazy_reader_matches_safetensors(inputs):
    path = inputs / "lcm.safetensors"
    r = SafetensorsReader(path)
    eager = load_file(str(path))
    assert set(r.keys()) == set(eager) and all(torch.equal(r.get(k), v) for k, v in eager.items())
    lazy, full = load_lora(path, lazy=True), load_lora(path)
    for p, m in full.modules.items():
        assert lazy.modules[p].A.device.type == "meta" and torch.equal(lazy.modules[p].delta(), m.delta())
