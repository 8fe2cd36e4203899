"""ABAW submission files: merge a run's test predictions, write them in the official format, check them.

Format (ABAW5-8): header ``image_location,valence,arousal``, then one row per frame listed in the
official test sample file, in the sample's order, values in [-1, 1]. ``--per-video`` writes the
older format instead: one ``<video>.txt`` per test video, header ``valence,arousal``, line i + 1 =
frame i, for frames 1..n (n = the video's frame count, see README "Frame-count rule").

Missing-frame rule: every listed frame gets a value. A frame without a (finite) prediction, e.g.
beyond the end of the predictions or of the feature file, takes the prediction of the **nearest
predicted frame of the same video** (the earlier one on a tie). A frame without a face has a
prediction already: the models predict every frame (a frame without a face has zero-filled features,
with ``presence`` a presence channel of 0, and the model's temporal context). A test
video without any prediction is an error, never filled. The manifest counts the carried frames.

Output folder ``submissions/<name>/``: the prediction file(s), ``<name>.zip`` ready to upload,
``manifest.json`` and (when computed) ``report.csv``. The folder is built beside the target and
renamed into place, so it appears whole or not at all; an existing folder is never replaced
unless ``overwrite`` is given.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import shutil
import sys
import uuid
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import __version__
from .data import (IMAGE_LOCATION_PATTERN, SAMPLE_HEADER, DataError, Dataset, Problem, SampleFile, open_dataset,
                   parse_sample_file)
from .ensemble import (FOLD_MERGES, MERGERS, MeanMerge, honest_report, is_learned, learned_merge_of_folds,
                       make_merger, stack_members)
from .io import atomic_path, atomic_write_text, fsync_dir
from .metrics import score, valid_label_mask
from .runs import MemberPredictions, Run, RunError, find_latest_demo_run, load_members, stack_folds

SUBMISSION_FILE = "predictions.txt"
PER_VIDEO_DIR = "predictions"
HEADER_LINE = ",".join(SAMPLE_HEADER)
SPREAD_RESTORED = ("the learned merge of the fold merges, stretched about its mean by factor (valence, arousal) "
                   "to the spread the same merge has on single fold models, over all test frames; no labels used")


class SubmissionExists(Exception):
    """The output folder exists; we never replace a submission unless asked to."""


# ---------------------------------------------------------------------------------------------
# Merging the runs' test predictions


def resolve_merges(merge: str, fold_merge: str | None) -> tuple[str, str]:
    """(fold merge, member merge). A learned merge combines members' fold means; otherwise the
    chosen merge works across folds and the members are averaged."""
    if is_learned(merge):
        return fold_merge or "mean", merge
    return fold_merge or merge, "mean"


def merge_test_predictions(members: Sequence[MemberPredictions], merge: str, labels: Mapping[str, np.ndarray],
                           fold_merge: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Test predictions merged within each member across folds, then across members.

    A learned member merge is fitted on the members' OOF predictions (frames no model trained on)
    and applied by :func:`abaw.ensemble.learned_merge_of_folds`, which gives the merged fold
    predictions the spread of the single-model predictor it was fitted on (and the report scored).
    Returns the predictions per video and a description of the merge for the manifest.
    """
    fold_name, member_name = resolve_merges(merge, fold_merge)
    if is_learned(fold_name):
        raise ValueError(f"a learned merge ({fold_name}) cannot merge folds: OOF has one fold model per frame")
    stacks = [stack_folds(m.test, f"{m.label} test predictions") for m in members]
    description: dict = {"fold_merge": fold_name, "member_merge": member_name}
    if is_learned(member_name):
        merger = make_merger(member_name).fit(stack_members([m.oof for m in members]), labels)
        merged, factor = learned_merge_of_folds(merger, stacks, fold_name)
        description["learned"] = merger.describe()
        description["spread_restored"] = {"factor": factor.round(6).tolist(), "how": SPREAD_RESTORED}
    else:
        merged = MeanMerge().predict(stack_members([make_merger(fold_name).predict(s) for s in stacks]))
    missing = sorted(set().union(*stacks) - set(merged))
    if missing:
        raise RunError(f"test videos not predicted by every member: {missing[:5]}")
    return merged, description


# ---------------------------------------------------------------------------------------------
# Writing


