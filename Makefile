# fusion-seg: every target creates .venv and installs the package first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test test-all pipelines bench gpu-wheels gpu-check clean

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

# `make gpu-check` on a lent GPU machine (x86-64, CPython 3.12, torch and timm installed, no package registry):
# `make gpu-wheels` here first fetches the wheels it lacks (listed in benchmarks/gpu-wheels.txt) into .whl/.
GPU_WHEELS    := benchmarks/gpu-wheels.txt
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64
gpu-wheels:
	rm -rf .whl.tmp
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(addprefix --platform ,$(GPU_PLATFORMS)) -d .whl.tmp -r $(GPU_WHEELS)
	test "$$(ls .whl.tmp/*.whl | wc -l)" -eq "$$(grep -c '^[^#[:space:]]' $(GPU_WHEELS))"
	rm -rf .whl && mv .whl.tmp .whl
	ls .whl && du -sh .whl

# The bench (--device cuda) and the demo pipeline in under 8 minutes; GPU_CHECK_DEVICE=cpu GPU_CHECK_TINY=1
# PYTHON=.venv/bin/python is the dry run on this machine (see benchmarks/gpu_check.sh).
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) runs cache/*.zarr
