# The two commands in README.md. Each creates the virtual environment if it is missing and runs the
# same install every time (pip is a no-op when nothing changed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test env

env:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -c constraints.txt -e '.[test]'

demo: env
	$(PY) -m cssl_ray.demo

test: env
	$(PY) -m pytest -q tests