def carry_nearest(predictions: np.ndarray, frames: np.ndarray) -> tuple[np.ndarray, int]:
    """Values at 1-based ``frames``; a frame without a finite prediction takes the nearest one.

    Returns the (n, 2) values and how many frames were carried.
    """
    predicted = np.flatnonzero(np.isfinite(predictions).all(axis=1))
    if predicted.size == 0:
        raise ValueError("no finite prediction to carry")
    index = np.asarray(frames) - 1
    position = np.searchsorted(predicted, index)
    after = predicted[np.minimum(position, len(predicted) - 1)]
    before = predicted[np.maximum(position - 1, 0)]
    nearest = np.where(np.abs(index - before) <= np.abs(after - index), before, after)
    return predictions[nearest], int((nearest != index).sum())


def sample_values(predictions: Mapping[str, np.ndarray], sample: SampleFile) -> tuple[np.ndarray, int]:
    """(N, 2) values for the sample's rows in its order, clipped to [-1, 1]; and the carried-frame count."""
    values = np.empty((len(sample.frames), 2))
    carried = 0
    missing = sorted(set(sample.videos.tolist()) - set(predictions))
    if missing:
        raise ValueError(f"no predictions for {len(missing)} test video(s) of {sample.path}: {missing[:5]}")
    names, inverse = np.unique(sample.videos, return_inverse=True)
    for index, video in enumerate(names.tolist()):
        rows = np.flatnonzero(inverse == index)
        try:
            values[rows], n = carry_nearest(np.asarray(predictions[video], np.float64), sample.frames[rows])
        except ValueError as exc:
            raise ValueError(f"test video {video!r}: {exc}") from exc
        carried += n
    return np.clip(values, -1.0, 1.0), carried


def _format_rows(locations: Sequence[str], values: np.ndarray) -> str:
    lines = [f"{loc},{v:.6f},{a:.6f}" for loc, (v, a) in zip(locations, values.tolist())]
    return "\n".join(lines) + "\n"


@dataclass
class Submission:
    folder: Path
    file: Path  # the single file, or the folder of per-video files
    zip: Path
    manifest: dict


def _refuse_existing(out_dir: Path) -> None:
    created = ""
    manifest = out_dir / "manifest.json"
    if manifest.is_file():
        try:
            created = f" (made {json.loads(manifest.read_text()).get('created')})"
        except (ValueError, OSError):
            pass
    raise SubmissionExists(f"{out_dir} already exists{created}; choose another --out, or pass --overwrite "
                           f"to replace it")


def check_target(out_dir: str | Path, overwrite: bool) -> None:
    """Fail before any work when the output folder exists and may not be replaced."""
    if Path(out_dir).exists() and not overwrite:
        _refuse_existing(Path(out_dir))


