"""``python -m abaw.extract import``: per-frame CSV files -> ``ROOT/features/<name>/<video>.npy``.

One ``<video>.csv`` per video of the root, as OpenFace, py-feat or a team's own tool writes them:
a header, then one row per frame, keyed by a frame column holding the 1-based frame number (the
number of ``cropped_aligned/<video>/00001.jpg``, line i + 1 of the annotation file). Such files
usually list only the frames where a face was found; every frame they do not list becomes a NaN
row, at exactly that frame (:func:`~abaw.extract.frames.rows_for_frames`).

The rules, each chosen so that a frame is never paired with the wrong label and nothing is dropped
unnoticed:

* Header names are stripped (OpenFace 2 writes ``frame, face_id, timestamp, ...``: a space before
  every name) and so are cells.
* Feature columns: ``columns`` if given (each must be in every file). By default every numeric
  column but the frame column, decided on the first CSV (in video order) that has rows: a column
  none of whose cells is a number (a file path, a date, a label) is skipped and named in the
  output; a column with no values at all is skipped too (it would make every row NaN). A column
  with numbers and text is numeric, and its text cells are errors. Every other file must have the
  same columns. OpenFace's bookkeeping columns (``face_id``, ``timestamp``, ``confidence``,
  ``success``) are numeric and so are included by default: pick the features with ``columns``.
* Empty cells and ``nan`` / ``NA`` are missing values; a frame with one becomes a NaN row (the
  reader treats a row with any NaN as a frame without input). Any other non-numeric cell, and an
  infinite one, is an error.
* Where the file has a ``success`` column (OpenFace: 0 where tracking failed, with zeros or junk
  in the features) a row whose success is 0 becomes a NaN row.
* Errors name the file and line: no frame column, a frame that is not a whole number or is below
  1, a frame listed twice, a row with another number of cells than the header, a missing column,
  a bad feature cell, a value beyond float16's range (use float32).
* A video of the root without a CSV is an error listing every such video before anything is
  written: a missing file means the tool did not run on the video or named it otherwise (the
  sides ``_left`` / ``_right`` and parts ``_1`` each need their own file), and a silent file of
  NaN rows would train on a modality absent from a whole video. A video where the tool found no
  face at all gets a CSV holding only the header: its NaN rows are then explicit.
* Rows past the video's last frame (the annotation file's rows, or the sample file's last frame
  for a test video) have no label; they are dropped and counted.
* The feature columns are recorded in ``features/<name>/extraction.json``; a rerun with other
  columns into the same folder is refused, so one folder never mixes two column sets. Finished
  videos are skipped on a rerun and every file is written atomically (``run_extraction``).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..console import console
from .frames import (ExtractError, ExtractionReport, FeatureWriter, Target, extraction_targets, require_dir,
                     rows_for_frames, run_extraction)

MISSING_CELLS = ("", "nan", "na")  # compared lower-case: pandas writes NaN as "", R as "NA"
SUCCESS_COLUMN = "success"  # OpenFace: 1 where the face was tracked, 0 where the row's features are junk
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass
class ImportReport(ExtractionReport):
    """:class:`ExtractionReport` plus what only the importer sees."""

    columns: list[str] = field(default_factory=list)
    skipped_columns: list[str] = field(default_factory=list)  # non-numeric or empty, by the default rule
    past_end: dict[str, int] = field(default_factory=dict)  # video -> rows past its last frame, dropped
    failed: int = 0  # rows with success 0, written as NaN rows


@dataclass
class CsvTable:
    """One CSV file: stripped header names, data rows (cells as text) and each row's line number."""

    path: Path
    header: list[str]
    rows: list[list[str]]
    lines: list[int]

    def column_index(self, name: str, why: str) -> int:
        if name not in self.header:
            shown = ", ".join(repr(c) for c in self.header[:15]) + (" ..." if len(self.header) > 15 else "")
            raise ExtractError(f"{self.path}:1: no column {name!r} ({why}); the header has {shown}")
        return self.header.index(name)

    def cells(self, name: str, why: str) -> np.ndarray:
        j = self.column_index(name, why)
        return np.array([row[j].strip() for row in self.rows], dtype=str)


