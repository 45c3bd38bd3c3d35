# Set-up and everyday commands. Everything runs in a virtual environment at .venv,
# created with pip so that this machine's local torch wheel is used.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PLUGINS := plugins/fusionkit-example-encoder plugins/fusionkit-timm plugins/fusionkit-transformers
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml plugins/*/*/*.py)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test,report]'
	# the plugins install as ordinary (non-editable) distributions, as a user would install them
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps $(PLUGINS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fusionkit demo

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/startup.py

clean:
	rm -rf $(VENV) runs
