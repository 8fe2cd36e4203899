"""Tables and figures that say whether an ensemble is worth submitting.

The notebooks (``notebooks/ensemble_gains.ipynb``, ``notebooks/optuna_study.ipynb``) and the command
line only call this module; every number comes from :mod:`abaw.runs` (the run folder; fold scores
from its summary.csv), :mod:`abaw.honest` (the typed rows of the honest report that
``make_submission.py --report`` prints) and :mod:`abaw.metrics` (CCC). Tables are pandas
DataFrames; figures are matplotlib Figures kept out of pyplot (optuna's are closed there), so a
notebook shows each once and the CLI leaks none.

    python -m abaw.report runs/demo --out reports/demo
    python -m abaw.report runs/a runs/b --out reports/ab --study mva --storage sqlite:///runs/mva/study.db

Score columns everywhere: ``ccc_v``, ``ccc_a`` and ``mean`` (their average, the ABAW score).
A *member* is one architecture of one run, labelled ``<run>/<arch>``.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .data import DataError
from .ensemble import score_videos
from .honest import REPORT_COLUMNS, Kind, Source, honest_report
from .io import atomic_path
from .metrics import score, valid_label_mask
from .runs import Inputs, MemberPredictions, Run, RunError, find_latest_demo_run, load_inputs, stack_folds

RUNS_ENV = "ABAW_RUNS"
STUDY_STORAGE_ENV = "ABAW_STUDY_STORAGE"
STUDY_NAME_ENV = "ABAW_STUDY_NAME"
SCORE_COLUMNS = ["ccc_v", "ccc_a", "mean"]
DIMENSIONS = {"ccc_v": "valence", "ccc_a": "arousal", "mean": "mean"}
# Matplotlib 3.10 renamed boxplot's vert=False to orientation="horizontal" (and 3.11 deprecates vert).
MATPLOTLIB_VERSION = tuple(int(part) for part in matplotlib.__version__.split(".")[:2])
HORIZONTAL = {"orientation": "horizontal"} if MATPLOTLIB_VERSION >= (3, 10) else {"vert": False}


# ---------------------------------------------------------------------------------------------
# Choosing and loading runs


def run_paths(paths: str | Path | Sequence[str | Path] | None = None, runs_dir: str | Path = "runs") -> list[str]:
    """The run folders to report on: ``$ABAW_RUNS`` (``path1:path2``), else ``paths``, else the latest demo run.

    The environment wins so that a test (or a batch job) can point an unchanged notebook at its run.
    """
    override = os.environ.get(RUNS_ENV, "")
    if override.strip():
        return [p for p in override.split(os.pathsep) if p]
    if paths:
        return [str(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    return [str(find_latest_demo_run(runs_dir).path)]


def load_runs(paths: Sequence[str | Path]) -> Inputs:
    """The runs, their dataset's labels and every member's predictions, read once (as make_submission.py does)."""
    return load_inputs([str(p) for p in paths])


def _runs_of(runs: Inputs | Run | str | Path | Sequence[Run | str | Path]) -> list[Run]:
    if isinstance(runs, Inputs):
        return runs.runs
    if isinstance(runs, (Run, str, Path)):
        runs = [runs]
    return [r if isinstance(r, Run) else Run.open(r) for r in runs]


def _member_label(run: Run, arch: str) -> str:
    return f"{run.name}/{arch}"  # as MemberPredictions.label, so tables join on it


def _score_columns(result: Mapping) -> dict:
    return {"ccc_v": result["valence"], "ccc_a": result["arousal"], "mean": result["mean"]}


# ---------------------------------------------------------------------------------------------
# Fold models and OOF


def _read_summary(run: Run) -> pd.DataFrame:
    path = run.path / "summary.csv"
    if not path.is_file():
        raise RunError(f"{path}: missing; the run has not finished (run the same run_cv.py command again)")
    summary = pd.read_csv(path, dtype={"arch": str, "fold": str, "status": str})
    wanted = {"arch", "fold", "ccc_v", "ccc_a", "ccc", "status"}
    if not wanted <= set(summary.columns):
        raise RunError(f"{path}:1: expected columns {','.join(sorted(wanted))}, got {','.join(summary.columns)}")
    return summary


def fold_scores(runs: Inputs | Run | str | Path | Sequence[Run | str | Path]) -> pd.DataFrame:
    """Each fold model's CCC on its own validation fold, as the run's summary.csv records it.

    Columns: member, arch, fold, ccc_v, ccc_a, mean, status (a failed fold keeps its row, with NaN).
    """
    frames = []
    for run in _runs_of(runs):
        summary = _read_summary(run)
        folds = summary[summary["fold"] != "oof"]
        frames.append(pd.DataFrame({
            "member": [_member_label(run, a) for a in folds["arch"]], "arch": folds["arch"].to_numpy(),
            "fold": folds["fold"].astype(int).to_numpy(), "ccc_v": folds["ccc_v"].to_numpy(),
            "ccc_a": folds["ccc_a"].to_numpy(), "mean": folds["ccc"].to_numpy(), "status": folds["status"].to_numpy()}))
    return pd.concat(frames, ignore_index=True)


def oof_scores(inputs: Inputs) -> pd.DataFrame:
    """Each member's CCC over all its OOF frames: every labelled CV frame, predicted by the fold model
    that did not train on it. Columns: member, ccc_v, ccc_a, mean, frames."""
    rows = []
    for member in inputs.members:
        result = score_videos(member.oof, inputs.labels)
        rows.append({"member": member.label, **_score_columns(result), "frames": result["frames"]})
    return pd.DataFrame(rows)


def plot_fold_scores(folds: pd.DataFrame, oof: pd.DataFrame | None = None) -> Figure:
    """Bars: each fold model's validation CCC per member (valence, arousal, mean panels).

    A black line across a member's bars marks its OOF CCC, the one number over all folds' frames;
    fold bars scattered far around it mean the folds are unequally hard, not that a model is bad.
    """
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    members = list(dict.fromkeys(folds["member"]))
    oof_of = {} if oof is None else oof.set_index("member")
    for ax, column in zip(axes, SCORE_COLUMNS):
        for i, member in enumerate(members):
            rows = folds[folds["member"] == member]
            width = 0.8 / max(len(rows), 1)
            positions = i - 0.4 + width * (np.arange(len(rows)) + 0.5)
            ax.bar(positions, rows[column], width=width * 0.9, color=f"C{i}")
            if member in getattr(oof_of, "index", []):
                ax.hlines(oof_of.loc[member, column], i - 0.45, i + 0.45, color="black", lw=2,
                          label="OOF" if i == 0 else None)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xticks(range(len(members)), members, rotation=20, ha="right")
        ax.set_title(f"CCC {DIMENSIONS[column]}")
    axes[0].set_ylabel("validation CCC (bars: folds in order)")
    if oof is not None:
        axes[-1].legend(loc="best")
    return fig


# ---------------------------------------------------------------------------------------------
# The merge comparison


def merge_report(inputs: Inputs, post: bool = True) -> pd.DataFrame:
    """The honest report of ``make_submission.py --report``, one row per model, merge or post-processing step.

    Single fold models, their average score (the bar a merge has to clear), fold merges (mean,
    median, CCC centering), the mean across architectures, the learned merges (``auto`` among them)
    and ``auto`` with each post-processing step, each scored on data neither it nor its models were
    fitted on (``scored_on``; ``source`` as a code). Rows scored on different data are not comparable.
    Columns: :data:`abaw.honest.REPORT_COLUMNS` (model, ccc_v, ccc_a, mean, frames, scored_on, kind,
    source, videos, member, fold, merge, post, fitted_on).
    """
    rows = honest_report(inputs.members, inputs.labels, inputs.truth, post=post)
    table = pd.DataFrame([row.as_dict() for row in rows], columns=REPORT_COLUMNS)
    return table.astype({"frames": "Int64", "videos": "Int64", "fold": "Int64"})  # keep whole numbers whole


PANELS = {Source.TEST.value: "test ground truth (demo)", Source.HOLDOUT.value: "holdout validation"}


def _panel(source: str) -> str:
    """Report rows share a panel when scored on the same labels: test, holdout, or OOF of any kind."""
    return PANELS.get(source, "OOF")


def _row_colour(kind: str) -> str:
    """Blue: one fold model; orange: the fold models' average score; green: a merge or post-processing."""
    if kind == Kind.FOLD_MODEL.value:
        return "C0"
    return "C1" if kind == Kind.FOLD_AVERAGE.value else "C2"


