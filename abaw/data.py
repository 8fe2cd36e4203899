"""The Aff-Wild2 data layer: find, validate and read a dataset root laid out as the official release.

Layout (see README "Data layout")::

    ROOT/VA_Estimation_Challenge/Train_Set/<video>.txt       header "valence,arousal", one line per frame
    ROOT/VA_Estimation_Challenge/Validation_Set/<video>.txt
    ROOT/*test_set_release*.txt                             test video names, one per line
    ROOT/*test_set_sample*.txt | *test_set_example*.txt     "image_location,valence,arousal" rows to predict
    ROOT/features/<modality>/<video>.npy                    (frames, dim) float, a NaN row = no face/feature

Frame-count rule: a video has as many frames as its annotation file has rows; a test video as many
as its last frame in the sample file (or, for a test video the sample does not list, its longest
feature file). A feature file must have one row per frame. A file within ``FRAME_TOLERANCE`` rows
of the frame count is aligned to it (surplus rows trimmed, the last row carried over missing ones)
and reported as an :class:`Alignment`. A larger mismatch is a problem: it means the features were
written at another rate, or the frames without a face were dropped instead of written as NaN rows,
and either way every later frame would be paired with the wrong label.

Features are memory-mapped and only the requested window is read, so a dataset never sits in RAM whole.

Feature values: a NaN row means no face; ±inf and magnitudes beyond ``FEATURE_LIMIT`` are corrupt.
Scanning every value of the release (~12 GB) at every run would cost seconds to minutes, so
:meth:`VideoRecord.features` checks each window it reads (every value a model sees passes there)
and ``load_dataset(scan_values=True)`` (``run_cv.py --check``) scans every file once, in blocks.
"""
from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from .io import TextDecodeError, text_lines
from .metrics import INVALID_LABEL, valid_label_mask  # noqa: F401 - re-exported: the data layer's fact too
from .subjects import SubjectRule, read_subject_file

LABEL_DIR = "VA_Estimation_Challenge"
SPLIT_DIRS = {"train": "Train_Set", "val": "Validation_Set"}
LABEL_HEADER = ["valence", "arousal"]
SAMPLE_HEADER = ["image_location", "valence", "arousal"]
TEST_LIST_PATTERNS = ("*test_set_release*.txt", "*VA*test*list*.txt")
TEST_SAMPLE_PATTERNS = ("*test_set_sample*.txt", "*test_set_example*.txt", "*VA*test*sample*.txt")
FEATURE_DTYPES = (np.float16, np.float32, np.float64)
CROPS_DIR = "cropped_aligned"  # the release's face crops: cropped_aligned/<video>/00001.jpg, none without a face
# Rows a feature file may differ from the frame count by and still be aligned. Decoders disagree
# by a frame or two at a video's end; dropped no-face rows (a median face share of 0.99 means ~1%
# of the rows) or another frame rate give far larger gaps, so a percentage would let them through.
FRAME_TOLERANCE = 5
# A feature value beyond this magnitude is corruption, not a feature: CLIP/MAE embeddings stay within
# tens, log-mel energies within about ±120 dB, OpenFace AU intensities within 0-5 and landmarks within
# a few thousand pixels. 1e6 leaves orders of magnitude of headroom and still catches uninitialised
# memory (1e30-like garbage) and overflow (±inf), which would wreck normalisation and the loss.
FEATURE_LIMIT = 1e6
SCAN_BLOCK_BYTES = 64 << 20  # the value scan's read size: little RAM, ~1.7 GiB/s from the page cache
NPY_MAGIC = b"\x93NUMPY"

# The image location of a frame, "video/00001.jpg" (1-based): one home for the pattern.
IMAGE_LOCATION_PATTERN = r"^(?P<video>[^/\\]+)/(?P<frame>\d+)\.jpg$"
_IMAGE_RE = re.compile(IMAGE_LOCATION_PATTERN)


def image_location(video: str, frame: int) -> str:
    """``video/00001.jpg`` for 1-based ``frame``, as the release's crops and the sample file name it."""
    return f"{video}/{frame:05d}.jpg"


class DataError(Exception):
    """Raised when a dataset root fails validation; ``problems`` holds every problem found."""

    def __init__(self, problems: list["Problem"]):
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} problem(s) in the dataset:\n{lines}{more}")

    def __reduce__(self):  # rebuilt from its problems, not its message, when sent across processes
        return DataError, (self.problems,)


