"""What every extractor shares: which videos and frames to write, NaN rows, resumable atomic output.

Frame numbers are 1-based, as in ``cropped_aligned/<video>/00001.jpg`` and the annotation files
(line i + 1 = frame i). A frame's number is always read from its file name, never from its position
in a directory listing: where a face is missing the release has no image, so a listing's positions
shift every later frame (the defect of published extraction scripts).

An output row i (0-based) holds frame i + 1. Frames with no input (no face image, nobody speaking,
a row missing from a CSV) are NaN rows, which the reader turns into zeros with a presence mask.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..console import console
from ..data import DataError, Problem, read_labelled_videos, read_test_videos
from ..io import atomic_path, atomic_write_json

FEATURES_DIR = "features"
SETTINGS_FILE = "extraction.json"  # what wrote a feature folder: a rerun must use the same
OUTPUT_DTYPES = {"float16": np.float16, "float32": np.float32}
_FRAME_FILE = re.compile(r"^(?P<frame>\d+)\.(?:jpg|jpeg|png)$", re.IGNORECASE)


class ExtractError(Exception):
    """Bad input to an extractor: the message names the file (and line)."""


@dataclass(frozen=True)
class Target:
    """One video to extract: its name, split and number of frames (rows to write)."""

    video: str
    split: str  # "train" | "val" | "test"
    n_frames: int


def extraction_targets(root: str | Path, test_list: str | Path | None = None,
                       test_sample: str | Path | None = None) -> list[Target]:
    """Every train, validation and test video of ``root`` with its frame count.

    Train/val: the annotation file's rows; test: the last frame the sample file lists. Features are
    not needed (they are what we are about to write); every other problem of the root is raised.
    """
    root = Path(root)
    labelled, label_files, problems = read_labelled_videos(root)
    test, sample, test_problems = read_test_videos(root, label_files, test_list, test_sample)
    problems += test_problems
    if sample is None:
        problems.append(Problem(root, "no test sample file found (name it with --test-sample): the test videos' "
                                      "frame counts come from it"))
    problems += [Problem(root, f"test video {v.name!r} has no frames in the sample file")
                 for v in test.values() if v.n_frames == 0 and sample is not None]
    if problems:
        raise DataError(problems)
    videos = sorted([*labelled.values(), *test.values()], key=lambda v: v.name)
    return [Target(v.name, v.split, v.n_frames) for v in videos]


def frame_number(path: str | Path) -> int | None:
    """The 1-based frame number in an image file name (``00012.jpg`` -> 12), or None if it has none."""
    match = _FRAME_FILE.match(Path(path).name)
    return int(match["frame"]) if match else None


def frame_images(folder: Path) -> dict[int, Path]:
    """Frame number -> image file of one video's face crops, by file name (never listing position)."""
    images: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        number = frame_number(path)
        if number is None or number < 1:
            continue
        if number in images:  # 00012.jpg and 12.jpg: which one is the face of frame 12 is anyone's guess
            raise ExtractError(f"{folder}: {images[number].name} and {path.name} are both frame {number}")
        images[number] = path
    return images


def rows_for_frames(n_frames: int, frames: np.ndarray, values: np.ndarray, dtype=np.float32) -> np.ndarray:
    """(n_frames, D): row ``f - 1`` = ``values[i]`` for frame ``f = frames[i]``; NaN where no frame has a value.

    Frames outside 1..n_frames are dropped (an image past the annotation's end has no label)."""
    values = np.asarray(values)
    out = np.full((n_frames, values.shape[1]), np.nan, dtype=dtype)
    frames = np.asarray(frames, dtype=np.int64)
    keep = (frames >= 1) & (frames <= n_frames)
    out[frames[keep] - 1] = values[keep]
    return out


