# The README's two commands: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: demo demo-study demo-raw test install clean-venv

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

# The raw demo release (abaw/raw_demo.py: face crops, videos with sound, transcripts, OpenFace CSVs),
# generated once with stand-in backbones (abaw/stand_ins.py: tiny, random weights, nothing downloaded), then
# extraction of all four kinds -> cross-validation -> submission: the real release's whole path.
RAW_DEMO_ROOT ?= $(or $(ABAW_RAW_DEMO_ROOT),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/abaw/raw-demo-v2)
OPENFACE_COLUMNS := AU01_r,AU02_r,AU04_r,AU05_r,AU06_r,AU12_r,AU15_r,AU26_r

demo-raw: $(STAMP)
	$(PY) -m abaw.raw_demo --root "$(RAW_DEMO_ROOT)" --models "$(RAW_DEMO_ROOT)-models"
	$(PY) -m abaw.extract visual --data-root "$(RAW_DEMO_ROOT)" --backbone test_vit \
		--weights "$(RAW_DEMO_ROOT)-models/vit.pth" --name visual
	$(PY) -m abaw.extract audio --data-root "$(RAW_DEMO_ROOT)" --videos "$(RAW_DEMO_ROOT)/videos" --mel --name audio
	$(PY) -m abaw.extract text --data-root "$(RAW_DEMO_ROOT)" --transcripts "$(RAW_DEMO_ROOT)/transcripts" \
		--model "$(RAW_DEMO_ROOT)-models/text" --name text
	$(PY) -m abaw.extract import --data-root "$(RAW_DEMO_ROOT)" --csv "$(RAW_DEMO_ROOT)/openface" \
		--frame-column frame --columns $(OPENFACE_COLUMNS) --name openface
	$(PY) run_cv.py --config configs/demo-raw.yaml --data-root "$(RAW_DEMO_ROOT)" --out runs/demo-raw
	$(PY) make_submission.py --runs runs/demo-raw

test: $(STAMP)
	$(PY) -m pytest -q --durations=10

clean-venv:
	rm -rf $(VENV)
