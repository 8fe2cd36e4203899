"""Checking a single-file submission against the official test sample file, line by line."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ..data import SAMPLE_HEADER, Problem, SampleFile
from .writer import HEADER_LINE


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