@dataclass(frozen=True)
class Problem:
    """One defect in the input, located by file and line (1-based) or feature row."""

    path: Path
    message: str
    line: int | None = None
    row: int | None = None

    def __str__(self) -> str:
        where = f":{self.line}" if self.line is not None else ""
        where += f" (row {self.row})" if self.row is not None else ""
        return f"{self.path}{where}: {self.message}"


def read_lines(path: Path) -> tuple[list[str], list[Problem]]:
    """A text file's lines (see :func:`abaw.io.text_lines`), or none and the problem why it cannot be read."""
    try:
        return text_lines(path), []
    except TextDecodeError as exc:
        return [], [Problem(path, exc.reason, line=exc.line)]
    except OSError as exc:  # a folder named *.txt, no permission: a problem of the input, not a crash
        return [], [Problem(path, f"cannot read: {exc.strerror or exc}")]


def parse_label_file(path: Path) -> tuple[np.ndarray, list[Problem]]:
    """Parse one annotation file into (T, 2) float32 labels, collecting every problem with its line."""
    lines, problems = read_lines(path)
    if problems:
        return np.zeros((0, 2), np.float32), problems
    if not lines:
        return np.zeros((0, 2), np.float32), [Problem(path, "empty file (no header, no frames)")]
    header = [c.strip().lower() for c in lines[0].split(",")]
    if header != LABEL_HEADER:
        problems.append(Problem(path, f"header must be 'valence,arousal', got {lines[0]!r}", line=1))
    if len(lines) == 1:
        problems.append(Problem(path, "no frames after the header", line=1))
    labels = np.full((len(lines) - 1, 2), INVALID_LABEL, np.float32)
    for i, line in enumerate(lines[1:]):
        lineno = i + 2
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 2:
            problems.append(Problem(path, f"expected 2 cells, got {len(cells)}: {line!r}", line=lineno))
            continue
        for j, cell in enumerate(cells):
            try:
                value = float(cell)
            except ValueError:
                problems.append(Problem(path, f"non-numeric {LABEL_HEADER[j]} {cell!r}", line=lineno))
                continue
            if not math.isfinite(value):  # float() accepts nan/inf/Infinity; they are no label (-5 is)
                problems.append(Problem(path, f"{LABEL_HEADER[j]} is {cell!r}, not a finite number "
                                              f"(-5 marks a frame without a label)", line=lineno))
                continue
            if value != INVALID_LABEL and not -1.0 <= value <= 1.0:
                problems.append(
                    Problem(path, f"{LABEL_HEADER[j]} {value} outside [-1, 1] and not -5", line=lineno)
                )
                continue
            labels[i, j] = value
    return labels, problems


def parse_test_list(path: Path) -> tuple[list[str], list[Problem]]:
    lines, problems = read_lines(path)
    if problems:
        return [], problems
    names, seen = [], set()
    for lineno, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            problems.append(Problem(path, "blank line inside the test video list", line=lineno))
        elif name in seen:
            problems.append(Problem(path, f"video {name!r} listed twice", line=lineno))
        else:
            seen.add(name)
            names.append(name)
    if not names and not problems:
        problems.append(Problem(path, "empty test video list"))
    return names, problems


@dataclass
class SampleFile:
    """The official test sample: every (video, frame) to predict, in submission order."""

    path: Path
    image_locations: list[str]
    videos: np.ndarray  # (N,) str
    frames: np.ndarray  # (N,) int, 1-based frame numbers as in `%05d.jpg`
    lines: np.ndarray | None = None  # (N,) the line of each row in the file

    def frames_per_video(self) -> dict[str, int]:
        """Last listed frame number of each video."""
        last: dict[str, int] = {}
        for video, frame in zip(self.videos.tolist(), self.frames.tolist()):
            last[video] = max(frame, last.get(video, 0))
        return last


