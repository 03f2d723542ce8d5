"""Shipped architecture presets (package data; README.md here says where each number comes from): diffusers config
folders per family (sd15/, sdxl/, ssd1b/), their UNet configs as single JSON files, and CLIP's BPE merges."""
from pathlib import Path

PRESETS = Path(__file__).resolve().parent  # installed and editable copies alike