def read_csv(path: Path) -> CsvTable:
    """Parse a CSV file; blank lines are skipped, a row with another cell count than the header is an error."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise ExtractError(f"{path}: empty file (no header); a video without faces needs the header alone")
        header = [name.strip() for name in header]
        for j, name in enumerate(header):
            if name and header.index(name) != j:
                raise ExtractError(f"{path}:1: column {name!r} appears twice in the header")
        rows, lines = [], []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise ExtractError(f"{path}:{reader.line_num}: {len(row)} cells, the header has {len(header)}")
            rows.append(row)
            lines.append(reader.line_num)
    return CsvTable(path, header, rows, lines)


def frame_numbers(table: CsvTable, frame_column: str) -> np.ndarray:
    """The 1-based frame number of every row; an error names the line of a bad or repeated frame."""
    cells = table.cells(frame_column, "the frame column")
    frames = np.empty(len(cells), np.int64)
    first_line: dict[int, int] = {}
    for i, (cell, line) in enumerate(zip(cells.tolist(), table.lines)):
        where = f"{table.path}:{line}"
        try:
            value = float(cell)
        except ValueError:
            raise ExtractError(f"{where}: frame {cell!r} (column {frame_column!r}) is not a number") from None
        if not value.is_integer():
            raise ExtractError(f"{where}: frame {cell!r} (column {frame_column!r}) is not a whole number")
        frame = int(value)
        if frame < 1:
            raise ExtractError(f"{where}: frame {frame}: frame numbers start at 1 (the first image is 00001.jpg); "
                               f"if your tool counts from 0, add 1")
        if frame in first_line:
            raise ExtractError(f"{where}: frame {frame} again (first on line {first_line[frame]}); one row per "
                               f"frame is needed (several faces per frame? keep one face)")
        first_line[frame] = line
        frames[i] = frame
    return frames


def _first_bad_cell(table: CsvTable, column: str, cells: np.ndarray) -> str:
    for cell, line in zip(cells.tolist(), table.lines):
        try:
            float(cell)
        except ValueError:
            return f"{table.path}:{line}: {column!r} = {cell!r} is not a number"
    raise AssertionError("no bad cell")  # only called after a failed conversion


def numeric_cells(table: CsvTable, column: str, why: str) -> np.ndarray:
    """A column as float64, NaN for missing cells; an error names the line of a non-numeric or infinite cell."""
    cells = table.cells(column, why)
    cells[np.isin(np.char.lower(cells), MISSING_CELLS)] = "nan"
    try:
        values = cells.astype(np.float64)
    except ValueError:
        raise ExtractError(_first_bad_cell(table, column, cells)) from None
    infinite = np.flatnonzero(np.isinf(values))
    if infinite.size:
        i = infinite[0]
        raise ExtractError(f"{table.path}:{table.lines[i]}: {column!r} = {str(cells[i])!r} is not a finite number")
    return values


def feature_values(table: CsvTable, columns: list[str], why: str, dtype: str) -> np.ndarray:
    """(rows, len(columns)) float64 of the feature columns, checked against the output dtype's range."""
    for column in columns:  # a file with the header alone must have the columns too
        table.column_index(column, why)
    values = np.stack([numeric_cells(table, c, why) for c in columns], axis=1) if table.rows else \
        np.zeros((0, len(columns)))
    if dtype == "float16":
        too_big = np.argwhere(np.abs(values) > FLOAT16_MAX)
        if too_big.size:
            i, j = too_big[0]
            raise ExtractError(f"{table.path}:{table.lines[i]}: {columns[j]!r} = {values[i, j]:g} is beyond "
                               f"float16's range (±{FLOAT16_MAX:g}); write float32 (--dtype float32)")
    return values


def _is_text_or_empty(cells: np.ndarray) -> bool:
    """No cell of the column is a number: a file path, a date, a label; or no value at all."""
    for cell in cells.tolist():
        if cell.lower() in MISSING_CELLS:
            continue
        try:
            float(cell)
            return False
        except ValueError:
            continue
    return True


def default_columns(table: CsvTable, frame_column: str) -> tuple[list[str], list[str]]:
    """(numeric columns, skipped columns) of ``table``, the frame column and unnamed columns left out."""
    numeric, skipped = [], []
    for name in table.header:
        if name == frame_column or not name:
            continue
        (skipped if _is_text_or_empty(table.cells(name, "")) else numeric).append(name)
    return numeric, skipped


