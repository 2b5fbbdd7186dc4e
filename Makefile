# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
DEMO ?= demo
STORAGE ?= local
SEED ?= 0
GENERATOR ?= synth
EXTERNAL ?=
VARIANTS ?= clip,tma
PYTEST_ARGS ?=
# pytest-xdist workers; the slow end-to-end tests keep to one of them (tests/conftest.py)
TEST_WORKERS ?= 2

.PHONY: install test test-fast demo demo-clean science science-targets sweep-demo up down status bench clean

install: $(STAMP)

# torch first, from the CPU wheel, so that nothing pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

test: install
	@command -v java >/dev/null || echo "warning: no Java runtime on PATH: METEOR (report generation) cannot run; its tests are skipped"
	@command -v sshd >/dev/null && command -v rsync >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server rsync) \
	  || echo "warning: no sshd or rsync (apt-get install openssh-server rsync): the cluster launcher test is skipped"
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	  || echo "warning: no Chromium (apt-get install chromium): the MLflow dashboard test (tests/evaluators/test_dashboard.py) is skipped"
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=25 $(PYTEST_ARGS)

test-fast: install
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

# dist/: the project wheel + constraints.txt of this locked environment, what cluster/node.sh installs on nodes
.PHONY: wheel
wheel: install
	$(BIN)/python -m cluster.wheel --out dist

demo: install
	$(BIN)/python -m experiments.demo --dir $(DEMO) --storage $(STORAGE)

# does pretraining learn? CLIP-only vs CLIP+TMA on phantoms, one seed (make science SEED=1 for another).
# VARIANTS=clip,tma,clip_restore,tma_restore also trains the restoration variants (each compared against clip).
# EXTERNAL=synth_ext also scores on a second generator's set, both ways round: train on GENERATOR, score
# GENERATOR + EXTERNAL; then train on EXTERNAL, score EXTERNAL + GENERATOR (twice the runtime)
science: install
	$(BIN)/python -m experiments.science --seed $(SEED) --variants $(VARIANTS)$(if $(EXTERNAL), --generator $(GENERATOR) --external $(EXTERNAL))
	$(if $(filter-out $(GENERATOR),$(EXTERNAL)),$(BIN)/python -m experiments.science --seed $(SEED) --variants $(VARIANTS) --generator $(EXTERNAL) --external $(GENERATOR))

# issue #9's targets over every seed `make science` has run (runs/science-s*.json), each met or not
science-targets: install
	$(BIN)/python -m experiments.science_targets --out runs

# a 4-trial Ray Tune sweep over TMA settings on phantoms (ASHA, 2 trials at a time)
sweep-demo: install
	$(BIN)/python -m experiments.sweep_demo

up: install
	$(BIN)/python -m cluster.local up

down:
	$(BIN)/python -m cluster.local down

status:
	$(BIN)/python -m cluster.local status

bench: install
	for c in configs/t3d.yaml configs/debug.yaml; do \
	  $(BIN)/python -m benchmarks.ingest --config $$c && $(BIN)/python -m benchmarks.stream --config $$c || exit 1; done
	$(BIN)/python -m benchmarks.codec --config configs/t3d.yaml
	$(BIN)/python -m benchmarks.kernels

demo-clean: down
	rm -rf $(DEMO)

clean:
	rm -rf $(VENV) .pytest_cache $(DEMO)
