"""Latent consistency distillation with a LoRA student (LCM-LoRA, arXiv 2311.05556).

lcd.py: the pure math; data.py: sources and the latent cache; trainer.py: the accelerate loop.
"""
from lcmtool.distill.trainer import DistillConfig, distill

__all__ = ["DistillConfig", "distill"]