def parse_sample_file(path: Path) -> tuple[SampleFile, list[Problem]]:
    lines, problems = read_lines(path)
    if not lines:
        return SampleFile(path, [], np.array([], str), np.array([], int)), problems or [Problem(path, "empty file")]
    header = [c.strip().lower() for c in lines[0].split(",")]
    if header[:1] != ["image_location"]:
        problems.append(Problem(path, f"header must start with 'image_location', got {lines[0]!r}", line=1))
    locations, videos, frames, lines_of = [], [], [], []
    first: dict[tuple[str, int], int] = {}  # (video, frame) -> its line
    previous: dict[str, tuple[int, int]] = {}  # video -> (its previous row's frame, that row's line)
    for lineno, line in enumerate(lines[1:], start=2):
        location = line.split(",")[0].strip()
        match = _IMAGE_RE.match(location)
        if not match:
            problems.append(Problem(path, f"expected 'video/00001.jpg', got {location!r}", line=lineno))
            continue
        if int(match["frame"]) < 1:
            problems.append(Problem(path, f"frame numbers start at 1 (00001.jpg), got {location!r}", line=lineno))
            continue
        order = _frame_order_problem(match["video"], int(match["frame"]), lineno, first, previous)
        if order:
            problems.append(Problem(path, f"{location!r}: {order}", line=lineno))
            continue
        locations.append(location)
        lines_of.append(lineno)
        videos.append(match["video"])
        frames.append(int(match["frame"]))
    sample = SampleFile(path, locations, np.array(videos, dtype=str), np.array(frames, dtype=np.int64),
                        np.array(lines_of, dtype=np.int64))
    return sample, problems


def _frame_order_problem(video: str, frame: int, line: int, first: dict[tuple[str, int], int],
                         previous: dict[str, tuple[int, int]]) -> str | None:
    """Why this row cannot follow the video's rows so far, or None; records the row. Frames must increase
    within a video: a repeat would be predicted twice, and a step back means a shuffled or merged file.
    Each row is compared with the row before it, so one misplaced row is one problem, not a cascade."""
    if (video, frame) in first:
        return f"duplicate frame: frame {frame} of video {video!r} again (first on line {first[video, frame]})"
    first[video, frame] = line
    last, last_line = previous.get(video, (0, 0))
    previous[video] = (frame, line)
    if frame < last:
        return (f"frame {frame} of video {video!r} goes backwards after frame {last} (line {last_line}); "
                f"frame numbers must increase within a video")
    return None


def find_one(root: Path, patterns: tuple[str, ...], what: str, explicit: str | Path | None) -> Path | None:
    """Find a file at the dataset root by pattern (names change per edition), unless named explicitly."""
    if explicit is not None:
        path = Path(explicit)
        return path if path.is_absolute() or path.exists() else root / path
    hits = sorted({p for pat in patterns for p in root.glob(pat) if p.is_file()})
    if len(hits) > 1:
        raise DataError([Problem(root, f"several {what} files match ({', '.join(h.name for h in hits)}); "
                                       f"name one explicitly")])
    return hits[0] if hits else None