def _publish(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished staging folder into place; the old submission goes only once the new one is in."""
    if out_dir.exists():
        if not overwrite:
            _refuse_existing(out_dir)
        retired = out_dir.with_name(f".{out_dir.name}.replaced-{uuid.uuid4().hex[:8]}")
        out_dir.rename(retired)
        staging.rename(out_dir)
        fsync_dir(out_dir.parent)  # the new submission is on disk before the old one goes
        shutil.rmtree(retired)
    else:
        staging.rename(out_dir)
        fsync_dir(out_dir.parent)


def _write_per_video(folder: Path, predictions: Mapping[str, np.ndarray], n_frames: Mapping[str, int],
                     videos: Sequence[str]) -> int:
    """The older format: ``<video>.txt`` with one line per frame 1..n; returns the carried-frame count."""
    carried = 0
    for video in videos:
        frames = np.arange(1, n_frames[video] + 1)
        values, n = carry_nearest(np.asarray(predictions[video], np.float64), frames)
        carried += n
        lines = [f"{v:.6f},{a:.6f}" for v, a in np.clip(values, -1.0, 1.0).tolist()]
        atomic_write_text(folder / f"{video}.txt", "valence,arousal\n" + "\n".join(lines) + "\n")
    return carried


def write_submission(predictions: Mapping[str, np.ndarray], sample: SampleFile, out_dir: str | Path,
                     manifest: Mapping | None = None, *, per_video: bool = False,
                     n_frames: Mapping[str, int] | None = None, overwrite: bool = False,
                     report_rows: Sequence[dict] | None = None) -> Submission:
    """Write ``out_dir`` with the submission, its zip and manifest.json (and report.csv), atomically.

    ``predictions``: test video -> (T, 2). ``manifest``: extra provenance (runs, merge, ...).
    ``n_frames``: frames per video for ``per_video`` (default: the sample's last frame per video).
    Raises :class:`SubmissionExists` when ``out_dir`` exists and ``overwrite`` is False.
    """
    out_dir = Path(out_dir)
    check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.staging-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        zip_path = staging / f"{out_dir.name}.zip"
        if per_video:
            videos = list(dict.fromkeys(sample.videos.tolist()))
            frames = dict(n_frames or sample.frames_per_video())
            carried = _write_per_video(staging / PER_VIDEO_DIR, predictions, frames, videos)
            written = [staging / PER_VIDEO_DIR / f"{v}.txt" for v in videos]
            rows = sum(frames[v] for v in videos)
        else:
            values, carried = sample_values(predictions, sample)
            text = HEADER_LINE + "\n" + _format_rows(sample.image_locations, values)
            atomic_write_text(staging / SUBMISSION_FILE, text)
            written, rows = [staging / SUBMISSION_FILE], len(values)
        with atomic_path(zip_path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in written:
                archive.write(path, arcname=path.name)
        full_manifest = {
            **(manifest or {}),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "abaw_version": __version__,
            "format": "one txt per video" if per_video else "single file",
            "file": PER_VIDEO_DIR if per_video else SUBMISSION_FILE,
            "zip": zip_path.name,
            "sample": str(sample.path),
            "rows": int(rows),
            "frames_carried_from_nearest_prediction": int(carried),
            "sha256": hashlib.sha256(b"".join(p.read_bytes() for p in written)).hexdigest(),
        }
        atomic_write_text(staging / "manifest.json", json.dumps(full_manifest, indent=2) + "\n")
        if report_rows:
            atomic_write_text(staging / "report.csv", report_csv(report_rows))
        _publish(staging, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    file = out_dir / (PER_VIDEO_DIR if per_video else SUBMISSION_FILE)
    return Submission(out_dir, file, out_dir / zip_path.name, full_manifest)


# ---------------------------------------------------------------------------------------------
# Validating


def check_submission(path: str | Path, sample: SampleFile) -> list[Problem]:
    """Every problem of a single-file submission against the sample, each with its line number.

    Checks the header, that every row names a listed frame exactly once and in the sample's order,
    that no listed frame is missing, the row count, and that every value is finite and in [-1, 1].
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        return [Problem(path, f"cannot read: {exc}")]
    while lines and not lines[-1].strip():
        lines.pop()  # a trailing blank line is harmless
    if not lines:
        return [Problem(path, "empty file")]
    problems: list[Problem] = []
    if [c.strip() for c in lines[0].split(",")] != SAMPLE_HEADER:
        problems.append(Problem(path, f"header must be {HEADER_LINE!r}, got {lines[0]!r}", line=1))
    position = {location: i for i, location in enumerate(sample.image_locations)}
    seen: dict[str, int] = {}
    last_position, last_location = -1, None
    for lineno, line in enumerate(lines[1:], start=2):
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 3:
            problems.append(Problem(path, f"expected 3 cells, got {len(cells)}: {line!r}", line=lineno))
            continue
        location = cells[0]
        if location in seen:
            problems.append(Problem(path, f"duplicate frame {location!r} (first on line {seen[location]})",
                                    line=lineno))
        elif location not in position:
            problems.append(Problem(path, f"frame {location!r} is not in the sample file", line=lineno))
        else:
            seen[location] = lineno
            if position[location] < last_position:
                problems.append(Problem(path, f"out of order: {location!r} comes before {last_location!r} in the "
                                              f"sample (sample lines {position[location] + 2} and "
                                              f"{last_position + 2})", line=lineno))
            else:
                last_position, last_location = position[location], location
        problems += _value_problems(path, lineno, cells[1:])
    for index, location in enumerate(sample.image_locations):
        if location not in seen:  # reported on the line where the sample's order puts it
            problems.append(Problem(path, f"missing frame {location!r} (line {index + 2} of the sample)",
                                    line=index + 2))
    if len(lines) - 1 != len(sample.image_locations):
        problems.append(Problem(path, f"{len(lines) - 1} rows, the sample {sample.path} lists "
                                      f"{len(sample.image_locations)}"))
    return problems


def _value_problems(path: Path, lineno: int, cells: Sequence[str]) -> list[Problem]:
    problems = []
    for name, cell in zip(SAMPLE_HEADER[1:], cells):
        try:
            value = float(cell)
        except ValueError:
            problems.append(Problem(path, f"{name} {cell!r} is not a number", line=lineno))
            continue
        if not math.isfinite(value):
            problems.append(Problem(path, f"{name} is {cell}, not a finite number", line=lineno))
        elif not -1.0 <= value <= 1.0:
            problems.append(Problem(path, f"{name} {value} outside [-1, 1]", line=lineno))
    return problems


# ---------------------------------------------------------------------------------------------
# Scoring against known test labels (the demo dataset)


def read_submission(path: str | Path) -> dict[str, np.ndarray]:
    """A single-file submission as video -> (T, 2), NaN at frames it does not list."""
    import pandas as pd

    table = pd.read_csv(path, dtype={"image_location": str}, keep_default_na=False, na_values=[""])
    parts = table["image_location"].str.extract(IMAGE_LOCATION_PATTERN)
    table["video"], table["frame"] = parts["video"], parts["frame"].astype(int)
    out = {}
    for video, group in table.groupby("video", sort=False):
        array = np.full((int(group["frame"].max()), 2), np.nan)
        array[group["frame"].to_numpy() - 1] = group[["valence", "arousal"]].to_numpy(np.float64)
        out[video] = array
    return out


# ---------------------------------------------------------------------------------------------
# Report output


REPORT_COLUMNS = ["model", "ccc_v", "ccc_a", "mean", "frames", "scored_on"]


def report_csv(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, REPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else "" if v is None else v) for k, v in row.items()})
    return buffer.getvalue()


