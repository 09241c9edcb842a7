# make quickstart   the quickstart search on the embedded digits data (no files, no network),
#                   then its report in reports/quickstart-TIMESTAMP/
# make test         the whole test suite
# make test-fast    the tests that start no Ray instance, server or search (a couple of minutes)
# Both set themselves up: uv (installed into .tools/ if missing), then `uv sync --locked`;
# `make test` also installs Debian's chromium and chromium-driver (the browser test) and postgresql (the
# production stack's backend store, tests/test_cluster.py) if missing; `make cluster-demo` postgresql.

PYTHON ?= python3
UV := $(or $(shell command -v uv 2>/dev/null),.tools/bin/uv)
RUN := $(UV) run --no-sync

.PHONY: quickstart test test-fast docs cluster-demo benchmark setup browser postgresql clean

QUICKSTART := quickstart-$(shell date +%Y%m%d-%H%M%S)

quickstart: setup
	$(RUN) aesearch search quickstart --name $(QUICKSTART)
	$(RUN) aesearch report $(QUICKSTART)

test: setup browser postgresql
	$(RUN) pytest

test-fast: setup
	$(RUN) pytest -m "not slow"

# the documentation site, into site/ (the reference pages are generated from the code: docs/hooks.py)
docs: setup
	NO_MKDOCS_2_WARNING=1 $(RUN) mkdocs build --strict

# the cluster of cluster/README.md rehearsed on 127.0.0.1: PostgreSQL and SeaweedFS's S3 server, an MLflow
# server on them (basic auth, proxied artifacts in the bucket), Ray head + worker node (token auth), the
# quickstart search through `ray job submit` (its storage in the bucket), its report
cluster-demo: setup postgresql
	$(RUN) python cluster/rehearsal.py

benchmark: setup
	$(RUN) python benchmarks/trainer_speed.py --rounds 5
	$(RUN) python benchmarks/search_overhead.py
	$(RUN) python benchmarks/packing_speed.py --trials 8 --epochs 2
	$(RUN) python benchmarks/packing_speed.py --trials 8 --epochs 2 --device cuda
	$(RUN) python benchmarks/search_efficiency.py

# --compile-bytecode: uv installs no .pyc files by default, and where Python may not write them
# (PYTHONDONTWRITEBYTECODE) every process (the driver, each Ray worker) would compile torch, Ray and
# MLflow from source again: ~30 s of a small search's ~60 s on 2 cores.
setup: | $(UV)
	$(UV) sync --locked --extra test --compile-bytecode

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium chromium-driver; }

# Debian's PostgreSQL server (the tests and the demo start their own, in a temporary folder; the package's
# own cluster is not used)
postgresql:
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || { \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends postgresql; }

.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet uv==0.13.9  # the version that wrote uv.lock (and builds cluster/Dockerfile)

clean:
	rm -rf .venv .tools runs .pytest_cache
