"""The embedded demo world, a plug-in: procedural text-to-image data, tiny SD-family teachers, an evaluator.

It registers `demo:sd` / `demo:xl` (models, with their shipped LCM-LoRAs) and `demo:shapes` (training data)
through the same interfaces real models and data use (`lcmtool.models.load.register_model_scheme`,
`lcmtool.distill.data.register_data_scheme`); nothing in the library layers imports it by name.
world.py renders scenes and captions, arch.py builds the tiny architectures, classifier.py and metrics.py score
images (`lcmtool eval`), assets/ holds the shipped weights (made by tools/demo_models.py).
"""
from __future__ import annotations

from pathlib import Path

from lcmtool.distill.data import Source, register_data_scheme
from lcmtool.errors import LcmError
from lcmtool.models.load import ModelRef, register_model_scheme

ASSETS = Path(__file__).parent / "assets"
DEMO_MODELS = {"sd": "demo-sd", "xl": "demo-xl"}
# The shipped demo LCM-LoRAs (applied by default with the lcm/tcd schedulers on demo models)
DEMO_LCM_LORAS = {"sd": "lcm-lora-demo-sd.safetensors", "xl": "lcm-lora-demo-xl.safetensors"}


def resolve_demo_model(spec: str) -> ModelRef:
    name = spec.split(":", 1)[1]
    if name not in DEMO_MODELS:
        raise LcmError(f"unknown demo model {spec!r} (known: demo:sd, demo:xl)")
    path = ASSETS / DEMO_MODELS[name]
    if not (path / "model_index.json").is_file():
        raise LcmError(f"demo model {spec} is not built at {path} (run `make demo-models`)")
    return ModelRef(spec, "folder", str(path), lcm_lora=str(ASSETS / DEMO_LCM_LORAS[name]), strict_family=False)


def demo_shapes(spec: str, num_samples: int, seed: int) -> Source:
    """`demo:shapes`: `num_samples` random training scenes of the demo world, rendered in chunks on demand;
    `demo:shapes:STYLE` (outline, striped) draws them in that style, its trigger phrase in the captions."""
    import functools

    from lcmtool.demo import world

    name, _, style = spec.partition(":")[2].partition(":")
    if name != "shapes" or (style and (style not in world.STYLES or style == "solid")):
        raise LcmError(f"unknown demo data {spec!r} (known: demo:shapes, demo:shapes:outline, demo:shapes:striped)")
    if num_samples <= 0:
        raise LcmError("data demo:shapes needs num_samples > 0")
    return Source(spec, "demo", list(range(num_samples)),
                  chunks=functools.partial(_render_chunks, style=style or "solid"))


def _render_chunks(source: Source, resolution: int, rng, chunk: int, device, style: str = "solid"):
    import torch

    from lcmtool.demo import world

    if resolution != world.SIZE:
        raise LcmError(f"demo:shapes renders {world.SIZE}px images; the model trains at {resolution}px")
    for start in range(0, len(source.items), chunk):
        scenes = [world.sample_scene(rng, "train", style=style) for _ in range(min(chunk, len(source.items) - start))]
        imgs = world.render(scenes, device=device)
        row = [resolution, resolution, 0, 0, resolution, resolution]  # no crop: orig = target size
        yield imgs, [world.caption(s) for s in scenes], torch.tensor([row] * len(scenes), dtype=torch.float32)


register_model_scheme("demo", resolve_demo_model)
register_data_scheme("demo", demo_shapes)
