# The two commands in README.md. Each creates the virtual environment if it is missing and runs the
# same install every time (pip is a no-op when nothing changed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo demo-headroom test env

# pip compiles the installed packages to .pyc here, on purpose: where PYTHONDONTWRITEBYTECODE is set (this
# build machine sets it) Python never writes .pyc later, so with `pip --no-compile` every process, each Ray
# worker included, compiled torch and Ray from source on import (measured: the test suite 19m46s vs ~10m)
env:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -c constraints.txt -e '.[test]'

demo: env
	$(PY) -m cssl_ray.demo

# The label-headroom ablation (docs/science.md 0.8): nuclei, SSL4MIS's CE + Dice, 600 joint steps, 3 seeds of
# supervised, every image labelled, and the bn_stats control; ~17 min on a 2-core CPU (summed run times: 9 runs
# of 150-370 s, 2 at a time; not timed as one command)
demo-headroom: env
	$(PY) -m cssl_ray.ablate --space tune_spaces/nuclei_headroom.yaml --seeds 3 --protocols joint \
	    --cells supervised supervised_all bn_stats

# Two pytest processes side by side: the slow tests (Ray, Tune, an MLflow server; marked "slow") one
# after another in one, the fast ones (no Ray) in the other at the lowest priority (they fill the
# slow run's idle time instead of slowing it), so two Ray instances never share the 2
# cores (shared/ENVIRONMENT.md). The fast run's report follows the slow run's; exit status: both.
test: env
	@nice -n 19 $(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests > .pytest-fast.log 2>&1 & fast=$$!; \
	$(PY) -m pytest -q --durations=10 -m slow tests; slow=$$?; \
	wait $$fast; fast_rc=$$?; \
	echo "== the fast tests, run beside the slow ones:"; \
	if [ $$fast_rc -eq 0 ]; then tail -n 3 .pytest-fast.log; else cat .pytest-fast.log; fi; \
	rm -f .pytest-fast.log; \
	echo "== slow tests: exit $$slow; fast tests: exit $$fast_rc"; \
	[ $$slow -eq 0 ] && [ $$fast_rc -eq 0 ]
