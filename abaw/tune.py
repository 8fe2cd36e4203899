"""Optuna studies: tune one architecture over the folds, then train the final folds with the best trial.

    python run_cv.py --tune --arch mamba_va --n-trials 40 --study mva        # SQLite in runs/mva/
    python run_cv.py --config runs/mva/best_config.yaml                       # final folds, best trial

Objective: the mean over the folds (or ``--tune-folds``, a subset) of the CCC that chose each fold's
epoch: the fold's validation CCC, or with ``--stop-split`` the stop split's, so that the OOF
predictions of the best config chose neither its epochs nor its hyperparameters. Every epoch of
every fold reports an intermediate value (on the same videos) at step ``fold_index * epochs + epoch``,
so steps never collide and the pruner compares like with like. A trial that fails (NaN loss, out
of memory, a bad config) is recorded as failed with its reason in the ``fail_reason`` user
attribute; the study goes on.

Storage (``--storage``): default a SQLite file in the study folder; a path ending in ``.log`` or
``.journal`` (or ``journal:PATH``) is a JournalFileBackend for several processes on one machine or a
shared filesystem; any SQLAlchemy URL, e.g. ``postgresql://user@host/db``, for workers on several
machines. On RDB storages, workers send heartbeats: a killed worker's trial is marked failed after
the grace period and retried (RetryFailedTrialCallback).

Sampler seeds: the process that creates a study samples with the run's ``--seed`` (a fresh
single-worker study is reproducible); every process that joins an existing one (a rerun, a second
worker, the loser of a race to create it) draws a fresh seed, so it never replays the points the
study has already tried. Each trial records its worker's seed in the ``sampler_seed`` user attribute.
"""
from __future__ import annotations

import math
import os
import random
import secrets
import shutil
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NamedTuple

import optuna
import yaml
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from .config import RunConfig
from .console import console, table
from .data import Dataset
from .folds import load_or_make_folds
from .cv import fold_ids
from .io import atomic_path, atomic_write_text, redact_url
from .models import is_classical, model_info
from .train import FoldTrainer, TrainingDiverged

PRUNERS = ("median", "hyperband", "none")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, mpl plots
HEARTBEAT_SECONDS = int(os.environ.get("ABAW_HEARTBEAT_SECONDS", 30))  # a dead worker's trial is retried after 4x
# Raised by a trial that should be recorded as failed while the study goes on.
TRIAL_FAILURES = (TrainingDiverged, RuntimeError, ValueError, MemoryError)


def suggest_training(trial: optuna.Trial) -> dict[str, Any]:
    """The search space every architecture shares (RunConfig fields)."""
    return {
        "lr": trial.suggest_float("lr", 1e-5, 3e-3, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-5, 1e-1, log=True),
        "dropout": trial.suggest_float("dropout", 0.0, 0.4),
        "window": trial.suggest_categorical("window", [150, 300, 600]),
        "batch_size": trial.suggest_categorical("batch_size", [8, 16, 32]),
    }


def suggest_architecture(trial: optuna.Trial, arch: str, size: str) -> dict[str, Any]:
    """The architecture's own sizes, declared beside its config as ``search_space(trial, size)``."""
    config_class = type(model_info(arch, size=size).config)
    space = getattr(config_class, "search_space", None)
    return space(trial, size) if space is not None else {}


def journal_path(url: str) -> Path | None:
    """The journal file a ``--storage`` names (``journal:PATH``, ``*.log``, ``*.journal``), else None."""
    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        return Path(url.removeprefix("journal:"))
    return None


def make_storage(url: str | None, study_dir: Path) -> optuna.storages.BaseStorage:
    if url is None:
        url = f"sqlite:///{(study_dir / 'study.db').resolve()}"
    path = journal_path(url)
    if path is not None:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    return RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=4 * HEARTBEAT_SECONDS,
                      heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {name!r}; choose one of {PRUNERS}")


def trial_config(base: RunConfig, trial: optuna.Trial, arch: str) -> RunConfig:
    training = suggest_training(trial)
    training["hop"] = max(1, int(training["window"] * 2 / 3))  # keep the published 300/200 overlap ratio
    model = {**base.model, arch: {**base.model.get(arch, {}), **suggest_architecture(trial, arch, base.size)}}
    return replace(base, arch=[arch], model=model, **training)


def objective_name(config: RunConfig) -> str:
    """What a trial's value is the mean of, over the folds (see :attr:`FoldResult.stop_ccc`)."""
    return "mean stop-split CCC" if config.stop_split > 0 else "mean validation CCC"