def plot_merge_report(report: pd.DataFrame) -> Figure:
    """Horizontal bars of each report row's mean CCC, one panel per scoring source.

    Panels keep apart what is not comparable (held-out validation, the demo's test labels, OOF);
    within a panel, a merge's bar beyond its members' average-score bar is the ensemble's gain.
    Rows that cannot be scored (fold merges on OOF) are left out.
    """
    scored = report[report["mean"].notna()].assign(panel=lambda t: t["source"].map(_panel))
    sources = list(dict.fromkeys(scored["panel"]))
    heights = [max(1.0, 0.28 * (scored["panel"] == s).sum()) for s in sources]
    fig = Figure(figsize=(10, sum(heights) + 1.0 * len(sources)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(sources), 1, height_ratios=heights, squeeze=False)[:, 0])
    for ax, source in zip(axes, sources):
        rows = scored[scored["panel"] == source].iloc[::-1]  # first row on top
        bars = ax.barh(range(len(rows)), rows["mean"].astype(float), color=[_row_colour(k) for k in rows["kind"]])
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
        ax.set_yticks(range(len(rows)), rows["model"], fontsize=8)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_title(f"scored on: {source}", fontsize=10)
    axes[-1].set_xlabel("mean CCC (blue: one fold model, orange: their average, green: merges)")
    return fig


