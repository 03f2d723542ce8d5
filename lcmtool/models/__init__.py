"""Models: where a model comes from and how it loads (load), single-file checkpoints (single_file), export to the
original layout (export), THE one LDM/SGM <-> diffusers name map (ldm_names), pinned schedulers (schedulers)."""
