"""Sampling: pinned schedulers (schedulers.py), the sample/compare engine (engine.py), PNG + grids (outputs.py),
and the plain-diffusers comparison bench (bench.py)."""
