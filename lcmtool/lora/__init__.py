"""LoRA files and task arithmetic: one canonical form (diffusers module path -> A, B, alpha) inside.

formats.py names the key formats (kohya / kohya-SGM / diffusers / peft), io.py reads and writes files, math.py is
the pure tensor math of eq. 3 (concat, svd, weighted deltas), fuse.py adds deltas into a module's weights,
synth.py makes synthetic LoRAs on a real module set. No model code is imported here.
"""
