# The README's two commands: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: demo demo-study test install clean-venv

install: $(STAMP)

# torch/torchvision first and pinned: unpinned, pip would pick other (multi-GB) builds.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Generate + validate the demo dataset, cross-validate the default architecture, then merge the
# folds into a submission and print the honest ensemble report and the zip's path.
demo: $(STAMP)
	$(PY) run_cv.py
	$(PY) make_submission.py

# An 8-trial Optuna study of the default architecture on the demo data, with pruning (~3 min on 2 cores).
demo-study: $(STAMP)
	$(PY) run_cv.py --tune --study demo-study --n-trials 8 --tune-folds 0 1 --epochs 4

test: $(STAMP)
	$(PY) -m pytest -q --durations=10

clean-venv:
	rm -rf $(VENV)
