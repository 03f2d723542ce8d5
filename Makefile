# Every target works on a fresh clone: it builds .venv first when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU torch from the local wheel on machines like ours; a GPU user sets TORCH_SPEC (see README).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test lint demo demo-models paper bench clean

$(BIN)/lcmtool: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/lcmtool

install: $(BIN)/lcmtool

test: install
	$(BIN)/python -m pytest -q --durations=15 tests

lint: install
	$(BIN)/ruff check lcmtool tests

demo: install
	$(BIN)/lcmtool sample --steps 4 --prompt "a large red circle on the left" --num-images 4 --out outputs/demo

demo-models: install
	$(BIN)/python tools/demo_models.py --out lcmtool/demo/assets

# The paper in miniature (issue 15): Tables 1-3, the lambda sweep and figures -> docs/results/ (PAPER_ARGS: e.g.
# "--prompts 20 --rebuild"); shipped artefacts are reused, missing ones made with `lcmtool finetune`.
paper: install
	$(BIN)/lcmtool paper $(PAPER_ARGS)

clean:
	rm -rf outputs runs .pytest_cache
