"""Argument parsing for the top-level scripts; the work itself lives in the modules they call."""
from __future__ import annotations

import argparse
import os

from .config import RunConfig, resolve


def run_cv_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_cv.py", description="Cross-validate ABAW valence-arousal models.")
    # Every option defaults to None so that only flags the user gave override --config.
    p.add_argument("--data-root", help="Aff-Wild2 root (default: the built-in demo dataset)")
    p.add_argument("--test-list", help="test video list file (default: found at the data root)")
    p.add_argument("--test-sample", help="test sample file (default: found at the data root)")
    p.add_argument("--check", action="store_true", help="validate the dataset, print its summary and exit")
    p.add_argument("--config", help="YAML file holding any of these options; flags override it")
    p.add_argument("--arch", nargs="+", help="architecture(s) to train (see abaw.models.list_models())")
    p.add_argument("--size", choices=["demo", "abaw"], help="model size preset")
    p.add_argument("--folds", type=int, help="number of folds (default 5)")
    p.add_argument("--fold-mode", choices=["grouped", "val_fold", "holdout_val"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--patience", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--window", type=int, help="training window in frames (default 300)")
    p.add_argument("--hop", type=int, help="hop between windows in frames (default 200)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--jobs", type=int, help="folds trained in parallel")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="run folder (default runs/demo)")
    return p


def _data_root(config: RunConfig) -> str:
    if config.data_root is not None:
        return config.data_root
    from .demo import ensure_demo

    return str(ensure_demo())


def run_cv_main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never fetch weights at run time
    args = run_cv_parser().parse_args(argv)
    try:
        config = resolve(args)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}")
        return 2
    root = _data_root(config)
    from .checks import check_dataset

    dataset = check_dataset(root, test_list=config.test_list, test_sample=config.test_sample)
    if dataset is None:
        return 1
    if args.check:
        return 0
    from .cv import RunConflict, run_cv
    from .folds import FoldError

    try:
        return run_cv(config, dataset)
    except (RunConflict, FoldError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
