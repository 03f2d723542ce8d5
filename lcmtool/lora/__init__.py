"""LoRA files and task arithmetic: one canonical form (diffusers module path -> A, B, alpha) inside.

formats.py names (kohya / kohya-SGM / diffusers / peft), sgm.py the SDXL block map, io.py load / save, merge.py the
pure tensor math, engine.py the merge / inspect / convert engines, bench.py the merge benchmark.
No model code is imported here at module level.
"""
