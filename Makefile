# Every target creates the project's virtualenv from requirements/setup.cfg when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -e ".[dev]"
	touch $@

.PHONY: install test test-slow demo
install: $(VENV)/.installed

test: $(VENV)/.installed
	$(VENV)/bin/pytest -q -m "not slow"

test-slow: $(VENV)/.installed
	$(VENV)/bin/pytest -q -m slow

demo: $(VENV)/.installed
	$(PY) train.py recipes/demo.yaml
