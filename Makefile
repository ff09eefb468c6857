# mrl-serve: the user-facing commands. Run from the repository root.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_CKPT ?= model_store/fashion_mnist/mrl_resnet50_fp16.pt
DEMO_THRESHOLDS ?= model_store/fashion_mnist/thresholds.json
CHECKPOINT ?= $(DEMO_CKPT)
THRESHOLDS ?= $(if $(filter $(CHECKPOINT),$(DEMO_CKPT)),$(DEMO_THRESHOLDS),)
GRAPH ?= jit
# What the workers serve: card (the card's numerics), fp32, bf16, int8 or auto (docs/performance.md).
NUMERICS ?= card
# What runs int8: torch, openvino or auto (OpenVINO where its thresholds set passed parity and ran faster here).
RUNTIME ?= torch
# make serve REPLICAS=3: that many TorchServe instances behind an HAProxy gateway with API keys.
REPLICAS ?= 1
# glibc malloc: keep freed activations mapped instead of returning them to the OS between batches
# (measured in bench/: repeated page faults otherwise cost up to 2x at larger batches), for the
# in-process commands (training, calibration, the benchmark's raw pipeline). TorchServe's workers
# get it, with the rest of their environment, from model_store/serve.py's SERVER_ENV.
export MALLOC_MMAP_THRESHOLD_ ?= 4294967296
export MALLOC_TRIM_THRESHOLD_ ?= 68719476736

.PHONY: help setup env serve archive archive-han1000 stop token lint test test-unit test-integration monitor bench parity image clean

help:
	@echo "make help      this list"
	@echo "make setup     install the Debian packages of setup/debian-packages.txt (every target runs it)"
	@echo "make env       the set-up step and .venv with the project installed (every target below runs it)"
	@echo "make serve     build both bundled archives, start TorchServe, print a ready curl per model"
	@echo "make serve NUMERICS=auto   the fastest numerics this CPU runs that passed parity (int8 where it did)"
	@echo "make serve NUMERICS=auto RUNTIME=auto   int8 on OpenVINO where its set passed parity and ran faster here"
	@echo "make serve REPLICAS=3   that many TorchServe instances behind HAProxy (API keys at the gateway)"
	@echo "make serve CHECKPOINT=path THRESHOLDS=path   serve your own checkpoint (docs/models.md)"
	@echo "make stop      stop TorchServe (every replica and the gateway too)"
	@echo "make token     print a fresh inference key for the running server (keys expire after 60 min)"
	@echo "make lint      the house's layers (import-linter, docs/architecture.md) and ruff"
	@echo "make test      the whole test suite (what CI runs; it runs make lint too)"
	@echo "make test-unit          the unit tests only (no server)"
	@echo "make test-integration   the integration tests only (real TorchServe, Prometheus, HAProxy)"
	@echo "make archive CHECKPOINT=path [THRESHOLDS=path]   build model_store/mrl_resnet50.mar"
	@echo "make archive-han1000   build model_store/han1000.mar from its committed checkpoint (docs/models.md)"
	@echo "make monitor   start Prometheus scraping the running server (docs/monitoring.md)"
	@echo "make bench     the benchmark (docs/performance.md, docs/benchmarks.md)"
	@echo "make parity    bf16 (where the CPU has it) and int8 against fp32 (docs/results/parity*.json)"
	@echo "make image     build the runtime image with podman (deploy/kserve/Dockerfile); prints NAME:TAG last"
	@echo "make clean     remove logs, built archives, key_file.json and pytest's cache"

# The set-up step: Debian packages (JRE, data, Prometheus, fonts). Quick when all are there.
setup:
	@setup/system.sh

$(VENV)/.installed: pyproject.toml setup/runtime.txt setup/tools.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

env: setup $(VENV)/.installed

archive: env
	$(PY) model_store/build_archive.py --checkpoint $(CHECKPOINT) \
		$(if $(THRESHOLDS),--thresholds $(THRESHOLDS)) --graph $(GRAPH) --numerics $(NUMERICS) --runtime $(RUNTIME)

