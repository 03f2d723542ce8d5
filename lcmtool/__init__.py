"""lcmtool: LCM-LoRA distillation, merging and fast sampling for Stable Diffusion (arXiv 2311.05556)."""

__version__ = "0.1.0"

import os as _os

# Tiny models on few cores: OpenMP's spin-waiting made the demo UNet ~100x slower on an oversubscribed
# CPU; passive waits cost nothing measurable on an idle one. Set before torch is first imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
