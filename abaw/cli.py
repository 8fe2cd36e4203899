"""Argument parsing for the top-level scripts; the work itself lives in the modules they call."""
from __future__ import annotations

import argparse
import os

from .config import RunConfig, resolve


TUNED_BY_DEFAULT = "mamba_va"
STORAGE_ENV = "ABAW_STORAGE"  # an environment variable that may hold the --storage URL, password and all


def run_cv_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_cv.py", description="Cross-validate ABAW valence-arousal models.")
    # Every option defaults to None so that only flags the user gave override --config.
    p.add_argument("--data-root", help="Aff-Wild2 root (default: the built-in demo dataset)")
    p.add_argument("--test-list", help="test video list file (default: found at the data root)")
    p.add_argument("--test-sample", help="test sample file (default: found at the data root)")
    p.add_argument("--subjects", help="CSV 'video,subject' that replaces the default subject rule "
                                      "(_left/_right and numbered parts of a recording are one subject)")
    p.add_argument("--check", action="store_true", help="validate the dataset, print its summary and exit")
    p.add_argument("--config", help="YAML file holding any of these options; flags override it")
    p.add_argument("--arch", nargs="+", help="architecture(s) to train (see abaw.models.list_models()); default "
                                             "mamba_va context_ridge (with --tune: mamba_va)")
    p.add_argument("--size", choices=["demo", "abaw"], help="model size preset")
    p.add_argument("--folds", type=int, help="number of folds (default 5)")
    p.add_argument("--fold-mode", choices=["grouped", "val_fold", "holdout_val"])
    p.add_argument("--epochs", type=int, help="at most this many epochs per fold (default 16)")
    p.add_argument("--patience", type=int, help="stop after this many epochs without a better validation CCC (default 6)")
    p.add_argument("--stop-split", type=float, help="early-stop on this share of the training subjects "
                                                    "instead of the fold, so OOF scores are unbiased (e.g. 0.15)")
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--window", type=int, help="training window in frames (default 300)")
    p.add_argument("--hop", type=int, help="hop between windows in frames (default 200)")
    p.add_argument("--presence", action=argparse.BooleanOptionalAction, default=None,
                   help="give the models a presence channel per modality, 1 where the frame has its feature "
                        "(a face); default off (no gain measured on the demo)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--jobs", type=int, help="folds trained in parallel")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="run folder (default runs/demo; runs/STUDY with --tune)")
    tune = p.add_argument_group("tuning (Optuna)")
    tune.add_argument("--tune", action="store_true", help="run an Optuna study instead of a CV run")
    tune.add_argument("--n-trials", type=int, default=20, help="trials in the study, shared by all workers")
    tune.add_argument("--study", default="study", help="study name")
    tune.add_argument("--storage", default=os.environ.get(STORAGE_ENV) or None,
                      help="Optuna storage: SQLAlchemy URL (postgresql://...), or a journal file (*.log / "
                           f"journal:PATH); default ${STORAGE_ENV} if set (keeps a password off the command line "
                           "and out of shell history), else SQLite in the study folder")
    tune.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"])
    tune.add_argument("--tune-folds", type=int, nargs="+", help="tune on these folds only (saves time)")
    tune.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    cluster = p.add_argument_group("cluster (Ray; pip install 'abaw[cluster]')")
    cluster.add_argument("--cluster", metavar="ADDRESS",
                         help="run each (arch, fold), or each --tune worker, as a Ray task: auto (the cluster "
                              "this node belongs to), ray://HOST:PORT, HOST:PORT, or local (start one here)")
    cluster.add_argument("--gpus-per-fold", type=float, help="GPU share of each fold on a cluster with GPUs "
                                                              "(default 1; a fraction such as 0.5 packs small models)")
    cluster.add_argument("--cpus-per-fold", type=int, help="CPUs per fold, its torch threads (default 1)")
    cluster.add_argument("--workers", type=int, help="Optuna workers with --tune (default: as many as the "
                                                      "cluster runs at once, at most --n-trials)")
    return p


