"""Latent consistency distillation, the library half (LCM-LoRA, arXiv 2311.05556): lcd.py the pure math,
data.py the sources and the latent cache. The loop itself is the engine, lcmtool/engines/distill.py."""