@dataclass
class VideoRecord:
    """One video: labels and memory-mapped per-modality features, aligned to ``n_frames``.

    ``labels`` is (T, 2) float32 (None for test videos); ``label_mask`` (T,) is False where
    either value is -5. Features are read lazily per window with :meth:`features`.
    """

    name: str
    subject: str
    split: str  # "train" | "val" | "test"
    n_frames: int
    labels: np.ndarray | None
    feature_paths: dict[str, Path] = field(default_factory=dict)
    # Read once, used by every window: each .npy header (np.load re-parsed it on every window, 0.2 ms
    # of a 0.5 ms window read), kept with the file's size and mtime, and the label mask, kept with
    # the labels array it was computed from.
    _layouts: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _mask: tuple = field(default=(None, None), init=False, repr=False, compare=False)

    @property
    def label_mask(self) -> np.ndarray:
        if self.labels is None:
            return np.zeros(self.n_frames, bool)
        labels, mask = self._mask
        if labels is not self.labels:
            mask = valid_label_mask(self.labels)
            mask.flags.writeable = False  # shared by every caller
            self._mask = (self.labels, mask)
        return mask

    def _memmap(self, modality: str) -> np.ndarray:
        return np.load(self.feature_paths[modality], mmap_mode="r")

    def _layout(self, modality: str) -> NpyLayout | None:
        """The file's layout, read again whenever its size or modification time changes."""
        path = self.feature_paths[modality]
        stat = os.stat(path)
        signature = (stat.st_size, stat.st_mtime_ns)
        cached = self._layouts.get(modality)
        if cached is None or cached[0] != signature:
            cached = self._layouts[modality] = (signature, npy_layout(path))
        return cached[1]

    def _rows(self, modality: str, rows: np.ndarray, layout: NpyLayout | None) -> np.ndarray:
        """File rows ``rows`` (non-decreasing, within the file) of one modality, as stored (dtype and all).

        Rows close together (a window, with repeats of the last row past the file's end) cost one
        read of their span at the offset the header gives; every-k-th-row reads, and files only
        np.load can read (Fortran order, format 3.0), go through a memory map."""
        if layout is None or len(rows) == 0:
            return self._memmap(modality)[rows]
        first, last = int(rows[0]), int(rows[-1])
        span = last + 1 - first
        if span > 2 * len(rows):  # sparse rows: reading the span would read mostly rows nobody asked for
            return self._memmap(modality)[rows]
        block = np.empty((span, layout.dim), layout.dtype)
        path, view, got = self.feature_paths[modality], memoryview(block).cast("B"), 0
        with open(path, "rb", buffering=0) as file:
            file.seek(layout.offset + first * block.strides[0])
            while got < view.nbytes:  # one read returns at most ~2 GiB on Linux
                n = file.readinto(view[got:])
                if not n:
                    raise DataError([Problem(path, f"file ends inside row {first + got // block.strides[0]}: it is "
                                                   f"shorter than its header's {layout.rows} rows (truncated or being "
                                                   f"rewritten?)")])
                got += n
        consecutive = span == len(rows) and bool(np.all(np.diff(rows) == 1))
        return block if consecutive else block[rows - first]

    def features(self, modality: str, start: int = 0, stop: int | None = None,
                 step: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Frames [start, stop) (every ``step``-th) of one modality as float32 (L, D), and the presence mask (L,).

        Rows past the file's end carry its last row (the alignment rule, within ``FRAME_TOLERANCE``);
        NaN rows (no face / no feature) come back zero-filled with presence False.
        """
        stop = self.n_frames if stop is None else stop
        layout = self._layout(modality)
        n_rows = layout.rows if layout is not None else len(self._memmap(modality))
        rows = np.clip(np.arange(start, stop, step), 0, n_rows - 1)
        raw = self._rows(modality, rows, layout)
        with np.errstate(over="ignore"):  # a float64 beyond float32 is checked (and named) on ``raw``
            window = np.asarray(raw, dtype=np.float32)
        values = checkable(raw, window)
        if not within_limit(values):  # every value a model sees passes here: none is ever inf or 1e30
            raise DataError([bad_value_problem(self.feature_paths[modality], values, rows)])
        present = ~np.isnan(window).any(axis=1)
        window[~present] = 0.0
        return window, present


@dataclass(frozen=True)
class NpyLayout:
    """Where the rows of a 2-D C-order .npy file lie: ``rows`` x ``dim`` values of ``dtype`` from ``offset``."""

    offset: int
    dtype: np.dtype
    rows: int
    dim: int


def npy_layout(path: Path) -> NpyLayout | None:
    """The layout from an .npy file's header; None for what np.load alone should read (not 2-D, Fortran
    order, or a header version other than 1.0/2.0)."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with open(path, "rb") as file:
        reader = readers.get(np.lib.format.read_magic(file))
        if reader is None:
            return None
        shape, fortran_order, dtype = reader(file)
        offset = file.tell()
    if fortran_order or len(shape) != 2 or dtype.hasobject:
        return None
    return NpyLayout(offset, dtype, shape[0], shape[1])


def checkable(raw: np.ndarray, as_float32: np.ndarray | None = None) -> np.ndarray:
    """The values to check: float64 as stored (1e39 would turn into inf in float32 and be misnamed);
    anything else as float32, since float16 reductions are slow and 1e6 overflows float16 to inf."""
    if raw.dtype == np.float64:
        return raw
    return as_float32 if as_float32 is not None else np.asarray(raw, dtype=np.float32)


def within_limit(values: np.ndarray) -> bool:
    """True if no value of ``values`` (float32 or float64) is ±inf or beyond ``FEATURE_LIMIT``; NaN
    (no face) is legal. Two reductions and no temporary array: fmax/fmin skip NaN, max/min would not."""
    if values.size == 0:
        return True
    high, low = float(np.fmax.reduce(values, axis=None)), float(np.fmin.reduce(values, axis=None))
    return bool(np.isnan(high) or (high <= FEATURE_LIMIT and low >= -FEATURE_LIMIT))