CLUSTER_ONLY = ("gpus_per_fold", "cpus_per_fold", "workers")


def cluster_config(args: argparse.Namespace):
    """The --cluster options, or None without --cluster (then none of them may be given)."""
    given = [f"--{name.replace('_', '-')}" for name in CLUSTER_ONLY if getattr(args, name) is not None]
    if args.cluster is None:
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --cluster (on one machine: --jobs, --device; "
                             f"for more tuning workers, start more `run_cv.py --tune` processes on one --storage)")
        return None
    if args.workers is not None and not args.tune:
        raise ValueError("--workers sets the Optuna workers of --tune; a CV run has one Ray task per fold")
    from .cluster import ClusterConfig

    chosen = {name: getattr(args, name) for name in CLUSTER_ONLY if getattr(args, name) is not None}
    return ClusterConfig(address=args.cluster, **chosen)


def _data_root(config: RunConfig) -> str:
    if config.data_root is not None:
        return config.data_root
    from .demo import ensure_demo

    return str(ensure_demo())


def _config_names_arch(path: str | None) -> bool:
    from .config import load_yaml

    return bool(path) and "arch" in load_yaml(path)


def _tune(args: argparse.Namespace, config: RunConfig, dataset, cluster) -> int:
    from dataclasses import replace

    from .tune import run_study

    if config.out == RunConfig.out:  # no --out, neither on the command line nor in --config
        config = replace(config, out=f"runs/{args.study}")
    if args.arch is None and config.arch == RunConfig().arch and not _config_names_arch(args.config):
        config = replace(config, arch=[TUNED_BY_DEFAULT])  # no --arch: the default zoo's network (the ridge tunes itself)
    if cluster is not None:
        from .cluster import run_study_on_cluster

        run_study_on_cluster(cluster, config, dataset, args.study, args.n_trials, args.storage, args.pruner,
                             args.tune_folds, timeout=args.timeout)
        return 0
    run_study(config, dataset, args.study, args.n_trials, args.storage, args.pruner, args.tune_folds,
              timeout=args.timeout)
    return 0


def run_cv_main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never fetch weights at run time
    args = run_cv_parser().parse_args(argv)
    try:
        config = resolve(args)
        cluster = cluster_config(args)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}")
        return 2
    from .console import interrupted, sigterm_raises
    from .io import explain_os_error

    try:
        with sigterm_raises():
            return _run(args, config, cluster)
    except OSError as exc:  # a full disk, a folder we may not write: one line, no traceback
        print(f"error: {explain_os_error(exc)}")
        return 2
    except KeyboardInterrupt as exc:  # every file is written atomically: the finished work is whole
        kept = "finished trials are kept in the study" if args.tune else f"finished folds are kept in {config.out}"
        return interrupted(exc, f"{kept}; rerun the same command to continue")


def _run(args: argparse.Namespace, config: RunConfig, cluster) -> int:
    """Check the dataset, then cross-validate (or tune); the known failures become one ``error:`` line."""
    root = _data_root(config)
    from .checks import check_dataset

    # --check scans every feature value (seconds per 10 GB); a run checks each window as it reads it
    dataset = check_dataset(root, test_list=config.test_list, test_sample=config.test_sample,
                            subjects=config.subjects, scan_values=args.check)
    if dataset is None:
        return 1
    if args.check:
        return 0
    from .cluster import ClusterError
    from .cv import RunConflict, RunFolderError, run_cv
    from .data import DataError
    from .folds import FoldError
    from .train import CheckpointMismatch

    try:
        if args.tune:
            return _tune(args, config, dataset, cluster)
        return run_cv(config, dataset, cluster=cluster)
    # DataError: a corrupt feature value met in a window as it is read (data.VideoRecord.features);
    # OSError (a full disk, an unwritable folder) is explained by run_cv_main
    except (RunConflict, RunFolderError, FoldError, ClusterError, DataError, CheckpointMismatch, ValueError) as exc:
        print(f"error: {exc}")
        return 2
