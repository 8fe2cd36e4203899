"""Which videos show the same people: the subject rule, or a user's subject file.

Folds are split by subject, so that no fold model is validated (or OOF-scored) on a person it
trained on. Aff-Wild2 names its videos in several ways, and several files can be one recording:

=========================================  ==============================  ====================
video files                                 what they are                   subject
=========================================  ==============================  ====================
``105``, ``10-60-1280x720``, ``video59``    one recording each              the name itself
``video55_left``, ``video55_right``         two people of one recording     ``video55``
``10-60-1280x720``, ``10-60-1280x720_right``  the same, one side unsuffixed  ``10-60-1280x720``
``video45_1`` ... ``video45_7``             one recording cut into parts    ``video45``
``122-60-1920x1080-1`` ... ``-5``           the same, in the other scheme   ``122-60-1920x1080``
``video10_1_left``, ``video10_1_right``     both at once                    ``video10``
=========================================  ==============================  ====================

The default rule first drops a ``_left`` / ``_right`` suffix, then a part number (``_N`` after
``videoN``, ``-N`` after ``ID-FPS-WxH``). It does not join ``105`` with ``105-30-1280x720``: their
ids coincide, but they are different recordings (the official split puts such pairs in different
splits, while it keeps every part of one recording in one split). On the real release (594 videos)
the rule finds 559 subjects; the ``_left`` / ``_right`` rule alone found 578.

A user who knows better passes a subject file (``--subjects FILE``): CSV with the header
``video,subject``, one row per video. It replaces the rule for every labelled video (a labelled
video missing from the file is an error that names it); test videos it does not list keep the rule
(their subject plays no part in the folds).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .io import TextDecodeError, text_lines

DEFAULT_RULE = "default: _left/_right and numbered parts joined"
SUBJECT_FILE_HEADER = ["video", "subject"]

_SIDE = re.compile(r"_(?:left|right)$")
_PARTS = (
    re.compile(r"^(?P<recording>video\d+)_\d+$"),             # video45_3
    re.compile(r"^(?P<recording>\d+-\d+-\d+x\d+)-\d+$"),      # 122-60-1920x1080-3
)


def video_file_of(video: str) -> str:
    """The recording file a ``_left`` / ``_right`` annotation belongs to (part numbers are kept):
    the two people of one recording share its video file, sound and transcript."""
    return _SIDE.sub("", video)


def default_subject(video: str) -> str:
    """The subject of a video under the default rule (see the module docstring)."""
    name = video_file_of(video)
    for pattern in _PARTS:
        match = pattern.match(name)
        if match:
            return match["recording"]
    return name


@dataclass(frozen=True)
class SubjectProblem:
    """A defect of a subject file, located by line; the data layer turns it into its ``Problem``."""

    message: str
    line: int | None = None


@dataclass(frozen=True)
class SubjectRule:
    """Maps a video to its subject: the default rule, or a user's file (``explicit``) over it."""

    explicit: Mapping[str, str] = field(default_factory=dict)
    source: Path | None = None  # the subject file, when there is one

    @property
    def name(self) -> str:
        return DEFAULT_RULE if self.source is None else f"subject file {self.source}"

    def subject(self, video: str) -> str:
        return self.explicit.get(video) or default_subject(video)

    def missing(self, videos: Iterable[str]) -> list[str]:
        """The videos a subject file should list but does not (none under the default rule)."""
        if self.source is None:
            return []
        return sorted(v for v in videos if v not in self.explicit)


def read_subject_file(path: str | Path) -> tuple[SubjectRule, list[SubjectProblem]]:
    """Parse a ``video,subject`` CSV into a :class:`SubjectRule`, collecting every problem by line."""
    path = Path(path)
    if not path.is_file():
        return SubjectRule(source=path), [SubjectProblem("subject file not found")]
    try:
        lines = text_lines(path)
    except TextDecodeError as exc:
        return SubjectRule(source=path), [SubjectProblem(exc.reason, line=exc.line)]
    if len(lines) < 2:
        return SubjectRule(source=path), [SubjectProblem("no rows: expected the header video,subject and one "
                                                         "row per video")]
    problems: list[SubjectProblem] = []
    if [c.strip().lower() for c in lines[0].split(",")] != SUBJECT_FILE_HEADER:
        problems.append(SubjectProblem(f"header must be 'video,subject', got {lines[0]!r}", line=1))
    explicit: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 2 or not all(cells):
            problems.append(SubjectProblem(f"expected 'video,subject', got {line!r}", line=lineno))
        elif cells[0] in explicit:
            problems.append(SubjectProblem(f"video {cells[0]!r} listed twice (first on line "
                                           f"{first_line[cells[0]]})", line=lineno))
        else:
            explicit[cells[0]] = cells[1]
            first_line[cells[0]] = lineno
    # Rows for videos the dataset does not hold are allowed: one file may describe the whole release.
    return SubjectRule(explicit, path), problems