# The second bundled model: 1000 printed Han characters (model_store/han1000, docs/models.md). Git carries
# its fp16 checkpoint; a tree without it (a retraining in progress) serves the demo model alone.
HAN1000 := model_store/han1000
archive-han1000: env
	@if [ -f $(HAN1000)/mrl_resnet50_fp16.pt ]; then \
		$(PY) model_store/build_archive.py --checkpoint $(HAN1000)/mrl_resnet50_fp16.pt \
			--thresholds $(HAN1000)/thresholds.json --name han1000 --graph $(GRAPH) --numerics $(NUMERICS) --runtime $(RUNTIME); \
	else \
		rm -f model_store/han1000.mar; \
		echo "han1000: no $(HAN1000)/mrl_resnet50_fp16.pt, so only the demo model is served;"; \
		echo "  git checkout -- $(HAN1000)/mrl_resnet50_fp16.pt restores the committed one."; \
	fi

serve: archive archive-han1000
ifeq ($(REPLICAS),1)
	$(PY) -m model_store.serve start
else
	$(PY) -m model_store.cluster start --replicas $(REPLICAS)
endif

stop:
	$(PY) -m model_store.cluster stop
	$(PY) -m model_store.serve stop

# A fresh inference key for the running server (the old one stops working; keys expire after 60 min).
token:
	@$(PY) -m model_store.serve token

# The architecture checks itself: import-linter's contracts (pyproject.toml, docs/architecture.md)
# and ruff. tests/unit/test_lint.py runs this target and plants violations in a scratch copy.
lint: env
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .

test: env
	$(PY) -m pytest -q -ra tests

test-unit: env
	$(PY) -m pytest -q tests/unit

test-integration: env
	$(PY) -m pytest -q tests/integration

monitor: env
	$(PY) -m monitoring.prometheus start $(if $(filter-out 1,$(REPLICAS)),--config logs/cluster/prometheus.yml)

bench: env
	$(PY) -m bench.run

# bf16 against fp32 where this CPU has bf16; int8 against fp32 on each bundled model present, each
# mode with its own thresholds set (fit here if the file has no int8 set yet).
parity: env
	@if $(PY) -c "import sys, torch; from handler.engine import bf16_supported; sys.exit(not bf16_supported(torch.device('cpu')))"; \
		then $(PY) -m bench.parity; else echo "bf16 parity: this CPU has no bf16 instructions; skipped"; fi
	$(PY) -m bench.parity --mode int8
	@if [ -f $(HAN1000)/mrl_resnet50_fp16.pt ]; then \
		$(PY) -c "import json, sys; d = json.load(open('$(HAN1000)/thresholds.json')); sys.exit('int8' in d.get('sets', {}))" && \
		$(PY) calibration/fit_thresholds.py --checkpoint $(HAN1000)/mrl_resnet50_fp16.pt --data han1000:holdout \
			--out $(HAN1000)/thresholds.json --method frontier --eval-data han1000:test --numerics int8 --add; \
		if $(PY) -c "import sys; from pathlib import Path; from bench.harness import int8_set_runs_here; \
			sys.exit(not int8_set_runs_here(Path('$(HAN1000)/thresholds.json')))"; then \
		$(PY) -m bench.parity --mode int8 --checkpoint $(HAN1000)/mrl_resnet50_fp16.pt \
			--thresholds $(HAN1000)/thresholds.json --data han1000:test; \
		else echo "han1000: its int8 set has 8-bit activations, which need VNNI; this CPU has none: skipped"; fi; \
	else echo "han1000: no checkpoint here (docs/models.md); its parity is skipped"; fi

# The runtime image (KServe's and any container platform's), built here with podman from a Debian
# base; a rebuild with unchanged inputs reuses the cache. The last line printed is NAME:TAG.
image: env
	@PY=$(PY) deploy/kserve/build-image.sh

clean:
	rm -rf logs model_store/*.mar key_file.json .pytest_cache
