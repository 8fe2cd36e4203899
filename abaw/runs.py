"""Read (and write) the run directory the CV engine produces, so nothing else parses it by hand.

Layout of ``runs/<name>/``::

    config.yaml                  the fully resolved RunConfig (data_root, arch, folds, fold_mode, seed, ...)
    folds.csv                    video,subject,split,fold   (fold -1: held out of CV, fold_mode "holdout_val")
    <arch>/fold<k>/              model.pt, metrics.json, history.csv (classical: model.npz + model.json, metrics.json)
    <arch>/oof.csv               video,frame,valence,arousal,fold   every labelled train+val frame, predicted
                                 by the one fold model that did not train on it
    <arch>/test/fold<k>.csv      video,frame,valence,arousal        every frame of every test video
    <arch>/holdout/fold<k>.csv   video,frame,valence,arousal        (holdout_val only) the held-out videos
    summary.csv                  per arch and fold: CCC v, a, mean; and OOF CCC

``frame`` is 1-based, as in ``video/00001.jpg``. Predictions come back per video as float64 (T, 2)
arrays with NaN at frames the file does not list (e.g. unlabelled frames in ``oof.csv``).
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from typing import TYPE_CHECKING

from .folds import HOLDOUT, FoldError, read_fold_table
from .io import atomic_path

if TYPE_CHECKING:
    from .data import Dataset

PREDICTION_COLUMNS = ["video", "frame", "valence", "arousal"]
FOLD_DIR_RE = re.compile(r"^fold(\d+)$")


class RunError(Exception):
    """A run folder is incomplete or a file in it is malformed; the message names the file (and line)."""


# ---------------------------------------------------------------------------------------------
# Prediction files


def write_predictions(
    path: str | Path,
    predictions: Mapping[str, np.ndarray],
    fold: int | Mapping[str, int] | None = None,
    masks: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Write per-video (T, 2) predictions as ``video,frame,valence,arousal[,fold]`` rows, atomically.

    Args:
        predictions: video -> (T, 2) array; row i is frame i + 1.
        fold: adds a ``fold`` column (oof.csv): one fold for every row, or one per video.
        masks: video -> (T,) bool; only these frames are written (oof.csv lists labelled frames only).
            Without it every frame is written.

    Values are written with 6 decimals. A NaN among the written frames is an error naming the
    video and frame: a missing prediction must be visible, not a silently dropped row.
    """
    columns = PREDICTION_COLUMNS + (["fold"] if fold is not None else [])
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        handle.write(",".join(columns) + "\n")
        for video, values in predictions.items():
            frames, values = _frames_to_write(path, video, values, None if masks is None else masks[video])
            suffix = "" if fold is None else f",{fold[video] if isinstance(fold, Mapping) else fold}"
            # Formatted per video, not per file: a whole run's OOF never sits in memory as text.
            handle.write("".join(f"{video},{frame},{v:.6f},{a:.6f}{suffix}\n"
                                 for frame, (v, a) in zip(frames.tolist(), values.tolist())))


def _frames_to_write(path, video: str, values, mask) -> tuple[np.ndarray, np.ndarray]:
    """1-based frame numbers and (n, 2) values of the frames to write; NaN among them is an error."""
    if "," in video or "\n" in video:
        raise ValueError(f"video name {video!r} cannot be written to a CSV row")
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != 2:
        raise ValueError(f"predictions of {video!r} must be (T, 2), got shape {values.shape}")
    frames = np.arange(1, len(values) + 1)
    if mask is not None:
        keep = np.asarray(mask, dtype=bool)
        if keep.shape != (len(values),):
            raise ValueError(f"mask of {video!r} has shape {keep.shape}, predictions have {len(values)} frames")
        frames, values = frames[keep], values[keep]
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise ValueError(f"{path}: non-finite prediction for {video!r} frame {int(frames[bad][0])} "
                         f"({int(bad.sum())} frame(s) in all)")
    return frames, values


def _bad_line(path: Path, table: pd.DataFrame, rows: np.ndarray, message: str) -> RunError:
    """An error naming the file and the line of the first offending row (line 1 is the header)."""
    first = int(np.flatnonzero(rows)[0])
    return RunError(f"{path}:{first + 2}: {message} (video {table['video'].iat[first]!r}); "
                    f"{int(rows.sum())} such row(s)")


