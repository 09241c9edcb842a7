# make quickstart   the quickstart search on the embedded digits data (no files, no network)
# make test         the whole test suite
# Both set themselves up: uv (installed into .tools/ if missing), then `uv sync --locked`.

PYTHON ?= python3
UV := $(or $(shell command -v uv 2>/dev/null),.tools/bin/uv)
RUN := $(UV) run --no-sync

.PHONY: quickstart test benchmark setup clean

quickstart: setup
	$(RUN) aesearch search search_spaces/quickstart.yaml --name quickstart-$$(date +%Y%m%d-%H%M%S)

test: setup
	$(RUN) pytest

benchmark: setup
	$(RUN) python benchmarks/trainer_speed.py --rounds 5
	$(RUN) python benchmarks/search_overhead.py

setup: | $(UV)
	$(UV) sync --locked --extra test

.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet uv

clean:
	rm -rf .venv .tools runs .pytest_cache
