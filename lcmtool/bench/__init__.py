"""`lcmtool bench`: lcmtool's path against the plain-diffusers path, measured in the same run (sample, merge,
distill)."""