def read_prediction_table(path: str | Path, with_fold: bool = False) -> pd.DataFrame:
    """Read and validate a prediction file: columns, numbers, 1-based frames, no duplicate frame."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: missing prediction file")
    try:
        table = pd.read_csv(path, dtype={"video": str}, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: not a readable CSV: {exc}") from exc
    wanted = PREDICTION_COLUMNS + (["fold"] if with_fold else [])
    if list(table.columns[: len(wanted)]) != wanted:
        raise RunError(f"{path}:1: expected header {','.join(wanted)}, got {','.join(map(str, table.columns))}")
    for column in wanted[1:]:
        numbers = pd.to_numeric(table[column], errors="coerce")
        bad = ~np.isfinite(numbers.to_numpy(np.float64))
        if bad.any():
            raise _bad_line(path, table, bad, f"missing or non-numeric {column}")
        table[column] = numbers
    integral = ["frame"] + (["fold"] if with_fold else [])
    for column in integral:
        bad = (table[column] % 1 != 0).to_numpy()
        if bad.any():
            raise _bad_line(path, table, bad, f"{column} is not a whole number")
        table[column] = table[column].astype(np.int64)
    if (bad := (table["frame"] < 1).to_numpy()).any():
        raise _bad_line(path, table, bad, "frame numbers start at 1")
    if (bad := table.duplicated(["video", "frame"]).to_numpy()).any():
        raise _bad_line(path, table, bad, "frame listed twice")
    return table


def table_to_videos(table: pd.DataFrame, path: Path,
                    n_frames: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Per-video float64 (T, 2) arrays; NaN where the table lists no frame.

    T is ``n_frames[video]`` when given (a frame beyond it is an error), else the last listed frame.
    """
    out: dict[str, np.ndarray] = {}
    frames_all = table["frame"].to_numpy()
    values_all = table[["valence", "arousal"]].to_numpy(np.float64)
    for video, rows in table.groupby("video", sort=False).indices.items():
        frames = frames_all[rows]
        length = int(frames.max()) if n_frames is None else n_frames.get(video)
        if length is None:
            raise _bad_line(path, table, table["video"].to_numpy() == video, "video is not in the dataset")
        if frames.max() > length:
            too_far = np.zeros(len(table), bool)
            too_far[rows[frames > length]] = True
            raise _bad_line(path, table, too_far, f"frame beyond the video's {length} frames")
        array = np.full((length, 2), np.nan)
        array[frames - 1] = values_all[rows]
        out[video] = array
    return out


