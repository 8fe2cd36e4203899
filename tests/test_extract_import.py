"""``python -m abaw.extract import``: per-frame CSV files -> one row per annotation frame, NaN where unlisted."""
import json

import numpy as np
import pytest

from abaw.data import open_dataset
from abaw.extract.__main__ import main
from abaw.extract.frames import SETTINGS_FILE, ExtractError
from abaw.extract.importer import import_csv

VIDEOS = ["a", "b_left", "b_right", "c", "t1", "t2"]  # tiny_root's videos, 20 frames each
N = 20


def value(frame: int, column: int) -> float:
    """What the CSVs hold: readable back as (frame, column), exact in float16."""
    return frame + column / 4


def write_csv(path, frames, header=("frame", "f0", "f1"), sep=",", extra_lines=()):
    lines = [sep.join(header)]
    for frame in frames:
        lines.append(sep.join([str(frame)] + [f"{value(frame, j)}" for j in range(len(header) - 1)]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([*lines, *extra_lines]) + "\n")
    return path


@pytest.fixture
def csv_dir(tmp_path):
    """One CSV per video of tiny_root, every frame listed."""
    folder = tmp_path / "csv"
    for video in VIDEOS:
        write_csv(folder / f"{video}.csv", range(1, N + 1))
    return folder


def features(root, video, name="imported"):
    return np.load(root / "features" / name / f"{video}.npy").astype(np.float32)


def test_rows_land_at_their_frames_and_unlisted_frames_are_nan_rows(tiny_root, csv_dir):
    listed = [f for f in range(1, N + 1) if f not in (1, 7, 8, 20)]
    write_csv(csv_dir / "a.csv", reversed(listed))  # file order is not frame order
    report = import_csv(tiny_root, csv_dir, "frame")
    out = features(tiny_root, "a")
    assert out.shape == (N, 2)
    for frame in range(1, N + 1):
        if frame in listed:
            assert out[frame - 1].tolist() == [value(frame, 0), value(frame, 1)], frame
        else:
            assert np.isnan(out[frame - 1]).all(), frame
    assert report.missing == 4
    assert sorted(report.written) == sorted(VIDEOS)
    assert report.columns == ["f0", "f1"]


def test_frames_past_the_end_are_dropped_and_counted(tiny_root, csv_dir):
    write_csv(csv_dir / "t1.csv", range(1, N + 4))  # a test video: its end comes from the sample file
    report = import_csv(tiny_root, csv_dir, "frame")
    assert report.past_end == {"t1": 3}
    assert features(tiny_root, "t1")[-1].tolist() == [value(N, 0), value(N, 1)]


def test_openface_headers_success_and_column_choice(tiny_root, csv_dir):
    header = ["frame", " face_id", " timestamp", " confidence", " success", " AU01_r", " AU12_r"]
    rows = [f"{f}, 0, {(f - 1) / 30:.3f}, 0.98, {0 if f == 5 else 1}, {value(f, 0)}, {value(f, 1)}"
            for f in range(1, N + 1) if f != 9]
    (csv_dir / "a.csv").write_bytes(("\ufeff" + ", ".join(header) + "\r\n" + "\r\n".join(rows) + "\r\n\r\n").encode())
    for video in VIDEOS[1:]:  # the same columns everywhere
        write_csv(csv_dir / f"{video}.csv", range(1, N + 1), header=[h.strip() for h in header])
    report = import_csv(tiny_root, csv_dir, "frame", columns=["AU01_r", "AU12_r"])
    out = features(tiny_root, "a")
    assert out[0].tolist() == [value(1, 0), value(1, 1)]
    assert np.isnan(out[4]).all() and np.isnan(out[8]).all()  # success 0; no row
    assert report.failed == 1
    record = json.loads((tiny_root / "features" / "imported" / SETTINGS_FILE).read_text())
    assert record["columns"] == ["AU01_r", "AU12_r"] and record["command"] == "import"


def test_default_columns_skip_text_and_empty_columns(tiny_root, csv_dir):
    for video in VIDEOS:
        lines = ["frame,path,f0,empty,f1"] + [f"{f},img/{f}.jpg,{value(f, 0)},,{value(f, 1)}" for f in range(1, N + 1)]
        (csv_dir / f"{video}.csv").write_text("\n".join(lines) + "\n")
    report = import_csv(tiny_root, csv_dir, "frame")
    assert report.columns == ["f0", "f1"]
    assert report.skipped_columns == ["path", "empty"]
    assert features(tiny_root, "c")[2].tolist() == [value(3, 0), value(3, 1)]


def test_missing_cells_give_nan_rows(tiny_root, csv_dir):
    lines = ["frame,f0,f1", "1,0.5,NaN", "2,,1", "3,NA,1", "4,1,2"]
    (csv_dir / "c.csv").write_text("\n".join(lines) + "\n")
    import_csv(tiny_root, csv_dir, "frame")
    out = features(tiny_root, "c")
    assert np.isnan(out[:3]).any(axis=1).all()
    assert out[3].tolist() == [1, 2]


def test_a_header_only_csv_gives_nan_rows(tiny_root, csv_dir):
    (csv_dir / "b_right.csv").write_text("frame,f0,f1\n")
    import_csv(tiny_root, csv_dir, "frame")
    assert np.isnan(features(tiny_root, "b_right")).all()


def test_missing_csvs_are_all_listed_and_nothing_is_written(tiny_root, csv_dir):
    (csv_dir / "a.csv").rename(csv_dir / "A.csv")
    (csv_dir / "t2.csv").unlink()
    with pytest.raises(ExtractError) as error:
        import_csv(tiny_root, csv_dir, "frame")
    message = str(error.value)
    assert "a, t2" in message and "match no video: A" in message
    assert not (tiny_root / "features" / "imported").exists()


# (file content, columns, the error's location and words)
BAD_INPUTS = {
    "no frame column": ("Frame,f0,f1\n1,2,3\n", None, "a.csv:1: no column 'frame'"),
    "non-numeric frame": ("frame,f0,f1\n1,2,3\nx,2,3\n", None, "a.csv:3: frame 'x'"),
    "empty frame": ("frame,f0,f1\n1,2,3\n,2,3\n", None, "a.csv:3: frame ''"),
    "non-integer frame": ("frame,f0,f1\n1,2,3\n2.5,2,3\n", None,
                          "a.csv:3: frame '2.5' (column 'frame') is not a whole number"),
    "frame 0": ("frame,f0,f1\n0,2,3\n", None, "a.csv:2: frame 0: frame numbers start at 1"),
    "duplicate frame": ("frame,f0,f1\n1,2,3\n2,2,3\n1,2,3\n", None, "a.csv:4: frame 1 again (first on line 2)"),
    "missing named column": ("frame,f0\n1,2\n", ["f0", "f1"], "a.csv:1: no column 'f1' (named in --columns)"),
    "non-numeric feature": ("frame,f0,f1\n1,2,3\n2,2,high\n", None, "a.csv:3: 'f1' = 'high' is not a number"),
    "infinite feature": ("frame,f0,f1\n1,2,inf\n", None, "a.csv:2: 'f1' = 'inf' is not a finite number"),
    "beyond float16": ("frame,f0,f1\n1,2,70000\n", None, "a.csv:2: 'f1' = 70000 is beyond float16's range"),
    "short row": ("frame,f0,f1\n1,2,3\n2,2\n", None, "a.csv:3: 2 cells, the header has 3"),
    "repeated header name": ("frame,f0,f0\n1,2,3\n", None, "a.csv:1: column 'f0' appears twice"),
    "empty file": ("", None, "a.csv: empty file"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_an_error_naming_file_and_line(tiny_root, csv_dir, case):
    content, columns, expected = BAD_INPUTS[case]
    (csv_dir / "a.csv").write_text(content)
    with pytest.raises(ExtractError) as error:
        import_csv(tiny_root, csv_dir, "frame", columns=columns)
    assert expected in str(error.value)
    assert str(csv_dir / "a.csv") in str(error.value)


def test_a_column_missing_from_a_later_file_names_that_file(tiny_root, csv_dir):
    write_csv(csv_dir / "c.csv", range(1, N + 1), header=("frame", "f0", "g1"))
    with pytest.raises(ExtractError, match=r"c\.csv:1: no column 'f1' \(a\.csv has it"):
        import_csv(tiny_root, csv_dir, "frame")


@pytest.mark.parametrize("columns, words", [(["f0", "f0"], "more than once"), (["frame", "f0"], "frame column"),
                                            (["f0", ""], "empty column name")])
def test_bad_columns_option(tiny_root, csv_dir, columns, words):
    with pytest.raises(ExtractError, match=words):
        import_csv(tiny_root, csv_dir, "frame", columns=columns)


def test_a_rerun_writes_only_what_is_missing(tiny_root, csv_dir):
    import_csv(tiny_root, csv_dir, "frame")
    folder = tiny_root / "features" / "imported"
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npy")}
    (folder / "c.npy").unlink()
    (csv_dir / "a.csv").unlink()  # a finished video needs its CSV no more
    report = import_csv(tiny_root, csv_dir, "frame")
    assert report.written == ["c"]
    assert sorted(report.skipped) == sorted(set(VIDEOS) - {"c"})
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npy") if p.name != "c.npy"} == \
        {k: v for k, v in stamps.items() if k != "c.npy"}
    assert features(tiny_root, "c")[0].tolist() == [value(1, 0), value(1, 1)]
    assert not list(folder.glob(".*.tmp"))


def test_a_rerun_with_other_columns_or_into_another_commands_folder_is_refused(tiny_root, csv_dir):
    import_csv(tiny_root, csv_dir, "frame")
    with pytest.raises(ExtractError, match=r"columns: \['f0', 'f1'\] there, \['f1'\] now"):
        import_csv(tiny_root, csv_dir, "frame", columns=["f1"])
    with pytest.raises(ExtractError, match="holds features without extraction.json"):
        import_csv(tiny_root, csv_dir, "frame", name="visual")  # tiny_root's visual features


def test_cli_end_to_end(tiny_root, csv_dir, capsys):
    assert main(["import", "--data-root", str(tiny_root), "--csv", str(csv_dir), "--frame-column", "frame",
                 "--columns", "f1", "--name", "csvfeat", "--dtype", "float32"]) == 0
    dataset = open_dataset(tiny_root)
    assert dataset.modalities["csvfeat"] == 1
    x, present = dataset.videos["b_left"].features("csvfeat")
    assert x[:, 0].tolist() == [value(f, 1) for f in range(1, N + 1)] and present.all()
    assert "6 video(s) written" in capsys.readouterr().out


def test_cli_reports_bad_input_and_exits_1(tiny_root, csv_dir, capsys):
    (csv_dir / "b_left.csv").write_text("frame,f0,f1\n1,2,3\n1,2,3\n")
    assert main(["import", "--data-root", str(tiny_root), "--csv", str(csv_dir), "--frame-column", "frame"]) == 1
    assert "b_left.csv:3: frame 1 again" in capsys.readouterr().out.replace("\n", "")
