"""Writing an ABAW submission folder: the prediction file(s), the zip, manifest.json, report.csv.

Format (ABAW5-8): header ``image_location,valence,arousal``, then one row per frame listed in the
official test sample file, in the sample's order, values in [-1, 1]. ``per_video`` writes the
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

import hashlib
import json
import shutil
import uuid
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import __version__
from ..data import SAMPLE_HEADER, SampleFile
from ..honest import ReportRow, report_csv
from ..io import atomic_path, atomic_write_text, fsync_dir

SUBMISSION_FILE = "predictions.txt"
PER_VIDEO_DIR = "predictions"
HEADER_LINE = ",".join(SAMPLE_HEADER)


class SubmissionExists(Exception):
    """The output folder exists; we never replace a submission unless asked to."""


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


def _in_target(exc: OSError, staging: Path, out_dir: Path) -> OSError:
    """``exc`` with a file of the (removed) staging folder named by its place in ``out_dir``."""
    if exc.filename is None or not Path(exc.filename).is_relative_to(staging):
        return exc
    return OSError(exc.errno, exc.strerror, str(out_dir / Path(exc.filename).relative_to(staging)))


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
                     report_rows: Sequence[ReportRow] | None = None) -> Submission:
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
    except OSError as exc:  # a full disk: name the file as the user will look for it, not its staging copy
        shutil.rmtree(staging, ignore_errors=True)
        raise _in_target(exc, staging, out_dir) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    file = out_dir / (PER_VIDEO_DIR if per_video else SUBMISSION_FILE)
    return Submission(out_dir, file, out_dir / zip_path.name, full_manifest)
