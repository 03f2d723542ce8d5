"""Outputs people look at: PNGs with their parameters (png), labelled grids (grid), line charts (plot)."""