def print_report(rows: Sequence[dict], title: str) -> None:
    from .console import console, table

    shown = [{k: ("—" if v is None else v) for k, v in row.items()} for row in rows]
    console.print(table(shown, title=title))


# ---------------------------------------------------------------------------------------------
# Command line: make_submission.py


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_submission.py",
        description="Merge run predictions into an ABAW submission, report honest ensemble scores, "
                    "or check a submission file. With no arguments: the latest demo run, report and submission.")
    p.add_argument("--runs", nargs="+", help="run folders (default: the latest finished demo run under runs/)")
    p.add_argument("--merge", default="ccc_centering", choices=list(MERGERS), metavar="NAME",
                   help="mean | median | ccc_centering (across folds, then mean across architectures) | "
                        "calibrated_mean | weighted_calibrated (learned across architectures on OOF, "
                        "over fold means); default ccc_centering")
    p.add_argument("--fold-merge", choices=list(FOLD_MERGES), metavar="NAME",
                   help="merge across folds: mean | median | ccc_centering (default: --merge, or mean when "
                        "--merge is learned)")
    p.add_argument("--out", help="submission folder (default submissions/<run>_<merge>_<UTC time>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing submission folder")
    p.add_argument("--per-video", action="store_true", help="write the older format: one <video>.txt per video")
    p.add_argument("--test-sample", help="official test sample file (default: the run's, found at its data root)")
    p.add_argument("--report", action="store_true", help="print and save the honest ensemble report")
    p.add_argument("--report-csv", help="where --report saves its table (default <first run>/ensemble_report.csv)")
    p.add_argument("--check", metavar="FILE", help="validate a submission file against --sample and exit")
    p.add_argument("--sample", help="the sample file --check compares against")
    p.add_argument("--runs-dir", default="runs", help="where to look for the latest demo run (default runs/)")
    return p


def run_check(file: str, sample_path: str) -> int:
    from .console import console

    if not Path(sample_path).is_file():
        console.print(f"[bold red]error:[/] sample file {sample_path} not found", markup=True)
        return 1
    sample, problems = parse_sample_file(Path(sample_path))
    if problems:
        console.print(f"[bold red]the sample file has {len(problems)} problem(s):[/]")
        for problem in problems:
            console.print(f"  {problem}", markup=False)
        return 1
    problems = check_submission(file, sample)
    if problems:
        console.print(f"[bold red]{len(problems)} problem(s) in {file}:[/]")
        for problem in problems:
            console.print(f"  {problem}", markup=False)
        return 1
    console.print(f"{file}: OK ({len(sample.image_locations)} rows match {sample_path})")
    return 0


@dataclass
class Inputs:
    """What both the report and the writer need: runs, their dataset, and every member's predictions."""

    runs: list[Run]
    dataset: Dataset
    labels: dict[str, np.ndarray]
    truth: dict[str, np.ndarray] | None
    members: list[MemberPredictions]


