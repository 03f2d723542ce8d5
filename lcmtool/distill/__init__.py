"""Latent consistency distillation, the library half (LCM-LoRA, arXiv 2311.05556): lcd.py the pure math, data.py
the sources and the latent cache, teacher.py the teacher pipeline and its noise schedule, student.py the LoRA
student and its LCD pass, checkpoint.py stop requests and checkpoints, validate.py the validation images,
monitor.py progress and curves. The loop itself is the engine, lcmtool/engines/distill.py."""
