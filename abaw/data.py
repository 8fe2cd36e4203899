"""The Aff-Wild2 data layer: find, validate and read a dataset root laid out as the official release.

Layout (see README "Data layout")::

    ROOT/VA_Estimation_Challenge/Train_Set/<video>.txt       header "valence,arousal", one line per frame
    ROOT/VA_Estimation_Challenge/Validation_Set/<video>.txt
    ROOT/*test_set_release*.txt                             test video names, one per line
    ROOT/*test_set_sample*.txt | *test_set_example*.txt     "image_location,valence,arousal" rows to predict
    ROOT/features/<modality>/<video>.npy                    (frames, dim) float, a NaN row = no face/feature

Frame-count rule: a video's frame count is its label count (train/val) or the larger of its last
sample-file frame and its feature rows (test). A feature file is aligned to that count by
**trimming** surplus rows and **carrying the last row forward** over missing ones; `Dataset.length_mismatches`
reports the videos this touched. Features are memory-mapped and only the requested window is read,
so a dataset never sits in RAM whole.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

LABEL_DIR = "VA_Estimation_Challenge"
SPLIT_DIRS = {"train": "Train_Set", "val": "Validation_Set"}
LABEL_HEADER = ["valence", "arousal"]
SAMPLE_HEADER = ["image_location", "valence", "arousal"]
INVALID_LABEL = -5.0
TEST_LIST_PATTERNS = ("*test_set_release*.txt", "*VA*test*list*.txt")
TEST_SAMPLE_PATTERNS = ("*test_set_sample*.txt", "*test_set_example*.txt", "*VA*test*sample*.txt")
FEATURE_DTYPES = (np.float16, np.float32, np.float64)
_IMAGE_RE = re.compile(r"^(?P<video>[^/\\]+)/(?P<frame>\d+)\.jpg$")


class DataError(Exception):
    """Raised when a dataset root fails validation; ``problems`` holds every problem found."""

    def __init__(self, problems: list["Problem"]):
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} problem(s) in the dataset:\n{lines}{more}")


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


def subject_key(video: str) -> str:
    """Two-person videos are split as ``<video>_left``/``_right``; both belong to one subject pool."""
    for suffix in ("_left", "_right"):
        if video.endswith(suffix):
            return video[: -len(suffix)]
    return video


def _text_lines(path: Path) -> list[str]:
    """Lines without CRLF endings; trailing blank lines dropped (both are valid input)."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def parse_label_file(path: Path) -> tuple[np.ndarray, list[Problem]]:
    """Parse one annotation file into (T, 2) float32 labels, collecting every problem with its line."""
    problems: list[Problem] = []
    lines = _text_lines(path)
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
            if value != INVALID_LABEL and not -1.0 <= value <= 1.0:
                problems.append(
                    Problem(path, f"{LABEL_HEADER[j]} {value} outside [-1, 1] and not -5", line=lineno)
                )
                continue
            labels[i, j] = value
    return labels, problems