# ---------------------------------------------------------------------------------------------
# Per-video CCC


def per_video_ccc(inputs: Inputs) -> pd.DataFrame:
    """Each member's OOF CCC on each video, over the video's labelled frames.

    Columns: member, video, fold (whose model predicted it), frames, ccc_v, ccc_a, mean. The
    challenge score pools all frames; this shows whether a few videos drag it down.
    """
    rows = []
    for member in inputs.members:
        for video, prediction in member.oof.items():
            result = score_videos({video: prediction}, {video: inputs.labels[video]})
            rows.append({"member": member.label, "video": video, "fold": member.oof_fold[video],
                         "frames": result["frames"], **_score_columns(result)})
    return pd.DataFrame(rows)


def per_video_summary(per_video: pd.DataFrame, column: str = "mean") -> pd.DataFrame:
    """Distribution of the per-video CCC (``column``) per member: videos, mean, quartiles, extremes."""
    grouped = per_video.groupby("member", sort=False)[column]
    return pd.DataFrame({
        "videos": grouped.size(), "mean": grouped.mean(), "min": grouped.min(), "q25": grouped.quantile(0.25),
        "median": grouped.median(), "q75": grouped.quantile(0.75), "max": grouped.max(),
        "below_zero": grouped.apply(lambda c: int((c < 0).sum())),
    })


def plot_per_video_ccc(per_video: pd.DataFrame, column: str = "mean") -> Figure:
    """Left: histogram of the per-video OOF CCC, one colour per member. Right: the same as boxplots,
    with every video as a dot. A long left tail means some videos are predicted badly."""
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    hist_ax, box_ax = fig.subplots(1, 2, width_ratios=[3, 2])
    members = list(dict.fromkeys(per_video["member"]))
    values = [per_video.loc[per_video["member"] == m, column].to_numpy(float) for m in members]
    bins = np.histogram_bin_edges(np.concatenate(values), bins=20)
    for i, (member, v) in enumerate(zip(members, values)):
        hist_ax.hist(v, bins=bins, alpha=0.5, color=f"C{i}", label=member)
    hist_ax.set_xlabel(f"per-video OOF CCC ({DIMENSIONS[column]})")
    hist_ax.set_ylabel("videos")
    hist_ax.legend(fontsize=8)
    box_ax.boxplot(values, showfliers=False, **HORIZONTAL)
    for i, v in enumerate(values):
        jitter = np.random.default_rng(i).uniform(-0.15, 0.15, len(v))  # seeded: the same picture every time
        box_ax.scatter(v, i + 1 + jitter, s=8, color=f"C{i}", alpha=0.7)
    box_ax.set_yticks(range(1, len(members) + 1), members, fontsize=8)
    box_ax.set_xlabel(f"per-video OOF CCC ({DIMENSIONS[column]})")
    return fig


# ---------------------------------------------------------------------------------------------
# Agreement between fold models


def fold_agreement_matrix(member: MemberPredictions, column: str = "mean") -> pd.DataFrame:
    """(K, K) CCC between fold models' test predictions, all test frames concatenated.

    ``column``: ccc_v, ccc_a or mean. Folds that agree little have most to gain from merging;
    folds that agree almost perfectly make merging close to pointless.
    """
    stacked = stack_folds(member.test, f"{member.label} test predictions")  # video -> (K, T, 2)
    predictions = np.concatenate(list(stacked.values()), axis=1)  # (K, frames, 2)
    valid = np.isfinite(predictions).all(axis=(0, 2))
    predictions = np.where(valid[None, :, None], predictions, 0.0)  # ccc masks by weighting: NaN * 0 is NaN
    k = len(predictions)
    matrix = np.array([[_score_columns(score(predictions[i], predictions[j], valid))[column] for j in range(k)]
                       for i in range(k)])
    labels = pd.Index([f"fold {f}" for f in member.folds], name=member.label)
    return pd.DataFrame(matrix, index=labels, columns=labels)


