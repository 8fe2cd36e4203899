#!/usr/bin/env python
"""Cross-validate ABAW valence-arousal models: one model per (architecture, fold).

    python run_cv.py                               # the built-in demo dataset, default architecture
    python run_cv.py --data-root ROOT --check      # validate a dataset root and print its summary
    python run_cv.py --data-root ROOT --arch mamba_va tcn_transformer --out runs/NAME

See README.md for the run directory layout.
"""
import sys

from abaw.cli import run_cv_main

if __name__ == "__main__":
    sys.exit(run_cv_main())