@dataclass
class FeatureWriter:
    """``ROOT/features/<name>/<video>.npy``, written atomically; a finished video is skipped on a rerun."""

    root: Path
    name: str
    dtype: str = "float16"

    def __post_init__(self):
        if self.dtype not in OUTPUT_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(OUTPUT_DTYPES)}, got {self.dtype!r}")
        self.root = Path(self.root)

    @property
    def folder(self) -> Path:
        return self.root / FEATURES_DIR / self.name

    def path(self, video: str) -> Path:
        return self.folder / f"{video}.npy"

    def done(self, target: Target) -> bool:
        """Finished: the file exists (atomic writes never leave half a file) with one row per frame."""
        path = self.path(target.video)
        if not path.is_file():
            return False
        try:
            array = np.load(path, mmap_mode="r")
        except (ValueError, OSError):
            return False
        return array.shape[0] == target.n_frames and array.dtype == OUTPUT_DTYPES[self.dtype]

    def claim(self, settings: dict) -> None:
        """Record in ``extraction.json`` what writes this folder; refuse one written otherwise.

        Without it a rerun with another --mel/--mfcc, --layer, --pool or weights file would skip every
        finished video (right row count) and leave two kinds of features in one folder."""
        settings = json.loads(json.dumps({**settings, "dtype": self.dtype}))  # as it reads back
        record = self.folder / SETTINGS_FILE
        if record.is_file():
            before = json.loads(record.read_text())
            changed = {k: (before.get(k), settings.get(k)) for k in sorted(set(before) | set(settings))
                       if before.get(k) != settings.get(k)}
            if changed:
                diff = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in changed.items())
                raise ExtractError(f"{self.folder} holds features made otherwise ({diff}; {record}): "
                                   f"pick another --name, or remove the folder to extract again")
            return
        if self.folder.is_dir() and any(self.folder.glob("*.npy")):
            raise ExtractError(f"{self.folder} holds features without {SETTINGS_FILE} (another tool's, or "
                               f"made before abaw recorded it): pick another --name, or remove the folder")
        atomic_write_json(record, settings)

    def write(self, target: Target, features: np.ndarray) -> Path:
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[0] != target.n_frames:
            raise ValueError(f"{target.video}: features of shape {features.shape}, expected "
                             f"({target.n_frames}, D): one row per annotation frame")
        path = self.path(target.video)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:  # np.save on a path would append .npy to the temporary name
                np.save(handle, features.astype(OUTPUT_DTYPES[self.dtype]))
        return path


@dataclass
class ExtractionReport:
    """What a command did: videos written and skipped, frames, and inputs it could not use."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    frames: int = 0
    missing: int = 0  # frames written as NaN rows
    unreadable: list[str] = field(default_factory=list)  # inputs named and treated as missing (e.g. bad JPEGs)
    seconds: float = 0.0

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else float("nan")


def extraction_progress():
    """A rich progress bar counting frames, with frames/s."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not console.is_terminal)


def run_extraction(targets: Sequence[Target], writer: FeatureWriter,
                   extract_video: Callable[[Target], np.ndarray], what: str,
                   report: ExtractionReport | None = None, *, settings: dict) -> ExtractionReport:
    """Extract every unfinished target with ``extract_video`` and write it; a progress bar in frames/s.

    ``extract_video`` returns (n_frames, D) with NaN rows for frames without input. ``settings``
    (what decides the features: command, model, options) are claimed on the folder first
    (:meth:`FeatureWriter.claim`)."""
    writer.claim(settings)
    report = report or ExtractionReport()
    pending = [t for t in targets if not writer.done(t)]
    report.skipped += [t.video for t in targets if t not in pending]
    if report.skipped:
        console.print(f"{what}: {len(report.skipped)} video(s) already extracted in {writer.folder}, skipped")
    total = sum(t.n_frames for t in pending)
    start = time.perf_counter()
    with extraction_progress() as bar:
        task = bar.add_task(what, total=total, rate="")
        for target in pending:
            features = extract_video(target)
            writer.write(target, features)
            report.written.append(target.video)
            report.frames += target.n_frames
            report.missing += int(np.isnan(features).any(axis=1).sum())
            elapsed = time.perf_counter() - start
            bar.update(task, advance=target.n_frames, rate=f"{report.frames / max(elapsed, 1e-9):,.0f} frames/s")
            if not console.is_terminal:  # logs and CI: one plain line per video
                console.print(f"{what}: {target.video} ({target.n_frames} frames, "
                              f"{report.frames / max(elapsed, 1e-9):,.0f} frames/s)", markup=False)
    report.seconds = time.perf_counter() - start
    return report


