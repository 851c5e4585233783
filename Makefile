# poplds: `make demo` runs the demo workflow and builds its report; `make test` runs the tests.
# Both create .venv on first use (Python >= 3.11), installing torch first, then the rest.

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.poplds-installed
CORES ?= all

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "poplds needs Python >= 3.11, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --report results/report.html
	@echo "report: results/report.html"

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakemake --lint

bench: $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev,bench]'
	$(BIN)/python benchmarks/bench_ingest.py
	$(BIN)/python benchmarks/bench_stitched.py paper
	$(BIN)/python benchmarks/bench_stitched.py peer
	$(BIN)/python benchmarks/bench_nplds.py v1
	$(BIN)/python benchmarks/bench_nplds.py scaling
	$(BIN)/python benchmarks/bench_nplds.py peer
	$(BIN)/python benchmarks/bench_real.py all

clean:
	rm -rf results logs .snakemake
