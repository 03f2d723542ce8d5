"""The `lcmtool` command's start-up: its heavy imports run with Python's cyclic garbage collector paused.

Importing torch, transformers and diffusers creates over a million tracked Python objects (functions, classes,
dataclasses, regex tables), and the collector's full passes over that growing heap cost about 1.2 s of a bare
`from diffusers import StableDiffusionPipeline` on our 2-core CPU (measured with gc.callbacks). The modules
live as long as the process, so those passes find nothing to free.

So a command pauses the collector when its body starts (`pause`, after the options and config are checked).
The first `settle()` moves everything made so far into the permanent generation (`gc.freeze()`, which later
passes skip) and turns the collector back on. `settle()` runs right after the heavy imports of a model load
(`models.load.pipeline_classes`, which `load_pipeline` and `distill.teacher.load_teacher` call first), before
any weights are read: objects a run later drops are never frozen. Every long loop (sampling, training) comes
after such a load. It also runs at the start of `eval` and `bench` and when the command ends; `merge`,
`inspect` and `convert` (seconds of tensor math, no model load unless `--model`) keep the pause to their end.
Input errors found before the imports stay as fast as before.

Only the console command does this (`cli.main` calls `enable()`). A library user's process, and pytest
invoking the Typer app in-process, keep the interpreter's settings. `LCMTOOL_GC_PAUSE=0` turns it off, so that
`bench --startup` can show what it saves.
"""
from __future__ import annotations

import gc
import os

_state = {"enabled": False, "paused": False}


def enable() -> None:
    """Called by the console entry point only: the command's body may pause the collector."""
    _state["enabled"] = os.environ.get("LCMTOOL_GC_PAUSE", "1") != "0"


def pause() -> None:
    """Pause the collector until the next `settle()` (once per process; a no-op unless enabled)."""
    if _state["enabled"] and gc.isenabled():
        _state["enabled"] = False
        gc.disable()
        _state["paused"] = True


def settle() -> None:
    """End the pause: freeze what exists now (imported modules, the parsed config) and resume collecting."""
    if _state["paused"]:
        _state["paused"] = False
        gc.freeze()
        gc.enable()


def paused() -> bool:
    return _state["paused"]