class Objective:
    """Mean over the chosen folds of one architecture's early-stopping CCC, reported per epoch."""

    def __init__(self, base: RunConfig, dataset: Dataset, arch: str, folds_used: list[int], study_dir: Path,
                 folds_dir: str | Path = "folds", sampler_seed: int | None = None):
        self.base, self.dataset, self.arch, self.study_dir = base, dataset, arch, study_dir
        self.sampler_seed = sampler_seed  # set once the study is opened
        self.folds, self.folds_file = load_or_make_folds(dataset, base.folds, base.fold_mode, base.seed, folds_dir)
        available = fold_ids(self.folds)
        bad = [k for k in folds_used if k not in available]
        if bad:
            raise ValueError(f"--tune-folds {bad} not among the folds {available}")
        self.folds_used = folds_used or available

    def __call__(self, trial: optuna.Trial) -> float:
        config = trial_config(self.base, trial, self.arch)
        trial.set_user_attr("config", asdict(config))  # exactly what this trial trained with
        if self.sampler_seed is not None:  # with the config, where its parameters came from
            trial.set_user_attr("sampler_seed", self.sampler_seed)
        trial_dir = self.study_dir / "trials" / f"{trial.number:04d}"
        scores = []
        try:
            for index, fold in enumerate(self.folds_used):
                def report(epoch: int, value: float, index=index) -> None:
                    trial.report(value, step=index * config.epochs + epoch)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"pruned at fold {fold}, epoch {epoch + 1}")

                trainer = FoldTrainer(config, self.arch, fold, self.dataset, self.folds,
                                      trial_dir / f"fold{fold}", epoch_callback=report)
                result = trainer.run()
                if result.status != "completed":
                    raise TrainingDiverged(result.error)
                # The CCC that chose the epoch: with a stop split, the fold's own videos choose nothing.
                scores.append(result.stop_ccc)
        except TRIAL_FAILURES as exc:
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
            raise
        finally:
            shutil.rmtree(trial_dir, ignore_errors=True)  # trial models are not kept: the final run trains them
        value = sum(scores) / len(scores)
        if not math.isfinite(value):
            trial.set_user_attr("fail_reason", f"{objective_name(config)} is not finite")
            raise TrainingDiverged(f"{objective_name(config)} is not finite")
        return value


def best_config(study: optuna.Study, out: str) -> RunConfig:
    """The resolved run config the best trial trained with, training every fold into ``out``."""
    return replace(RunConfig(**study.best_trial.user_attrs["config"]), out=out)


def write_best_config(study: optuna.Study, base: RunConfig, arch: str, study_dir: Path) -> Path:
    config = best_config(study, out=str(Path(base.out).parent / f"{study_dir.name}-best"))
    path = study_dir / "best_config.yaml"
    header = (f"# best trial {study.best_trial.number} of study {study.study_name!r}: "
              f"{objective_name(config)} {study.best_value:.4f}\n"
              f"# train the final folds with: python run_cv.py --config {path}\n")
    atomic_write_text(path, header + yaml.safe_dump(asdict(config), sort_keys=False))
    return path