def fold_agreement(inputs: Inputs, column: str = "mean") -> dict[str, pd.DataFrame]:
    """Member label -> its fold agreement matrix (:func:`fold_agreement_matrix`)."""
    return {member.label: fold_agreement_matrix(member, column) for member in inputs.members}


def plot_fold_agreement(agreement: Mapping[str, pd.DataFrame]) -> Figure:
    """One heatmap per member: the CCC between each pair of its fold models' test predictions.

    The diagonal is 1. Low off-diagonal values mean the fold models disagree, which a merge
    averages out; a fold whose row is low everywhere went its own way.
    """
    fig = Figure(figsize=(4.2 * len(agreement), 3.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(agreement), squeeze=False)[0])
    low = min(0.0, min(float(np.nanmin(m.to_numpy())) for m in agreement.values()))
    image = None
    for ax, (label, matrix) in zip(axes, agreement.items()):
        image = ax.imshow(matrix.to_numpy(), vmin=low, vmax=1.0, cmap="viridis")
        ticks = range(len(matrix))
        ax.set_xticks(ticks, matrix.columns, rotation=45, ha="right")
        ax.set_yticks(ticks, matrix.index)
        for i in ticks:
            for j in ticks:
                ax.text(j, i, f"{matrix.iat[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if matrix.iat[i, j] > (low + 1) / 2 else "white")
        ax.set_title(label, fontsize=10)
    fig.colorbar(image, ax=list(axes), label="CCC between fold models (test)")
    return fig


# ---------------------------------------------------------------------------------------------
# Predictions over time


def best_and_worst(per_video: pd.DataFrame, n: int = 2, column: str = "mean") -> pd.DataFrame:
    """Per member, its ``n`` best and ``n`` worst videos by per-video OOF CCC (a column ``rank`` says which)."""
    parts = []
    for _, rows in per_video.groupby("member", sort=False):
        ordered = rows.sort_values(column, ascending=False)
        best = ordered.head(n)
        worst = ordered.drop(best.index).tail(n)  # a member with < 2n videos lists each video once
        parts += [best.assign(rank="best"), worst.assign(rank="worst")]
    return pd.concat(parts, ignore_index=True)


def plot_best_and_worst(inputs: Inputs, per_video: pd.DataFrame, member: str | None = None, n: int = 2) -> Figure:
    """Label (black) and OOF prediction (colour) over the frames of a member's best and worst videos.

    One row per video, valence left and arousal right; gaps are unlabelled frames. ``member``: a
    label ``<run>/<arch>`` (default the first member).
    """
    member = member or inputs.members[0].label
    if member not in set(per_video["member"]):
        raise ValueError(f"no per-video scores for member {member!r}; members: {sorted(set(per_video['member']))}")
    chosen = best_and_worst(per_video[per_video["member"] == member], n)
    predictions = next(m for m in inputs.members if m.label == member).oof
    fig = Figure(figsize=(12, 2.0 * len(chosen) + 0.6), layout="constrained")
    axes = fig.subplots(len(chosen), 2, sharey=True, squeeze=False)
    for row, video in zip(axes, chosen.itertuples()):
        labels = np.where(valid_label_mask(inputs.labels[video.video])[:, None], inputs.labels[video.video], np.nan)
        frames = np.arange(1, len(labels) + 1)
        for d, ax in enumerate(row):
            ax.plot(frames, labels[:, d], color="black", lw=1, label="label")
            ax.plot(frames, predictions[video.video][: len(labels), d], color="C1" if video.rank == "worst" else "C2",
                    lw=1, label="OOF prediction")
            ax.set_title(f"{video.video} ({video.rank}, CCC {DIMENSIONS['ccc_v' if d == 0 else 'ccc_a']} "
                         f"{video.ccc_v if d == 0 else video.ccc_a:.3f}, mean {video.mean:.3f})", fontsize=9)
        row[0].set_ylabel("value")
    for ax in axes[-1]:
        ax.set_xlabel("frame")
    axes[0, 1].legend(fontsize=8, loc="upper right")
    fig.suptitle(f"{member}: best and worst videos by per-video OOF CCC")
    return fig


# ---------------------------------------------------------------------------------------------
# Optuna studies


def default_storage(study_name: str, runs_dir: str | Path = "runs") -> str:
    """Where ``run_cv.py --tune --study NAME`` keeps a study by default: SQLite in runs/NAME/."""
    return f"sqlite:///{(Path(runs_dir) / study_name / 'study.db').resolve()}"


def study_source(storage: str | None = None, name: str | None = None, runs_dir: str | Path = "runs") -> tuple[str, str]:
    """(storage URL, study name): ``$ABAW_STUDY_STORAGE`` / ``$ABAW_STUDY_NAME`` win over the arguments;
    without a storage, the default SQLite file of the study."""
    name = os.environ.get(STUDY_NAME_ENV) or name
    if not name:
        raise ValueError(f"name the study (argument or ${STUDY_NAME_ENV})")
    return os.environ.get(STUDY_STORAGE_ENV) or storage or default_storage(name, runs_dir), name


def load_study(storage: str, name: str):
    """The study, read-only in spirit. A journal file (``*.log``, ``journal:PATH``) works as with ``--storage``."""
    with warnings.catch_warnings():  # optuna's tqdm.auto complains in a notebook without ipywidgets; harmless
        warnings.filterwarnings("ignore", message="IProgress not found")
        import optuna

    if storage.startswith("sqlite:///"):
        path = Path(storage.removeprefix("sqlite:///").split("?")[0])
        if str(path) != ":memory:" and not path.is_file():  # SQLAlchemy would create an empty database
            raise FileNotFoundError(f"{path}: no such study database (storage {storage})")
    if storage.startswith("journal:") or storage.endswith((".log", ".journal")):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        storage = JournalStorage(JournalFileBackend(storage.removeprefix("journal:")))
    return optuna.load_study(study_name=name, storage=storage)


def trial_states(study) -> pd.DataFrame:
    """How many trials completed, were pruned, failed or are running."""
    from .tune import state_counts  # abaw.tune imports torch; only the study functions need it

    counts = state_counts(study)
    return pd.DataFrame({"trials": list(counts.values())}, index=pd.Index(list(counts), name="state"))


def best_trials(study, n: int = 10) -> pd.DataFrame:
    """The ``n`` best complete trials (mean validation CCC, then parameters), as run_cv.py --tune prints them."""
    from .tune import top_trials_rows

    return pd.DataFrame(top_trials_rows(study, n))


def pruned_trials(study) -> pd.DataFrame:
    """Each pruned trial: its number, the step it was stopped at, its last intermediate value, its parameters."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)):
        last = max(t.intermediate_values) if t.intermediate_values else None
        rows.append({"trial": t.number, "pruned_at_step": last,
                     "last_value": t.intermediate_values.get(last) if last is not None else None, **t.params})
    return pd.DataFrame(rows, columns=None if rows else ["trial", "pruned_at_step", "last_value"])


def _detached(axes) -> Figure:
    """The Figure of an optuna plot, closed in pyplot: a notebook then shows it once, the CLI leaks none."""
    import matplotlib.pyplot as plt

    fig = np.ravel(axes)[0].figure
    plt.close(fig)
    return fig


def plot_optimization_history(study) -> Figure:
    """Each trial's objective (mean validation CCC) in order, with the best value so far."""
    from optuna.visualization import matplotlib as optuna_plots

    return _detached(optuna_plots.plot_optimization_history(study))


def plot_param_importances(study) -> Figure:
    """How much of the objective's variation each parameter explains (fANOVA over complete trials)."""
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as optuna_plots

    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        raise ValueError(f"study {study.study_name!r}: parameter importances need at least 2 complete trials")
    return _detached(optuna_plots.plot_param_importances(study))


def plot_pruned_trials(study) -> Figure:
    """Intermediate values (validation CCC per epoch, step = fold index x epochs + epoch) of pruned
    trials, in colour and ending at an x where the pruner stopped them, over complete trials in grey.

    A pruned curve that was still climbing steeply when stopped hints that the pruner is too eager.
    """
    from optuna.trial import TrialState

    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    for i, t in enumerate(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))):
        steps = sorted(t.intermediate_values)
        ax.plot(steps, [t.intermediate_values[s] for s in steps], color="grey", lw=0.8, alpha=0.6,
                label="complete trials" if i == 0 else None)
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    for i, t in enumerate(pruned):
        steps = sorted(t.intermediate_values)
        values = [t.intermediate_values[s] for s in steps]
        ax.plot(steps, values, color=f"C{i % 10}", lw=1.5, marker=".", label=f"trial {t.number} (pruned)")
        if steps:
            ax.plot(steps[-1], values[-1], "x", color=f"C{i % 10}", ms=10, mew=2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step (fold index x epochs + epoch)")
    ax.set_ylabel("validation CCC")
    ax.set_title(f"{study.study_name}: {len(pruned)} pruned trial(s)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------------
# Command line: python -m abaw.report


def _slug(label: str) -> str:
    return re.sub(r"[^\w.-]+", "_", label)


def save_figure(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")  # the temp name has no .png to infer from
    return path


def save_table(table: pd.DataFrame, path: Path, index: bool = False) -> Path:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=index, float_format="%.6f")
    return path


def write_run_report(inputs: Inputs, out: Path, n_videos: int = 2) -> list[Path]:
    """Every run table (CSV) and figure (PNG) into ``out``; returns the paths written."""
    folds, oof, report = fold_scores(inputs), oof_scores(inputs), merge_report(inputs)
    per_video = per_video_ccc(inputs)
    agreement = fold_agreement(inputs)
    written = [
        save_table(folds, out / "fold_scores.csv"),
        save_table(oof, out / "oof_scores.csv"),
        save_table(report, out / "merge_report.csv"),
        save_table(per_video, out / "per_video_ccc.csv"),
        save_table(per_video_summary(per_video), out / "per_video_summary.csv", index=True),
        save_table(best_and_worst(per_video, n_videos), out / "best_and_worst.csv"),
        *[save_table(m, out / f"fold_agreement_{_slug(label)}.csv", index=True) for label, m in agreement.items()],
        save_figure(plot_fold_scores(folds, oof), out / "fold_scores.png"),
        save_figure(plot_merge_report(report), out / "merge_report.png"),
        save_figure(plot_per_video_ccc(per_video), out / "per_video_ccc.png"),
        save_figure(plot_fold_agreement(agreement), out / "fold_agreement.png"),
    ]
    for member in inputs.members:
        fig = plot_best_and_worst(inputs, per_video, member.label, n_videos)
        written.append(save_figure(fig, out / f"best_and_worst_{_slug(member.label)}.png"))
    return written


def write_study_report(study, out: Path) -> list[Path]:
    """The study's tables (CSV) and figures (PNG) into ``out``, file names prefixed ``study_``."""
    from optuna.trial import TrialState

    written = [save_table(trial_states(study), out / "study_trial_states.csv", index=True),
               save_table(best_trials(study), out / "study_best_trials.csv"),
               save_table(pruned_trials(study), out / "study_pruned_trials.csv"),
               save_figure(plot_optimization_history(study), out / "study_optimization_history.png"),
               save_figure(plot_pruned_trials(study), out / "study_pruned_trials.png")]
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= 2:
        written.append(save_figure(plot_param_importances(study), out / "study_param_importances.png"))
    return written


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m abaw.report",
        description="Save the ensemble report's tables (CSV) and figures (PNG): fold scores, OOF scores, the "
                    "honest merge comparison, per-video CCC, fold agreement, best and worst videos; and, "
                    "with --study, the Optuna study's.")
    p.add_argument("runs", nargs="*", metavar="RUN",
                   help="run folders (default: $ABAW_RUNS, else the latest demo run under --runs-dir; "
                        "none with --study: the study only)")
    p.add_argument("--out", required=True, help="folder for the PNG and CSV files")
    p.add_argument("--study", help="Optuna study name: adds its figures")
    p.add_argument("--storage", help="the study's storage URL (default sqlite:///<runs-dir>/<study>/study.db)")
    p.add_argument("--runs-dir", default="runs", help="where the default run and study live (default runs/)")
    p.add_argument("--videos", type=int, default=2, help="best and worst videos to plot per member (default 2)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    matplotlib.use("Agg")  # optuna's plots go through pyplot; no display on a server
    from rich.markup import escape

    from .console import console

    args = parser().parse_args(argv)
    out = Path(args.out)
    written: list[Path] = []
    try:
        if args.runs or not args.study:
            paths = args.runs or run_paths(None, args.runs_dir)  # named runs win over $ABAW_RUNS here
            written += write_run_report(load_runs(paths), out, args.videos)
        if args.study:
            storage = args.storage or default_storage(args.study, args.runs_dir)
            written += write_study_report(load_study(storage, args.study), out)
    except (RunError, DataError, ValueError, KeyError, FileNotFoundError) as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}")
        return 1
    for path in written:
        console.print(str(path), markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
