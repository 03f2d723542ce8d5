"""Engines: one per command (sample, compare, merge/inspect/convert, distill, evaluate). Orchestration only:
they validate the user's input (LcmError, flag names), call the library layers (models, lora, distill,
outputs) and write the results. Nothing below imports them."""