def parse_test_list(path: Path) -> tuple[list[str], list[Problem]]:
    names, problems, seen = [], [], set()
    for lineno, line in enumerate(_text_lines(path), start=1):
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
    problems: list[Problem] = []
    lines = _text_lines(path)
    if not lines:
        return SampleFile(path, [], np.array([], str), np.array([], int)), [Problem(path, "empty file")]
    header = [c.strip().lower() for c in lines[0].split(",")]
    if header[:1] != ["image_location"]:
        problems.append(Problem(path, f"header must start with 'image_location', got {lines[0]!r}", line=1))
    locations, videos, frames, lines_of, seen = [], [], [], [], set()
    for lineno, line in enumerate(lines[1:], start=2):
        location = line.split(",")[0].strip()
        match = _IMAGE_RE.match(location)
        if not match:
            problems.append(Problem(path, f"expected 'video/00001.jpg', got {location!r}", line=lineno))
            continue
        if int(match["frame"]) < 1:
            problems.append(Problem(path, f"frame numbers start at 1 (00001.jpg), got {location!r}", line=lineno))
            continue
        if location in seen:
            problems.append(Problem(path, f"duplicate frame {location!r}", line=lineno))
            continue
        seen.add(location)
        locations.append(location)
        lines_of.append(lineno)
        videos.append(match["video"])
        frames.append(int(match["frame"]))
    sample = SampleFile(path, locations, np.array(videos, dtype=str), np.array(frames, dtype=np.int64),
                        np.array(lines_of, dtype=np.int64))
    return sample, problems


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

    @property
    def label_mask(self) -> np.ndarray:
        if self.labels is None:
            return np.zeros(self.n_frames, bool)
        return (self.labels != INVALID_LABEL).all(axis=1)

    def _memmap(self, modality: str) -> np.ndarray:
        return np.load(self.feature_paths[modality], mmap_mode="r")

    def features(self, modality: str, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Frames [start, stop) of one modality as float32 (L, D), and the feature mask (L,).

        Rows past the file's end carry its last row (the documented alignment rule); NaN rows
        (no face / no feature) come back zero-filled with mask False.
        """
        stop = self.n_frames if stop is None else stop
        array = self._memmap(modality)
        rows = np.clip(np.arange(start, stop), 0, len(array) - 1)
        window = np.asarray(array[rows], dtype=np.float32)
        present = ~np.isnan(window).any(axis=1)
        window[~present] = 0.0
        return window, present


@dataclass
class Dataset:
    """Index of a validated dataset root (metadata only; features stay on disk)."""

    root: Path
    videos: dict[str, VideoRecord]
    modalities: dict[str, int]  # name -> feature dim
    sample: SampleFile | None
    length_mismatches: list[str]  # videos whose feature files were padded or trimmed

    def split(self, *splits: str) -> list[VideoRecord]:
        return [v for v in self.videos.values() if v.split in splits]

    @cached_property
    def subjects(self) -> set[str]:
        return {v.subject for v in self.videos.values()}

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


def _check_feature_file(path: Path, expected_dim: int | None) -> tuple[int | None, int | None, list[Problem]]:
    """Header-only check of an .npy file: returns (rows, dim, problems) without reading the data."""
    try:
        array = np.load(path, mmap_mode="r")
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a problem to report, not a crash
        return None, None, [Problem(path, f"cannot read .npy: {exc}")]
    if array.ndim != 2:
        return None, None, [Problem(path, f"expected a 2-D (frames, dim) array, got shape {array.shape}")]
    problems = []
    if array.dtype not in FEATURE_DTYPES:
        problems.append(Problem(path, f"dtype {array.dtype} is not a float type (float16/32/64)"))
    if expected_dim is not None and array.shape[1] != expected_dim:
        problems.append(Problem(path, f"feature dim {array.shape[1]} != {expected_dim} of this modality"))
    if array.shape[0] == 0:
        problems.append(Problem(path, "feature file has no rows"))
    return array.shape[0], array.shape[1], problems


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


def load_dataset(
    root: str | Path,
    modalities: list[str] | None = None,
    test_list: str | Path | None = None,
    test_sample: str | Path | None = None,
    expected_dims: dict[str, int] | None = None,
) -> tuple[Dataset, list[Problem]]:
    """Index and validate a dataset root. Returns the dataset and every problem found.

    Use :func:`open_dataset` to raise on problems instead. ``modalities`` limits which feature
    folders are checked (default: all under ``features/``).
    """
    root = Path(root)
    problems: list[Problem] = []
    if not (root / LABEL_DIR).is_dir():
        raise DataError([Problem(root, f"not an Aff-Wild2 root: missing folder {LABEL_DIR}/")])

    # Labels of train and validation videos.
    videos: dict[str, VideoRecord] = {}
    seen_in: dict[str, Path] = {}
    for split, folder in SPLIT_DIRS.items():
        split_dir = root / LABEL_DIR / folder
        if not split_dir.is_dir():
            problems.append(Problem(split_dir, "missing annotation folder"))
            continue
        for path in sorted(split_dir.glob("*.txt")):
            name = path.stem
            if name in seen_in:
                problems.append(Problem(path, f"video {name!r} is also in {seen_in[name]}"))
                continue
            seen_in[name] = path
            labels, label_problems = parse_label_file(path)
            problems += label_problems
            videos[name] = VideoRecord(name, subject_key(name), split, len(labels), labels)

    # Test list and sample file.
    sample = None
    list_path = find_one(root, TEST_LIST_PATTERNS, "test video list", test_list)
    sample_path = find_one(root, TEST_SAMPLE_PATTERNS, "test sample", test_sample)
    test_names: list[str] = []
    if list_path is not None:
        if not list_path.is_file():
            problems.append(Problem(list_path, "test video list not found"))
        else:
            test_names, list_problems = parse_test_list(list_path)
            problems += list_problems
    if sample_path is not None:
        if not sample_path.is_file():
            problems.append(Problem(sample_path, "test sample file not found"))
        else:
            sample, sample_problems = parse_sample_file(sample_path)
            problems += sample_problems
            if not test_names:
                test_names = list(dict.fromkeys(sample.videos.tolist()))
    sample_frames = sample.frames_per_video() if sample else {}
    listed = set(test_names)
    for lineno, video in zip(sample.lines.tolist(), sample.videos.tolist()) if sample else []:
        if video not in listed:
            problems.append(Problem(sample.path, f"video {video!r} is not in the test video list", line=lineno))
            listed.add(video)  # one report per video is enough
    for name in test_names:
        if name in videos:
            problems.append(Problem(list_path or root, f"test video {name!r} also has labels in "
                                                      f"{seen_in[name]}"))
            continue
        videos[name] = VideoRecord(name, subject_key(name), "test", sample_frames.get(name, 0), None)

    # Features: header-only checks, so validating a large root stays cheap.
    feature_root = root / "features"
    dims = _majority_dims(feature_root) if feature_root.is_dir() else {}
    dims.update(expected_dims or {})
    wanted = list(modalities) if modalities is not None else sorted(dims)
    if not wanted:
        problems.append(Problem(feature_root, "no feature folders (features/<modality>/<video>.npy)"))
    mismatched = []
    for modality in wanted:
        for video in videos.values():
            path = feature_root / modality / f"{video.name}.npy"
            if not path.is_file():
                problems.append(Problem(path, f"missing {modality} features of {video.split} video {video.name!r}"))
                continue
            rows, _, feature_problems = _check_feature_file(path, dims.get(modality))
            problems += feature_problems
            video.feature_paths[modality] = path
            if rows is None:
                continue
            if video.split == "test":
                video.n_frames = max(video.n_frames, rows)
            elif rows != video.n_frames:
                mismatched.append(video.name)
    for video in videos.values():
        if video.split == "test" and video.n_frames == 0 and not video.feature_paths:
            problems.append(Problem(root, f"test video {video.name!r} has no frames: no sample rows and no features"))
    mismatched += [v.name for v in videos.values() if v.split == "test" and
                   any(np.load(p, mmap_mode="r").shape[0] != v.n_frames for p in v.feature_paths.values()
                       if p.is_file())]
    dataset = Dataset(root, videos, {m: dims[m] for m in wanted if m in dims}, sample,
                      sorted(set(mismatched)))
    return dataset, problems


def open_dataset(root: str | Path, **kwargs) -> Dataset:
    """Index and validate a dataset root, raising :class:`DataError` listing every problem."""
    dataset, problems = load_dataset(root, **kwargs)
    if problems:
        raise DataError(problems)
    return dataset