def choose_columns(targets: list[Target], csv_dir: Path, frame_column: str,
                   columns: list[str] | None) -> tuple[list[str], list[str], str]:
    """The feature columns, the columns skipped, and why they must be in every file (for its errors)."""
    if columns is not None:
        if not columns or any(not c for c in columns):
            raise ExtractError(f"--columns {','.join(columns)!r}: an empty column name")
        repeated = sorted({c for c in columns if columns.count(c) > 1})
        if repeated:
            raise ExtractError(f"--columns names {', '.join(repeated)} more than once")
        if frame_column in columns:
            raise ExtractError(f"--columns names the frame column {frame_column!r}: it is the key, not a feature")
        return list(columns), [], "named in --columns"
    for target in targets:
        path = csv_dir / f"{target.video}.csv"
        if path.is_file():
            table = read_csv(path)
            if table.rows:
                table.column_index(frame_column, "the frame column")
                numeric, skipped = default_columns(table, frame_column)
                if not numeric:
                    raise ExtractError(f"{path}: no numeric column besides the frame column {frame_column!r}")
                return numeric, skipped, f"{path.name} has it: the first CSV with rows sets the columns"
    raise ExtractError(f"{csv_dir}: no CSV of a video of the root has a row, so no columns can be picked")


def check_all_present(targets: list[Target], csv_dir: Path) -> None:
    """Every video to write has its CSV; else one error listing them all (and the CSVs no video matches)."""
    missing = [t.video for t in targets if not (csv_dir / f"{t.video}.csv").is_file()]
    if not missing:
        return
    known = {t.video for t in targets}
    unmatched = sorted(p.stem for p in csv_dir.glob("*.csv") if p.stem not in known)
    message = (f"{csv_dir}: no CSV for {len(missing)} video(s) of the root: {', '.join(missing[:30])}"
               f"{' ...' if len(missing) > 30 else ''}. Each video needs <video>.csv (a header alone if "
               f"the tool found no face in it)")
    if unmatched:
        message += f"; CSVs that match no video: {', '.join(unmatched[:30])}{' ...' if len(unmatched) > 30 else ''}"
    raise ExtractError(message)


def import_video(target: Target, table: CsvTable, frame_column: str, columns: list[str], why: str,
                 dtype: str, report: ImportReport) -> np.ndarray:
    """(n_frames, D) of one video: its CSV rows at their frames, NaN rows elsewhere."""
    frames = frame_numbers(table, frame_column)
    values = feature_values(table, columns, why, dtype)
    if SUCCESS_COLUMN in table.header and SUCCESS_COLUMN != frame_column:
        failed = numeric_cells(table, SUCCESS_COLUMN, "the tracking success") == 0
        values[failed] = np.nan
        report.failed += int(failed.sum())
    past_end = int((frames > target.n_frames).sum())
    if past_end:
        report.past_end[target.video] = past_end
    return rows_for_frames(target.n_frames, frames, values)


def print_notes(report: ImportReport) -> None:
    console.print(f"imported columns ({len(report.columns)}): {', '.join(report.columns)}", markup=False)
    if report.skipped_columns:
        console.print(f"skipped (no numbers in them): {', '.join(report.skipped_columns)}", markup=False)
    if report.failed:
        console.print(f"{report.failed} row(s) with {SUCCESS_COLUMN} 0 written as NaN rows", markup=False)
    if report.past_end:
        videos = ", ".join(f"{v} ({n})" for v, n in sorted(report.past_end.items()))
        console.print(f"{sum(report.past_end.values())} row(s) past their video's last frame dropped: {videos}",
                      markup=False)


def import_csv(data_root, csv_dir, frame_column: str, columns: list[str] | None = None, name: str = "imported",
               dtype: str = "float16", test_list=None, test_sample=None) -> ImportReport:
    """``csv_dir/<video>.csv`` -> ``data_root/features/<name>/<video>.npy`` for every video of the root.

    See the module docstring for the rules (columns, missing cells and files, errors)."""
    csv_dir = require_dir(csv_dir, "CSV")
    targets = extraction_targets(data_root, test_list, test_sample)
    writer = FeatureWriter(data_root, name, dtype)
    check_all_present([t for t in targets if not writer.done(t)], csv_dir)
    chosen, skipped, why = choose_columns(targets, csv_dir, frame_column, columns)
    report = ImportReport(columns=chosen, skipped_columns=skipped)

    def extract(target: Target) -> np.ndarray:
        table = read_csv(csv_dir / f"{target.video}.csv")
        return import_video(target, table, frame_column, chosen, why, dtype, report)

    run_extraction(targets, writer, extract, f"import {csv_dir.name}", report,
                   settings={"command": "import", "frame_column": frame_column, "columns": chosen})
    print_notes(report)
    return report