def top_trials_rows(study: optuna.Study, n: int = 10) -> list[dict]:
    trials = [t for t in study.trials if t.state == TrialState.COMPLETE]
    trials.sort(key=lambda t: t.value, reverse=True)
    rows = []
    for t in trials[:n]:
        rows.append({"trial": t.number, "CCC": t.value,
                     **{k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in t.params.items()}})
    return rows


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def save_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optimization history and parameter importances as PNG (importances need 2+ complete trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    saved = []
    plots = {"optimization_history.png": ovm.plot_optimization_history}
    if sum(t.state == TrialState.COMPLETE for t in study.trials) >= 2:
        plots["param_importances.png"] = ovm.plot_param_importances
    for name, plot in plots.items():
        ax = plot(study)
        with atomic_path(folder / name) as tmp:
            ax.figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        plt.close(ax.figure)
        saved.append(folder / name)
    return saved


def make_sampler(seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)


def fresh_seed() -> int:
    """A seed from fresh entropy: a joining process must not replay the points of any other."""
    return secrets.randbits(31)


class OpenedStudy(NamedTuple):
    study: optuna.Study
    sampler_seed: int
    created: bool  # by this process (then sampler_seed is the run's seed)


def _load_or_create(study_name: str, storage: optuna.storages.BaseStorage, creator_seed: int,
                    pruner: optuna.pruners.BasePruner) -> OpenedStudy:
    """Join the study if it exists, else create it; only its creator samples with ``creator_seed``."""
    def join() -> OpenedStudy:
        seed = fresh_seed()
        return OpenedStudy(optuna.load_study(study_name=study_name, storage=storage, sampler=make_sampler(seed),
                                             pruner=pruner), seed, created=False)

    try:
        return join()
    except KeyError:  # no such study yet
        pass
    try:
        return OpenedStudy(optuna.create_study(study_name=study_name, storage=storage, direction="maximize",
                                               sampler=make_sampler(creator_seed), pruner=pruner),
                           creator_seed, created=True)
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it first
        return join()


def _create_or_join(study_name: str, storage: str | None, study_dir: Path, creator_seed: int,
                    pruner: optuna.pruners.BasePruner, attempts: int = 5) -> OpenedStudy:
    """Create the study or join it (see :func:`_load_or_create`). Workers starting together race
    to create the same tables; the loser sees an SQLAlchemy error and simply tries again."""
    for attempt in range(attempts):
        try:
            return _load_or_create(study_name, make_storage(storage, study_dir), creator_seed, pruner)
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy's IntegrityError/OperationalError, driver-specific
            if attempt == attempts - 1 or "sqlalchemy" not in type(exc).__module__:
                raise
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


def check_tunable(arch: str) -> None:
    """A classical architecture has no epochs to prune and no training parameters to search."""
    if is_classical(arch):
        raise ValueError(f"{arch} is a classical model: it chooses its own penalty by a subject-grouped inner "
                         f"cross-validation on each fold's training videos, and has no epochs, learning rate or "
                         f"windows to tune. Cross-validate it without --tune: python run_cv.py --arch {arch}")


def check_study_arch(base: RunConfig) -> str:
    if len(base.arch) != 1:
        raise ValueError(f"--tune tunes one architecture at a time, got {base.arch}")
    check_tunable(base.arch[0])
    return base.arch[0]


def write_tune_config(base: RunConfig, study_name: str, storage: str | None, pruner: str,
                      tune_folds: list[int] | None) -> None:
    study_dir = Path(base.out)
    study_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(study_dir / "tune_config.yaml", yaml.safe_dump(
        {**asdict(base), "study": study_name, "storage": redact_url(storage), "pruner": pruner,
         "tune_folds": tune_folds},
        sort_keys=False))


def work_on_study(base: RunConfig, dataset: Dataset, study_name: str, n_trials: int, storage: str | None = None,
                  pruner: str = "median", tune_folds: list[int] | None = None, folds_dir: str | Path = "folds",
                  timeout: float | None = None) -> OpenedStudy:
    """Create or join the study, then run trials until it holds ``n_trials`` finished ones: one worker's share."""
    arch = check_study_arch(base)
    study_dir = Path(base.out)
    objective = Objective(base, dataset, arch, tune_folds or [], study_dir, folds_dir)
    study, sampler_seed, created = _create_or_join(study_name, storage, study_dir, base.seed, make_pruner(pruner))
    console.print(f"study {study_name!r} {'created' if created else 'joined'}: sampler seed {sampler_seed}",
                  markup=False)
    keep_study_settings(study, study_settings(base, objective))
    objective.sampler_seed = sampler_seed
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # n_trials is the study's total, shared by every worker, so a rerun or a second worker continues it.
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    if len(study.get_trials(deepcopy=False, states=finished)) < n_trials:
        study.optimize(objective, timeout=timeout, catch=TRIAL_FAILURES,
                       callbacks=[MaxTrialsCallback(n_trials, states=finished), _print_trial])
    return OpenedStudy(study, sampler_seed, created)


def run_study(base: RunConfig, dataset: Dataset, study_name: str, n_trials: int, storage: str | None = None,
              pruner: str = "median", tune_folds: list[int] | None = None, folds_dir: str | Path = "folds",
              timeout: float | None = None) -> optuna.Study:
    """Run (or join) a study for ``base.arch[0]`` and write its report and best config."""
    arch = check_study_arch(base)
    write_tune_config(base, study_name, storage, pruner, tune_folds)
    study = work_on_study(base, dataset, study_name, n_trials, storage, pruner, tune_folds, folds_dir, timeout).study
    report_study(study, base, arch, Path(base.out))
    return study


def study_settings(base: RunConfig, objective: Objective) -> dict[str, Any]:
    """What makes two trials' values comparable: the same architecture, objective, folds and fold subset."""
    return {"arch": objective.arch, "objective": objective_name(base),
            "folds": objective.folds_file.name,  # mode, K, seed and the data + subject-grouping fingerprint
            "tune_folds": list(objective.folds_used)}


def keep_study_settings(study: optuna.Study, settings: dict[str, Any]) -> None:
    """Record the settings on the study, or refuse to join one whose trials were scored otherwise:
    its best trial would be picked across values that measure different things."""
    differing = {k: (study.user_attrs[k], v) for k, v in settings.items()
                 if k in study.user_attrs and study.user_attrs[k] != v}
    if differing:
        diff = "; ".join(f"{k}: {old!r} in the study, {new!r} now" for k, (old, new) in differing.items())
        raise ValueError(f"study {study.study_name!r} was run with other settings ({diff}); use another --study, "
                         f"or the settings it was made with")
    for key, value in settings.items():
        if key not in study.user_attrs:
            study.set_user_attr(key, value)


def _print_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    value = f"{trial.value:.4f}" if trial.value is not None else "-"
    reason = trial.user_attrs.get("fail_reason", "")
    console.print(f"trial {trial.number}: {trial.state.name} CCC {value} {reason}", markup=False)


def report_study(study: optuna.Study, base: RunConfig, arch: str, study_dir: Path) -> None:
    console.print(table(top_trials_rows(study), title=f"Top trials of {study.study_name} ({arch})"))
    console.print(f"trials: {state_counts(study)}")
    if any(t.state == TrialState.COMPLETE for t in study.trials):
        path = write_best_config(study, base, arch, study_dir)
        console.print(f"best config: {path}  ->  python run_cv.py --config {path}")
        for plot in save_plots(study, study_dir):
            console.print(f"plot: {plot}")
