"""The fold manager: join Train_Set and Validation_Set and split them into subject-grouped folds.

* Grouped by subject (:mod:`abaw.subjects`: ``_left``/``_right`` files and the numbered parts of
  one recording are one subject, or a user's subject file), so no person is in two folds.
* Balanced by labelled frames (the best of 200 seeded greedy passes), and deterministic for a
  given seed. (The published code
  took folds from unsorted directory listings: neither reproducible nor subject-aware.)
* Modes: ``grouped`` (all train+val videos in K folds); ``val_fold`` (the original validation set
  is fold 0 and train is split into K-1 folds, as the leader-follower and CtyunAI systems did);
  ``holdout_val`` (validation videos get fold -1 and are never trained on, so fold models and
  merges can be scored on unseen data).

Fold tables are saved under ``folds/`` with a fingerprint in the name and reused by every later
run, so every architecture sees the same folds. The fingerprint covers the labelled videos and the
subject of each, so another subject rule (or subject file) gives another table; a table whose
subjects differ from the dataset's grouping is refused, never used.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from .data import Dataset
from .io import atomic_write_text

MODES = ("grouped", "val_fold", "holdout_val")
HOLDOUT = -1


class FoldError(ValueError):
    pass


FOLD_COLUMNS = ["video", "subject", "split", "fold"]


def fingerprint(dataset: Dataset) -> str:
    """Hash of the labelled videos (name, split, frames, labelled frames) and of their subjects.

    It changes when the data does, and when the subject rule groups the videos otherwise."""
    parts = [f"{v.name}:{v.split}:{v.n_frames}:{int(v.label_mask.sum())}:{v.subject}"
             for v in sorted(dataset.split("train", "val"), key=lambda v: v.name)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:10]


def read_fold_table(path: str | Path) -> pd.DataFrame:
    """A saved fold table; names stay strings (``105`` is a video, not a number)."""
    table = pd.read_csv(path, dtype={"video": str, "subject": str, "split": str})
    if any(c not in table.columns for c in ("video", "subject", "fold")):
        raise FoldError(f"{path}:1: expected columns {','.join(FOLD_COLUMNS)}, got {','.join(table.columns)}")
    return table


def _balanced_groups(frames_per_subject: dict[str, int], k: int, seed: int, tries: int = 200) -> dict[str, int]:
    """Assign subjects to k folds with about equal labelled frames, as a function of the seed.

    Each try walks the subjects in a seeded random order, putting each into the fold with the fewest
    labelled frames so far; the best-balanced try wins. Different seeds give different folds.
    """
    if len(frames_per_subject) < k:
        raise FoldError(f"cannot make {k} folds from {len(frames_per_subject)} subjects")
    subjects = sorted(frames_per_subject)
    sizes = np.array([frames_per_subject[s] for s in subjects], np.int64)
    rng = np.random.default_rng(seed)
    best, best_spread = None, None
    for _ in range(tries):
        totals = np.zeros(k, np.int64)
        folds = np.empty(len(subjects), np.int64)
        for i in rng.permutation(len(subjects)):
            folds[i] = int(np.argmin(totals))
            totals[folds[i]] += sizes[i]
        spread = totals.max() - totals.min()
        if best_spread is None or spread < best_spread:
            best, best_spread = folds, spread
    return dict(zip(subjects, best.tolist()))


def _frames_by_subject(videos) -> dict[str, int]:
    frames: dict[str, int] = {}
    for v in videos:
        frames[v.subject] = frames.get(v.subject, 0) + int(v.label_mask.sum())
    return frames


def make_folds(dataset: Dataset, k: int = 5, mode: str = "grouped", seed: int = 0) -> pd.DataFrame:
    """A table (video, subject, split, fold) for every train and validation video."""
    if mode not in MODES:
        raise FoldError(f"unknown fold mode {mode!r}; choose one of {MODES}")
    train, val = dataset.split("train"), dataset.split("val")
    shared = {v.subject for v in train} & {v.subject for v in val}
    if mode != "grouped" and shared:
        raise FoldError(f"fold mode {mode!r} keeps the validation set apart, but subject(s) "
                        f"{sorted(shared)[:5]} appear in both Train_Set and Validation_Set")
    if mode == "grouped":
        folds = _balanced_groups(_frames_by_subject(train + val), k, seed)
    elif mode == "val_fold":
        folds = {s: f + 1 for s, f in _balanced_groups(_frames_by_subject(train), k - 1, seed).items()}
        folds.update({v.subject: 0 for v in val})
    else:
        folds = _balanced_groups(_frames_by_subject(train), k, seed)
        folds.update({v.subject: HOLDOUT for v in val})
    rows = [{"video": v.name, "subject": v.subject, "split": v.split, "fold": folds[v.subject]}
            for v in sorted(train + val, key=lambda v: v.name)]
    return pd.DataFrame(rows, columns=FOLD_COLUMNS)


def fold_table_changes(saved: pd.DataFrame, current: pd.DataFrame, limit: int = 3) -> list[str]:
    """How ``current`` differs from ``saved``, one line per video (at most ``limit``, then a count)."""
    columns = [c for c in FOLD_COLUMNS[1:] if c in saved.columns and c in current.columns]
    old = saved.set_index("video")[columns].astype(str).to_dict("index")
    new = current.set_index("video")[columns].astype(str).to_dict("index")
    changes = [f"{v!r} only in the saved table" for v in sorted(set(old) - set(new))]
    changes += [f"{v!r} not in the saved table" for v in sorted(set(new) - set(old))]
    for video in sorted(set(old) & set(new)):
        diff = [f"{k} {old[video][k]} -> {new[video][k]}" for k in old[video] if old[video][k] != new[video][k]]
        if diff:
            changes.append(f"{video!r}: {', '.join(diff)}")
    return changes[:limit] + ([f"... {len(changes) - limit} more"] if len(changes) > limit else [])


def folds_path(dataset: Dataset, k: int, mode: str, seed: int, folder: str | Path = "folds") -> Path:
    return Path(folder) / f"folds_{mode}_k{k}_seed{seed}_{fingerprint(dataset)}.csv"


def check_folds(table: pd.DataFrame, dataset: Dataset, source: Path | str) -> None:
    """Refuse a fold table that does not describe this dataset's train+val videos."""
    expected = {v.name: v.subject for v in dataset.split("train", "val")}
    listed = dict(zip(table["video"], table["subject"]))
    missing, extra = sorted(set(expected) - set(listed)), sorted(set(listed) - set(expected))
    if missing or extra:
        raise FoldError(f"{source} does not match the dataset at {dataset.root}: "
                        f"{len(missing)} video(s) missing (e.g. {missing[:3]}), "
                        f"{len(extra)} unknown (e.g. {extra[:3]}). Delete it or pass the right data root.")
    moved = [v for v in expected if listed[v] != expected[v]]
    if moved:
        raise FoldError(f"{source} was made under another subject grouping: {len(moved)} video(s) have another "
                        f"subject under {dataset.subject_rule} (e.g. {moved[0]!r}: {listed[moved[0]]!r} in the "
                        f"table, {expected[moved[0]]!r} now). Its folds could put one person in two folds. "
                        f"Delete it to make a new table, or pass the --subjects file it was made with.")
    split_subjects = table.groupby("subject")["fold"].nunique()
    if (split_subjects > 1).any():
        raise FoldError(f"{source}: subject(s) {list(split_subjects[split_subjects > 1].index[:3])} "
                        f"are split across folds")


def load_or_make_folds(dataset: Dataset, k: int = 5, mode: str = "grouped", seed: int = 0,
                       folder: str | Path = "folds") -> tuple[pd.DataFrame, Path]:
    """Reuse the saved fold table for this dataset and settings, or make and save it."""
    path = folds_path(dataset, k, mode, seed, folder)
    if path.exists():
        table = read_fold_table(path)
        check_folds(table, dataset, path)
        return table, path
    table = make_folds(dataset, k, mode, seed)
    atomic_write_text(path, table.to_csv(index=False))
    return table, path