def load_inputs(run_paths: Sequence[str], test_sample: str | None = None) -> Inputs:
    from .demo import GROUND_TRUTH_NAME, load_ground_truth

    runs = [Run.open(p) for p in run_paths]
    roots = {str(run.data_root().resolve()) for run in runs}
    if len(roots) > 1:
        raise RunError(f"runs were made on different datasets: {sorted(roots)}")
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


def submission_score_row(values: np.ndarray, sample: SampleFile, truth: Mapping[str, np.ndarray], merge: str) -> dict:
    """The written values (clipped, frames carried) scored row by row against the demo's test labels."""
    target = np.array([truth[v][f - 1] for v, f in zip(sample.videos.tolist(), sample.frames.tolist())])
    labelled = valid_label_mask(target)
    result = score(values, target, labelled)
    return {"model": f"submission ({merge})", "ccc_v": result["valence"], "ccc_a": result["arousal"],
            "mean": result["mean"], "frames": int(labelled.sum()),
            "scored_on": "test ground truth (demo): the submission file's values"}


def default_out(run_path: str | Path, merge: str) -> Path:
    """A fresh folder name per call, so the no-argument demo command never meets an existing one."""
    return Path("submissions") / f"{Path(run_path).name}_{merge}_{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def submit(inputs: Inputs, merge: str, fold_merge: str | None, out: Path, *, per_video: bool = False,
           overwrite: bool = False, report_rows: list[dict] | None = None) -> Submission:
    """Merge the members' test predictions and write the submission folder (with its provenance).

    On the demo dataset, the written values' score joins ``report_rows``.
    """
    predictions, merge_description = merge_test_predictions(inputs.members, merge, inputs.labels, fold_merge)
    sample = inputs.dataset.sample
    if report_rows is not None and inputs.truth is not None and not per_video:
        report_rows.append(submission_score_row(sample_values(predictions, sample)[0], sample, inputs.truth, merge))
    manifest = {
        "runs": [{"path": str(run.path), "config_hash": run.config_hash, "fold_mode": run.fold_mode}
                 for run in inputs.runs],
        "members": [{"run": str(m.run.path), "arch": m.arch, "folds": m.folds, "config_hash": m.run.config_hash}
                    for m in inputs.members],
        "merge": {"name": merge, **merge_description},
        "data_root": str(inputs.dataset.root),
    }
    n_frames = {v.name: v.n_frames for v in inputs.dataset.split("test")}
    return write_submission(predictions, sample, out, manifest, per_video=per_video, n_frames=n_frames,
                            overwrite=overwrite, report_rows=report_rows)


def _make(args: argparse.Namespace, report: bool, write: bool) -> int:
    from .console import console

    run_paths = args.runs or [str(find_latest_demo_run(args.runs_dir).path)]
    out = Path(args.out) if args.out else default_out(run_paths[0], args.merge)
    if write:
        check_target(out, args.overwrite)  # before minutes of reading and merging, not after
    inputs = load_inputs(run_paths, args.test_sample)
    rows = honest_report(inputs.members, inputs.labels, inputs.truth) if report else None
    submission = None
    if write:
        submission = submit(inputs, args.merge, args.fold_merge, out, per_video=args.per_video,
                            overwrite=args.overwrite, report_rows=rows)
    if rows is not None:
        print_report(rows, title=f"Honest ensemble report: {', '.join(run_paths)}")
        if submission:
            console.print(f"report: {submission.folder / 'report.csv'}")
        if args.report_csv or not submission:
            csv_path = Path(args.report_csv or Path(run_paths[0]) / "ensemble_report.csv")
            atomic_write_text(csv_path, report_csv(rows))
            console.print(f"report: {csv_path}")
    if submission:
        console.print(f"submission: {submission.file}")
        console.print(f"zip: {submission.zip}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from rich.markup import escape

    from .console import console

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.check:
        if not args.sample:
            parser().error("--check needs --sample SAMPLE (the official test sample file)")
        return run_check(args.check, args.sample)
    try:
        # No arguments: the demo walk-through, report and submission. --report alone: the report only.
        return _make(args, report=args.report or not argv, write=args.out is not None or not args.report)
    except (RunError, DataError, SubmissionExists, ValueError) as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}")
        return 1
