# Two commands for a fresh machine (Debian 12, python3.12, no GPU):
#   make train   - set up .venv/ (once) and run the main job: stage 2 of the tiny PixelLM on synthetic data
#   make test    - set up .venv/ (once) and run the test suite
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup train test test-fast
setup:
	@scripts/setup_env.sh

train: setup
	$(PY) -m nemo_pixellm.train +stage=stage2

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests
