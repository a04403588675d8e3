# fusion-seg: every target creates .venv and installs the package first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test test-all pipelines bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q tests

pipelines: $(STAMP)
	$(BIN)/fusion-seg run pipelines/demo.toml

# `fusion-seg bench` writes its tables into BENCHMARKS.md (the block for this device); about 15 min on 2 CPU cores.
BENCH_DEVICE ?= cpu
bench: $(STAMP)
	$(BIN)/fusion-seg bench --device $(BENCH_DEVICE) --json benchmarks/bench-$(BENCH_DEVICE).json --update BENCHMARKS.md
	$(BIN)/python benchmarks/decoder_memory.py --json benchmarks/decoder_memory.json

clean:
	rm -rf $(VENV) runs cache/*.zarr