def print_report(report: ExtractionReport, writer: FeatureWriter) -> None:
    console.print(f"{writer.folder}: {len(report.written)} video(s) written, {len(report.skipped)} skipped; "
                  f"{report.frames} frames at {report.frames_per_second:,.0f} frames/s, "
                  f"{report.missing} without input (NaN rows)", markup=False)
    if report.unreadable:
        console.print(f"{len(report.unreadable)} input(s) could not be read and count as missing:", markup=False)
        for item in report.unreadable[:20]:
            console.print(f"  {item}", markup=False)
        if len(report.unreadable) > 20:
            console.print(f"  ... and {len(report.unreadable) - 20} more", markup=False)


def check_modality(root: Path, name: str, test_list=None, test_sample=None) -> bool:
    """``run_cv.py --check``'s summary for the new modality alone; False (and every problem) if it fails."""
    from ..checks import check_dataset

    return check_dataset(root, modalities=[name], test_list=test_list, test_sample=test_sample) is not None


def torch_device(requested: str = "auto"):
    """CUDA when there is a GPU (or asked for), else the CPU; and the autocast to run the model under.

    bf16 autocast on CUDA; none on the CPU, where bf16 matmuls are slow on most machines."""
    import torch

    from ..devices import resolve_device

    device = resolve_device(requested)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    return device, autocast


def require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ExtractError(f"{path}: {what} not found")
    return path


def require_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ExtractError(f"{path}: {what} folder does not exist")
    return path


# ---------------------------------------------------------------------------------------------
# Time: shared by the extractors whose input is timed (sound, words) rather than one image per frame


def frame_times(n_frames: int, fps: float) -> np.ndarray:
    """Seconds from the video's start to the middle of each frame: frame i (1-based) is at (i - 0.5) / fps.

    Image i is on screen from (i - 1) / fps to i / fps, and its annotation describes that image; a
    feature centred on the middle of that interval covers it symmetrically, while one taken at its
    start would lean half a frame towards the previous image."""
    if not fps > 0:
        raise ValueError(f"frame rate must be positive, got {fps}")
    return (np.arange(n_frames, dtype=np.float64) + 0.5) / float(fps)


@dataclass(frozen=True)
class Span:
    """One chunk ``[start, stop)`` of a long sequence, and the part ``[keep_start, keep_stop)`` it answers for."""

    start: int
    stop: int
    keep_start: int
    keep_stop: int


def chunk_spans(n: int, size: int, overlap: int) -> list[Span]:
    """Cover ``range(n)`` with chunks of ``size`` (the last one ends at ``n``) overlapping by at least ``overlap``.

    Every position is kept from exactly one chunk, the one where it lies furthest from an edge: two
    neighbours split their overlap in its middle, so a kept position has at least ``overlap // 2`` of
    context on each side (except at the ends of the sequence). Every chunk has the same length, so
    chunks batch without padding; a sequence no longer than ``size`` is one chunk."""
    if size <= overlap or overlap < 0:
        raise ValueError(f"chunk size {size} must exceed the overlap {overlap} (>= 0)")
    if n <= size:
        return [Span(0, n, 0, n)]
    starts = list(range(0, n - size, size - overlap)) + [n - size]
    bounds = [0] + [(start + size + nxt) // 2 for start, nxt in zip(starts, starts[1:])] + [n]
    return [Span(start, start + size, bounds[k], bounds[k + 1]) for k, start in enumerate(starts)]