def bad_value_problem(path: Path, values: np.ndarray, rows: np.ndarray) -> Problem:
    """The problem of the first bad value of (L, D) ``values`` (file rows ``rows``), and how many rows are bad.
    Only called on a failed :func:`within_limit`, so the temporary arrays cost nothing in a clean run."""
    with np.errstate(invalid="ignore"):
        bad = np.abs(values) > FEATURE_LIMIT
    index, column = np.argwhere(bad)[0]
    value = values[index, column]
    kind = "infinite" if np.isinf(value) else f"absurd (|x| > {FEATURE_LIMIT:g})"
    more = bad.any(axis=1).sum() - 1
    more = f"; {more} more bad row(s) among rows {rows[0]}-{rows[-1]}" if more else ""
    return Problem(path, f"{kind} feature value {value:g} in column {column}{more} (a frame without a face "
                         f"is a NaN row; ±inf and |x| > {FEATURE_LIMIT:g} are corrupt values)", row=int(rows[index]))


def scan_feature_values(path: Path) -> list[Problem]:
    """Every value of a feature file checked in blocks of ``SCAN_BLOCK_BYTES``: the first bad block's problem."""
    array = np.load(path, mmap_mode="r")
    step = max(1, SCAN_BLOCK_BYTES // max(1, array.shape[1] * array.itemsize))
    for start in range(0, len(array), step):
        block = checkable(np.asarray(array[start:start + step]))
        if not within_limit(block):
            return [bad_value_problem(path, block, np.arange(start, start + len(block)))]
    return []


@dataclass(frozen=True)
class Alignment:
    """A feature file within ``FRAME_TOLERANCE`` rows of its video's frame count, aligned to it."""

    video: str
    modality: str
    path: Path
    rows: int
    frames: int

    def __str__(self) -> str:
        how = f"{self.rows - self.frames} surplus row(s) trimmed" if self.rows > self.frames else \
            f"last row carried over {self.frames - self.rows} missing row(s)"
        return f"{self.path}: {self.rows} rows for {self.frames} frames; {how}"


@dataclass
class Dataset:
    """Index of a validated dataset root (metadata only; features stay on disk)."""

    root: Path
    videos: dict[str, VideoRecord]
    modalities: dict[str, int]  # name -> feature dim
    sample: SampleFile | None
    alignments: list[Alignment] = field(default_factory=list)  # feature files aligned within the tolerance
    subject_rule: str = ""  # how videos were grouped into subjects (see abaw.subjects)

    def split(self, *splits: str) -> list[VideoRecord]:
        return [v for v in self.videos.values() if v.split in splits]

    @cached_property
    def subjects(self) -> set[str]:
        return {v.subject for v in self.videos.values()}

    def subject_videos(self, min_videos: int = 2) -> dict[str, list[str]]:
        """Subjects made of at least ``min_videos`` videos -> their videos, sorted."""
        groups: dict[str, list[str]] = defaultdict(list)
        for video in self.videos.values():
            groups[video.subject].append(video.name)
        return {s: sorted(vs) for s, vs in sorted(groups.items()) if len(vs) >= min_videos}

    def summary(self) -> list[dict]:
        """One row per split: videos, frames, labelled frames, subjects."""
        rows = []
        for split in ("train", "val", "test"):
            vids = self.split(split)
            rows.append({
                "split": split,
                "videos": len(vids),
                "frames": sum(v.n_frames for v in vids),
                "labelled": int(sum(v.label_mask.sum() for v in vids)),
                "subjects": len({v.subject for v in vids}),
            })
        return rows


# ---------------------------------------------------------------------------------------------
# Feature files whose row count does not match the frames

_COMMON_RATES = (15, 24, 25, 30, 50, 60, 100)  # video frame rates, and audio feature hops (100 Hz = 10 ms)
_FPS_IN_NAME = re.compile(r"^\d+-(?P<fps>\d+)-\d+x\d+")  # "10-60-1280x720": id-fps-resolution


def fps_from_name(video: str) -> int | None:
    """The frame rate in a release name like ``10-60-1280x720`` (29.97 fps is written 29), if any."""
    match = _FPS_IN_NAME.match(video)
    return int(match["fps"]) if match else None


def _rate_guess(rows: int, frames: int, fps: int | None) -> str | None:
    """'100/s for a 30 fps video' when rows/frames is close to a ratio of common rates."""
    ratio = rows / frames
    video_rates = [30 if fps == 29 else fps] if fps else list(_COMMON_RATES[:6])
    best = None
    for video_rate in video_rates:
        for rate in _COMMON_RATES:
            error = abs(ratio * video_rate / rate - 1)
            if rate != video_rate and error < 0.02 and (best is None or error < best[0]):
                best = (error, rate, video_rate)
    return None if best is None else f"{best[1]} rows/s for a {best[2]} fps video"


def explain_mismatch(video: str, rows: int, frames: int, crops: Path | None = None) -> str:
    """The problem message of a feature file of ``rows`` rows for ``frames`` frames: counts, ratio, likely cause."""
    counts = f"{rows} feature rows for {frames} frames (ratio {rows / frames:.3f}; at most " \
             f"{FRAME_TOLERANCE} rows of difference are aligned)"
    rate = _rate_guess(rows, frames, fps_from_name(video))
    images = len(list(crops.glob("*.jpg"))) if crops is not None and crops.is_dir() else None
    if rows < frames and images == rows:
        cause = (f"{crops} holds {images} face images, as many as the file has rows: the frames without a "
                 f"face were dropped; write one row per frame, NaN where there is no face")
    elif rows < frames:
        cause = ("frames without a face dropped instead of written as NaN rows (one row per frame is needed)"
                 + (f", or features written at another rate (this ratio fits {rate})" if rate else
                    ", or features written at another rate"))
    else:
        cause = (f"features written at another rate (this ratio fits {rate})" if rate else
                 "features written at another rate, or for another video") + "; resample to one row per frame"
    return f"{counts}; likely cause: {cause}"


# ---------------------------------------------------------------------------------------------
# Loading a root, step by step


def read_labelled_videos(root: Path) -> tuple[dict[str, VideoRecord], dict[str, Path], list[Problem]]:
    """Train and validation videos from their annotation files; also each video's annotation file.

    Subjects are assigned later (:func:`assign_subjects`)."""
    videos: dict[str, VideoRecord] = {}
    label_files: dict[str, Path] = {}
    problems: list[Problem] = []
    for split, folder in SPLIT_DIRS.items():
        split_dir = root / LABEL_DIR / folder
        if not split_dir.is_dir():
            problems.append(Problem(split_dir, "missing annotation folder"))
            continue
        for path in sorted(split_dir.glob("*.txt")):
            name = path.stem
            if name in label_files:
                problems.append(Problem(path, f"video {name!r} is also in {label_files[name]}"))
                continue
            label_files[name] = path
            labels, label_problems = parse_label_file(path)
            problems += label_problems
            videos[name] = VideoRecord(name, "", split, len(labels), labels)
    return videos, label_files, problems


def read_test_videos(root: Path, label_files: dict[str, Path], test_list: str | Path | None,
                     test_sample: str | Path | None) -> tuple[dict[str, VideoRecord], SampleFile | None, list[Problem]]:
    """Test videos from the test list (or, without one, the sample file), and the sample file.

    A test video's frame count is its last frame in the sample file. Without a sample file it is
    0 (unknown yet) and :func:`attach_features` takes it from the feature files; a listed video
    that a sample file leaves out is a problem (it could be neither counted nor submitted).
    """
    problems: list[Problem] = []
    list_path = find_one(root, TEST_LIST_PATTERNS, "test video list", test_list)
    sample_path = find_one(root, TEST_SAMPLE_PATTERNS, "test sample", test_sample)
    names: list[str] = []
    if list_path is not None:
        if not list_path.is_file():
            problems.append(Problem(list_path, "test video list not found"))
        else:
            names, list_problems = parse_test_list(list_path)
            problems += list_problems
    sample = None
    if sample_path is not None:
        if not sample_path.is_file():
            problems.append(Problem(sample_path, "test sample file not found"))
        else:
            sample, sample_problems = parse_sample_file(sample_path)
            problems += sample_problems
            names = names or list(dict.fromkeys(sample.videos.tolist()))
            problems += _unlisted_sample_videos(sample, set(names))
    frames = sample.frames_per_video() if sample else {}
    videos: dict[str, VideoRecord] = {}
    for name in names:
        if name in label_files:
            problems.append(Problem(list_path or root, f"test video {name!r} also has labels in {label_files[name]}"))
            continue
        if sample is not None and name not in frames:
            problems.append(Problem(sample.path, f"test video {name!r} (in {list_path}) has no rows in the sample "
                                                 f"file, so its frames can be neither counted nor submitted"))
        videos[name] = VideoRecord(name, "", "test", frames.get(name, 0), None)
    return videos, sample, problems


def _unlisted_sample_videos(sample: SampleFile, listed: set[str]) -> list[Problem]:
    """One problem per sample-file video missing from the test list, on its first line."""
    problems, reported = [], set()
    for lineno, video in zip(sample.lines.tolist(), sample.videos.tolist()):
        if video not in listed and video not in reported:
            problems.append(Problem(sample.path, f"video {video!r} is not in the test video list", line=lineno))
            reported.add(video)
    return problems


def resolve_subject_rule(subjects: str | Path | None, labelled: dict[str, VideoRecord]) -> tuple[SubjectRule, list[Problem]]:
    """The default subject rule, or the user's subject file, which must list every labelled video."""
    if subjects is None:
        return SubjectRule(), []
    rule, file_problems = read_subject_file(subjects)
    problems = [Problem(rule.source, p.message, line=p.line) for p in file_problems]
    if rule.explicit or not problems:
        problems += [Problem(rule.source, f"{labelled[v].split} video {v!r} has no subject: every train and "
                                          f"validation video needs a row 'video,subject'")
                     for v in rule.missing(labelled)]
    return rule, problems


def assign_subjects(videos: dict[str, VideoRecord], rule: SubjectRule) -> None:
    for video in videos.values():
        video.subject = rule.subject(video.name)


def _check_feature_file(path: Path, expected_dim: int | None) -> tuple[int | None, list[Problem]]:
    """Header-only check of an .npy file: returns (rows, problems) without reading the data."""
    try:
        with open(path, "rb") as file:
            magic = file.read(len(NPY_MAGIC))
    except OSError as exc:
        return None, [Problem(path, f"cannot read: {exc.strerror or exc}")]
    if magic != NPY_MAGIC:  # else np.load tries it as a pickle and says so, naming no real cause
        return None, [Problem(path, "not a NumPy .npy file (it does not start with the .npy header); "
                                    "write features with np.save")]
    try:
        array = np.load(path, mmap_mode="r")
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a problem to report, not a crash
        return None, [Problem(path, f"cannot read .npy: {exc}")]
    if array.ndim != 2:
        return None, [Problem(path, f"expected a 2-D (frames, dim) array, got shape {array.shape}")]
    problems = []
    if array.dtype not in FEATURE_DTYPES:
        problems.append(Problem(path, f"dtype {array.dtype} is not a float type (float16/32/64)"))
    if expected_dim is not None and array.shape[1] != expected_dim:
        problems.append(Problem(path, f"feature dim {array.shape[1]} != {expected_dim} of this modality"))
    if array.shape[0] == 0:
        problems.append(Problem(path, "feature file has no rows"))
    return array.shape[0], problems


def _majority_dims(feature_root: Path) -> dict[str, int]:
    """The dim most feature files of a modality have; a file that differs is the one reported."""
    dims: dict[str, int] = {}
    for mod_dir in sorted(p for p in feature_root.iterdir() if p.is_dir()):
        counts: dict[int, int] = defaultdict(int)
        for f in sorted(mod_dir.glob("*.npy"))[:200]:
            try:
                shape = np.load(f, mmap_mode="r").shape
            except Exception:  # noqa: BLE001 - reported per file later
                continue
            if len(shape) == 2:
                counts[shape[1]] += 1
        if counts:
            dims[mod_dir.name] = max(counts, key=counts.get)
    return dims


def feature_dims(root: Path, modalities: list[str] | None, expected_dims: dict[str, int] | None) -> dict[str, int]:
    """The modalities to use and their dims: ``expected_dims``, else what most files have."""
    feature_root = root / "features"
    dims = _majority_dims(feature_root) if feature_root.is_dir() else {}
    dims.update(expected_dims or {})
    wanted = list(modalities) if modalities is not None else sorted(dims)
    return {m: dims.get(m) for m in wanted}


def _most_common(counts) -> int:
    """The row count most modalities agree on (the smallest on a tie), so one file at another rate
    is the one reported, not the others; 0 for no counts."""
    counts = sorted(counts)
    return max(counts, key=counts.count) if counts else 0


def attach_features(root: Path, videos: dict[str, VideoRecord], dims: dict[str, int | None],
                    tolerance: int = FRAME_TOLERANCE,
                    scan_values: bool = False) -> tuple[list[Alignment], list[Problem]]:
    """Check every video's feature files (headers; every value too with ``scan_values``) and match
    their rows to its frame count."""
    problems: list[Problem] = []
    rows_of: dict[str, dict[str, int]] = defaultdict(dict)
    for modality, dim in dims.items():
        for video in videos.values():
            path = root / "features" / modality / f"{video.name}.npy"
            if not path.is_file():
                problems.append(Problem(path, f"missing {modality} features of {video.split} video {video.name!r}"))
                continue
            rows, file_problems = _check_feature_file(path, dim)
            if scan_values and not file_problems:
                file_problems = scan_feature_values(path)
            problems += file_problems
            video.feature_paths[modality] = path
            if rows:
                rows_of[video.name][modality] = rows
    alignments: list[Alignment] = []
    for video in videos.values():
        if video.split == "test" and video.n_frames == 0:  # no sample file: the features say
            video.n_frames = _most_common(rows_of[video.name].values())
            if video.n_frames == 0:
                problems.append(Problem(root, f"test video {video.name!r} has no frames: no sample rows and no features"))
        if video.n_frames == 0:  # reported already (an empty annotation file, or the line above)
            continue
        for modality, rows in rows_of[video.name].items():
            path = video.feature_paths[modality]
            if abs(rows - video.n_frames) > tolerance:
                problems.append(Problem(path, explain_mismatch(video.name, rows, video.n_frames,
                                                               root / CROPS_DIR / video.name)))
            elif rows != video.n_frames:
                alignments.append(Alignment(video.name, modality, path, rows, video.n_frames))
    return alignments, problems


def load_dataset(
    root: str | Path,
    modalities: list[str] | None = None,
    test_list: str | Path | None = None,
    test_sample: str | Path | None = None,
    expected_dims: dict[str, int] | None = None,
    subjects: str | Path | None = None,
    scan_values: bool = False,
) -> tuple[Dataset, list[Problem]]:
    """Index and validate a dataset root. Returns the dataset and every problem found.

    Use :func:`open_dataset` to raise on problems instead. ``modalities`` limits which feature
    folders are checked (default: all under ``features/``). ``subjects``: a ``video,subject`` CSV
    that replaces the default subject rule (see :mod:`abaw.subjects`). ``scan_values``: check every
    feature value for ±inf and ``FEATURE_LIMIT`` now (else each window is checked as it is read).
    """
    root = Path(root)
    if not (root / LABEL_DIR).is_dir():
        raise DataError([Problem(root, f"not an Aff-Wild2 root: missing folder {LABEL_DIR}/")])
    labelled, label_files, problems = read_labelled_videos(root)
    test, sample, test_problems = read_test_videos(root, label_files, test_list, test_sample)
    rule, subject_problems = resolve_subject_rule(subjects, labelled)
    videos = {**labelled, **test}
    assign_subjects(videos, rule)
    dims = feature_dims(root, modalities, expected_dims)
    if not dims:
        problems.append(Problem(root / "features", "no feature folders (features/<modality>/<video>.npy)"))
    alignments, feature_problems = attach_features(root, videos, dims, scan_values=scan_values)
    problems += test_problems + subject_problems + feature_problems
    dataset = Dataset(root, videos, {m: d for m, d in dims.items() if d is not None}, sample, alignments, rule.name)
    return dataset, problems


def open_dataset(root: str | Path, **kwargs) -> Dataset:
    """Index and validate a dataset root, raising :class:`DataError` listing every problem."""
    dataset, problems = load_dataset(root, **kwargs)
    if problems:
        raise DataError(problems)
    return dataset
