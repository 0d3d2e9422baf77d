# `make demo` and `make test` work on a fresh machine: they create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,mkl]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/glam demo --model_dir=runs/demo

# Two workers, each taking whole test files (module fixtures compile once): XLA compiles on one core.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

bench: $(STAMP)
	$(BIN)/python scripts/bench_train_step.py
	$(BIN)/python scripts/bench_compile_depth.py
	$(BIN)/python scripts/bench_moe_layer.py

clean:
	rm -rf $(VENV) *.egg-info
