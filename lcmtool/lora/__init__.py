"""LoRA files and task arithmetic: one canonical form (diffusers module path -> A, B, alpha) inside.

formats.py names the key formats (kohya / kohya-SGM / diffusers / peft), io.py reads (and validates) and writes
LoRA files, stfile.py is lcmtool's own safetensors reader and writer, metadata.py the header keys written
(kohya ss_*, ModelSpec, lcmtool's record), math.py the pure tensor math of eq. 3 (concat, svd, weighted deltas),
parallel.py spreads it over threads, fuse.py adds deltas into a model's weights (UNet and text encoders),
fit.py lists a family's or a folder's modules, synth.py makes synthetic LoRAs on a real module set.
"""