def read_predictions(path: str | Path, n_frames: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """A ``video,frame,valence,arousal`` file as video -> (T, 2) float64, NaN at unlisted frames."""
    path = Path(path)
    return table_to_videos(read_prediction_table(path), path, n_frames)


def read_oof(path: str | Path,
             n_frames: Mapping[str, int] | None = None) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """``oof.csv`` as (video -> (T, 2) predictions, video -> the fold whose model predicted it)."""
    path = Path(path)
    table = read_prediction_table(path, with_fold=True)
    first_fold = table.groupby("video", sort=False)["fold"].transform("first")
    if (bad := (table["fold"] != first_fold).to_numpy()).any():
        raise _bad_line(path, table, bad, "video predicted by a second fold model (folds are whole videos)")
    fold_of = table.groupby("video", sort=False)["fold"].first().astype(int).to_dict()
    return table_to_videos(table, path, n_frames), fold_of


def stack_folds(by_fold: Mapping[int, Mapping[str, np.ndarray]],
                what: str = "predictions") -> dict[str, np.ndarray]:
    """fold -> video -> (T, 2) into video -> (K, T, 2), folds in ascending order.

    Every fold must predict the same videos over the same frames, else the merge would be of
    different things.
    """
    folds = sorted(by_fold)
    if not folds:
        raise RunError(f"no fold {what} to stack")
    videos = list(by_fold[folds[0]])
    for k in folds[1:]:
        if set(by_fold[k]) != set(videos):
            missing = sorted(set(videos) ^ set(by_fold[k]))
            raise RunError(f"fold {k} {what} cover other videos than fold {folds[0]}: {missing[:5]}")
    stacked = {}
    for video in videos:
        lengths = {len(by_fold[k][video]) for k in folds}
        if len(lengths) > 1:
            raise RunError(f"{what} of {video!r} differ in length across folds: {sorted(lengths)}")
        stacked[video] = np.stack([by_fold[k][video] for k in folds])
    return stacked


# ---------------------------------------------------------------------------------------------
# Run folders


@dataclass(frozen=True)
class Run:
    """A finished (or finishing) run folder; every reader checks its files and names them in errors."""

    path: Path
    config: dict

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        path = Path(path)
        config_path = path / "config.yaml"
        if not config_path.is_file():
            raise RunError(f"{config_path}: missing; is {path} a run folder written by run_cv.py?")
        try:
            config = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise RunError(f"{config_path}: not valid YAML: {exc}") from exc
        if not isinstance(config, dict):
            raise RunError(f"{config_path}: expected a mapping of option: value")
        return cls(path, config)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def fold_mode(self) -> str:
        return str(self.config.get("fold_mode", "grouped"))

    @property
    def holds_out_validation(self) -> bool:
        return self.fold_mode == "holdout_val"

    @cached_property
    def config_hash(self) -> str:
        return hashlib.sha256((self.path / "config.yaml").read_bytes()).hexdigest()[:12]

    def data_root(self) -> Path:
        """The dataset the run was trained on; ``data_root: null`` means the built-in demo."""
        from .demo import ensure_demo

        root = self.config.get("data_root")
        return Path(root) if root is not None else ensure_demo()

    @property
    def is_demo(self) -> bool:
        from .demo import default_root

        root = self.config.get("data_root")
        return root is None or Path(root).resolve() == default_root().resolve()

    @cached_property
    def archs(self) -> list[str]:
        """Architectures in config order that have a folder; without an ``arch`` key, every folder with folds."""
        listed = self.config.get("arch")
        listed = [listed] if isinstance(listed, str) else listed
        if listed is None:
            listed = sorted(p.name for p in self.path.iterdir() if p.is_dir() and self._fold_dirs(p))
        present = [arch for arch in listed if (self.path / arch).is_dir()]
        if not present:
            raise RunError(f"{self.path}: no architecture folder (config.yaml lists {listed})")
        return present

    @staticmethod
    def _fold_dirs(arch_dir: Path) -> list[int]:
        return sorted(int(m[1]) for p in arch_dir.iterdir() if p.is_dir() and (m := FOLD_DIR_RE.match(p.name)))

    def folds(self, arch: str) -> list[int]:
        """Fold numbers with a ``<arch>/fold<k>/`` folder, ascending; every one must be finished.

        A merge of the finished folds only would quietly be another ensemble than the run's.
        """
        arch_dir = self.path / arch
        folds = self._fold_dirs(arch_dir)
        if not folds:
            raise RunError(f"{arch_dir}: no fold<k>/ folders")
        unfinished = [k for k in folds if not (arch_dir / f"fold{k}" / "metrics.json").is_file()]
        if unfinished:
            raise RunError(f"{arch_dir}: fold(s) {unfinished} not finished (no metrics.json); run the same "
                           f"run_cv.py command again to complete them")
        return folds

    def fold_table(self) -> pd.DataFrame:
        path = self.path / "folds.csv"
        if not path.is_file():
            raise RunError(f"{path}: missing")
        try:
            return read_fold_table(path)
        except FoldError as exc:
            raise RunError(str(exc)) from exc

    def holdout_videos(self) -> list[str]:
        table = self.fold_table()
        return table.loc[table["fold"] == HOLDOUT, "video"].tolist()

    def read_oof(self, arch: str, n_frames: Mapping[str, int] | None = None):
        """(video -> (T, 2) OOF predictions, NaN at unlisted frames; video -> fold that predicted it)."""
        return read_oof(self.path / arch / "oof.csv", n_frames)

    def read_test(self, arch: str, n_frames: Mapping[str, int] | None = None) -> dict[int, dict[str, np.ndarray]]:
        """fold -> video -> (T, 2): every fold model's predictions of the test videos."""
        return {k: read_predictions(self.path / arch / "test" / f"fold{k}.csv", n_frames) for k in self.folds(arch)}

    def read_holdout(self, arch: str, n_frames: Mapping[str, int] | None = None) -> dict[int, dict[str, np.ndarray]]:
        """fold -> video -> (T, 2) on the held-out validation videos; empty unless fold_mode is holdout_val."""
        if not self.holds_out_validation:
            return {}
        return {k: read_predictions(self.path / arch / "holdout" / f"fold{k}.csv", n_frames)
                for k in self.folds(arch)}


@dataclass
class MemberPredictions:
    """Everything one architecture of one run predicted, read once: the unit the ensemble merges."""

    run: Run
    arch: str
    oof: dict[str, np.ndarray]
    oof_fold: dict[str, int]
    test: dict[int, dict[str, np.ndarray]]
    holdout: dict[int, dict[str, np.ndarray]]

    @property
    def label(self) -> str:
        return f"{self.run.name}/{self.arch}"

    @property
    def folds(self) -> list[int]:
        return sorted(self.test)


def load_members(runs: list[Run], n_frames: Mapping[str, int]) -> list[MemberPredictions]:
    """Read every architecture of every run; ``n_frames`` (video -> frame count) sizes the arrays."""
    members = []
    for run in runs:
        for arch in run.archs:
            oof, oof_fold = run.read_oof(arch, n_frames)
            members.append(MemberPredictions(run, arch, oof, oof_fold, run.read_test(arch, n_frames),
                                             run.read_holdout(arch, n_frames)))
    return members


def find_latest_demo_run(runs_dir: str | Path = "runs") -> Run:
    """The most recently finished run (has summary.csv) made on the built-in demo dataset."""
    runs_dir = Path(runs_dir)
    candidates = []
    for config in runs_dir.glob("*/config.yaml") if runs_dir.is_dir() else []:
        try:
            run = Run.open(config.parent)
        except RunError:
            continue
        if run.is_demo and (run.path / "summary.csv").is_file():
            candidates.append(((run.path / "summary.csv").stat().st_mtime, run.path.name, run))
    if not candidates:
        raise RunError(f"no finished run on the demo dataset under {runs_dir}/ (a folder with config.yaml and "
                       f"summary.csv); train one with `python run_cv.py`, or name runs with --runs")
    return max(candidates, key=lambda c: c[:2])[2]


def check_same_folds(runs: Sequence[Run]) -> None:
    """Runs merged together must share their fold assignment.

    Merges and post-processing are scored nested across folds: fitted on the other folds' OOF. If
    another run's folds differ, its OOF predictions of those videos come from models that trained
    on the scored fold, and its labels leak into the nested scores."""
    first = dict(zip(runs[0].fold_table()["video"], runs[0].fold_table()["fold"]))
    for run in runs[1:]:
        table = run.fold_table()
        moved = [v for v, f in zip(table["video"], table["fold"]) if v in first and first[v] != f]
        if moved:
            raise RunError(f"{run.path / 'folds.csv'} assigns {len(moved)} video(s) to other folds than "
                           f"{runs[0].path / 'folds.csv'} (e.g. {moved[:3]}): merged runs must share their folds "
                           f"(the same --folds, --fold-mode, --seed and subject grouping), or the nested scores leak")


@dataclass
class Inputs:
    """What both the report and the writer need: runs, their dataset, and every member's predictions."""

    runs: list[Run]
    dataset: Dataset
    labels: dict[str, np.ndarray]
    truth: dict[str, np.ndarray] | None
    members: list[MemberPredictions]


def load_inputs(run_paths: Sequence[str], test_sample: str | None = None) -> Inputs:
    """Open the runs (made on one dataset), the dataset, its train+val labels, the demo's test labels
    where the root has them, and every member's predictions."""
    from .data import open_dataset
    from .demo import GROUND_TRUTH_NAME, load_ground_truth

    runs = [Run.open(p) for p in run_paths]
    roots = {str(run.data_root().resolve()) for run in runs}
    if len(roots) > 1:
        raise RunError(f"runs were made on different datasets: {sorted(roots)}")
    check_same_folds(runs)
    root = runs[0].data_root()
    dataset = open_dataset(root, test_list=runs[0].config.get("test_list"),
                           test_sample=test_sample or runs[0].config.get("test_sample"))
    if dataset.sample is None:
        raise RunError(f"{root}: no test sample file found; name it with --test-sample")
    labels = {v.name: v.labels.astype(np.float64) for v in dataset.split("train", "val")}
    truth = None
    if (root / GROUND_TRUTH_NAME).is_file():
        truth = {k: v.astype(np.float64) for k, v in load_ground_truth(root).items()}
    n_frames = {name: v.n_frames for name, v in dataset.videos.items()}
    return Inputs(runs, dataset, labels, truth, load_members(runs, n_frames))
