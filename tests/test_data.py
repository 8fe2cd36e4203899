"""The Aff-Wild2 reader and validator: every bad-input case names its file and line."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from abaw.data import (FRAME_TOLERANCE, LABEL_DIR, DataError, explain_mismatch, image_location, load_dataset,
                       open_dataset, parse_label_file, valid_label_mask)
from conftest import write_labels

REPO = Path(__file__).resolve().parents[1]


def problems_of(root):
    _, problems = load_dataset(root)
    return problems


def only_problem(root):
    problems = problems_of(root)
    assert len(problems) == 1, problems
    return problems[0]


def test_valid_root_has_no_problems(tiny_root):
    dataset = open_dataset(tiny_root)
    assert {v.split for v in dataset.videos.values()} == {"train", "val", "test"}
    assert dataset.modalities == {"audio": 3, "visual": 8}
    record = dataset.videos["b_left"]
    assert record.subject == "b" and record.n_frames == 20 and record.labels.dtype == np.float32
    assert not record.label_mask[3] and record.label_mask.sum() == 19


def test_windows_line_endings_and_trailing_blank_line_are_valid(tmp_path):
    path = tmp_path / "v.txt"
    write_labels(path, [(0.1, 0.2), (-5, -5), (0.3, -0.4)], newline="\r\n", trailing="\r\n\r\n")
    labels, problems = parse_label_file(path)
    assert problems == []
    np.testing.assert_allclose(labels, [[0.1, 0.2], [-5, -5], [0.3, -0.4]])


@pytest.mark.parametrize("header, rows, line, words", [
    ("arousal,valence", [(0.1, 0.2)], 1, "header"),
    ("valence,arousal", [(0.1, 0.2), ("abc", 0.1)], 3, "non-numeric"),
    ("valence,arousal", [(0.1, 0.2), (0.5, 1.5)], 3, "outside [-1, 1]"),
    ("valence,arousal", [(0.1, 0.2), (-4, 0.0)], 3, "outside [-1, 1]"),
])
def test_bad_label_file_names_file_and_line(tiny_root, header, rows, line, words):
    path = tiny_root / LABEL_DIR / "Train_Set" / "a.txt"
    write_labels(path, rows + [(0.1, 0.2)] * (20 - len(rows)), header=header)  # 20 frames, as the features
    problem = only_problem(tiny_root)
    assert problem.path == path and problem.line == line and words in problem.message
    assert f"a.txt:{line}" in str(problem)


def test_empty_label_file(tiny_root):
    path = tiny_root / LABEL_DIR / "Train_Set" / "a.txt"
    path.write_text("")
    problem = only_problem(tiny_root)
    assert problem.path == path and "empty" in problem.message


def test_every_problem_is_listed_not_just_the_first(tiny_root):
    write_labels(tiny_root / LABEL_DIR / "Train_Set" / "a.txt", [("x", 0.1), (2, 0.1)] + [(0.1, 0.1)] * 18)
    write_labels(tiny_root / LABEL_DIR / "Validation_Set" / "c.txt", [(0.1, 0.1)] * 20, header="v,a")
    assert len(problems_of(tiny_root)) == 3


def test_video_in_two_splits(tiny_root):
    write_labels(tiny_root / LABEL_DIR / "Validation_Set" / "a.txt", [(0.1, 0.2)] * 20)
    problem = only_problem(tiny_root)
    assert problem.path.name == "a.txt" and "Validation_Set" in str(problem.path) and "also in" in problem.message


def test_test_video_without_features(tiny_root):
    missing = tiny_root / "features" / "audio" / "t2.npy"
    missing.unlink()
    problem = only_problem(tiny_root)
    assert problem.path == missing and "t2" in problem.message


def test_feature_file_with_wrong_dim(tiny_root):
    path = tiny_root / "features" / "visual" / "b_right.npy"
    np.save(path, np.zeros((20, 7), np.float32))
    problem = only_problem(tiny_root)
    assert problem.path == path and "dim 7" in problem.message


def test_feature_file_with_wrong_dtype(tiny_root):
    path = tiny_root / "features" / "visual" / "c.npy"
    np.save(path, np.zeros((20, 8), np.int64))
    problem = only_problem(tiny_root)
    assert problem.path == path and "int64" in problem.message


def test_sample_file_bad_row_names_line(tiny_root):
    path = tiny_root / "CVPR_8th_ABAW_VA_test_set_sample.txt"
    lines = path.read_text().splitlines()
    lines[4] = "t1/frame4.png,,"
    path.write_text("\n".join(lines) + "\n")
    problem = only_problem(tiny_root)
    assert problem.path == path and problem.line == 5


def test_a_mismatch_within_the_tolerance_is_aligned_and_reported(tiny_root):
    short = np.arange(17 * 8, dtype=np.float32).reshape(17, 8)  # 3 rows short of 20 frames
    np.save(tiny_root / "features" / "visual" / "a.npy", short)
    long = np.ones((22, 3), np.float32)
    np.save(tiny_root / "features" / "audio" / "c.npy", long)
    dataset = open_dataset(tiny_root)
    assert [(a.video, a.modality, a.rows, a.frames) for a in dataset.alignments] == [
        ("a", "visual", 17, 20), ("c", "audio", 22, 20)]
    assert "last row carried over 3 missing row(s)" in str(dataset.alignments[0])
    assert "2 surplus row(s) trimmed" in str(dataset.alignments[1])
    feats, present = dataset.videos["a"].features("visual")
    assert feats.shape == (20, 8) and present.all()
    np.testing.assert_array_equal(feats[17:], np.repeat(short[-1:], 3, axis=0))
    assert dataset.videos["c"].features("audio")[0].shape == (20, 3)


@pytest.mark.parametrize("video, rows", [("a", 12), ("b_left", 20 + FRAME_TOLERANCE + 1), ("t1", 12)])
def test_a_larger_mismatch_is_a_problem_naming_file_and_counts(tiny_root, video, rows):
    path = tiny_root / "features" / "visual" / f"{video}.npy"
    np.save(path, np.ones((rows, 8), np.float32))  # t1: a test video, 20 frames by the sample file
    problem = only_problem(tiny_root)
    assert problem.path == path
    assert f"{rows} feature rows for 20 frames" in problem.message
    assert f"ratio {rows / 20:.3f}" in problem.message and "likely cause" in problem.message


def test_a_test_video_has_the_sample_files_frame_count(tiny_root):
    np.save(tiny_root / "features" / "audio" / "t2.npy", np.ones((23, 3), np.float32))
    dataset = open_dataset(tiny_root)
    assert dataset.videos["t2"].n_frames == 20  # not the longer feature file
    assert [(a.video, a.rows, a.frames) for a in dataset.alignments] == [("t2", 23, 20)]


@pytest.mark.parametrize("video, rows, frames, cause", [
    ("10-30-1280x720", 3000, 900, "100 rows/s for a 30 fps video"),      # audio features at 100 Hz
    ("video7", 750, 900, "25 rows/s for a 30 fps video"),              # a 25 fps stream of a 30 fps video
    ("12-60-1920x1080", 450, 900, "30 rows/s for a 60 fps video"),
    ("105", 540, 900, "frames without a face dropped"),                # 40% short
    ("105", 1300, 900, "another rate, or for another video"),
])
def test_mismatch_messages_suggest_the_likely_cause(video, rows, frames, cause):
    assert cause in explain_mismatch(video, rows, frames)


def test_dropped_no_face_rows_are_named_when_the_crops_show_it(tmp_path):
    crops = tmp_path / "cropped_aligned" / "video3"
    crops.mkdir(parents=True)
    for frame in (1, 2, 5, 6):  # frames 3 and 4 had no face: no image
        (tmp_path / "cropped_aligned" / image_location("video3", frame)).touch()
    message = explain_mismatch("video3", 4, 6, crops)
    assert "4 face images, as many as the file has rows" in message


def test_valid_label_mask():
    labels = np.array([[0.1, 0.2], [-5, 0.3], [0.3, -5], [-5, -5]])
    assert valid_label_mask(labels).tolist() == [True, False, False, False]


def test_nan_rows_are_zero_filled_and_masked(tiny_root):
    array = np.ones((20, 8), np.float32)
    array[4:7] = np.nan
    np.save(tiny_root / "features" / "visual" / "a.npy", array)
    feats, present = open_dataset(tiny_root).videos["a"].features("visual", 2, 10)
    assert feats.shape == (8, 8)
    assert present.tolist() == [True, True, False, False, False, True, True, True]
    assert np.all(feats[2:5] == 0)


def test_features_read_only_the_window(tiny_root, monkeypatch):
    """A window costs one read of its own rows (the header is parsed once per file), never the file."""
    import abaw.data as data_mod

    record = open_dataset(tiny_root).videos["a"]
    whole = np.load(record.feature_paths["visual"])
    loads, reads = [], []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: loads.append(k.get("mmap_mode")) or real_load(*a, **k))

    class Spy:
        def __init__(self, *args, **kwargs):
            self.file = open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def __getattr__(self, name):
            return getattr(self.file, name)

        def readinto(self, buffer):
            reads.append(memoryview(buffer).nbytes)
            return self.file.readinto(buffer)

    monkeypatch.setattr(data_mod, "open", Spy, raising=False)
    for start in (0, 7, 15):
        window, present = record.features("visual", start, start + 5)
        np.testing.assert_array_equal(window, np.nan_to_num(whole[start:start + 5], nan=0.0))
    assert loads == []  # no np.load at all: the header is parsed by npy_layout, the rows read directly
    assert reads == [5 * whole.shape[1] * whole.itemsize] * 3


@pytest.mark.parametrize("kind", ["float16", "fortran", "past_end"])
def test_features_other_layouts_read_the_same(tiny_root, kind):
    """float16 files, Fortran-order files (read through a memory map) and rows past the file's end
    (the last row carried), every frame and every k-th, give what np.load would."""
    path = tiny_root / "features" / "visual" / "a.npy"
    values = np.load(path)
    if kind == "float16":
        np.save(path, values.astype(np.float16))
    elif kind == "fortran":
        np.save(path, np.asfortranarray(values))
    record = open_dataset(tiny_root).videos["a"]
    stored = np.load(path)
    start, stop = (14, 22) if kind == "past_end" else (3, 11)
    rows = np.clip(np.arange(start, stop), 0, len(stored) - 1)
    window, present = record.features("visual", start, stop)
    np.testing.assert_array_equal(window, np.nan_to_num(stored[rows].astype(np.float32), nan=0.0))
    np.testing.assert_array_equal(present, ~np.isnan(stored[rows]).any(axis=1))
    # every k-th row, also past the end: rows 17, 19, 19 span exactly 3 rows, yet are not 17, 18, 19
    for begin, end, step in ((1, 20, 2), (17, 23, 2), (13, 25, 3), (0, 20, 7)):
        rows = np.clip(np.arange(begin, end, step), 0, len(stored) - 1)
        strided, _ = record.features("visual", begin, end, step=step)
        np.testing.assert_array_equal(strided, np.nan_to_num(stored[rows].astype(np.float32), nan=0.0))


def test_features_see_a_rewritten_file(tiny_root):
    """The cached header goes with the file's size and mtime: a file rewritten with another width
    and dtype is read as it is now, not through the old header."""
    record = open_dataset(tiny_root).videos["a"]
    path = record.feature_paths["visual"]
    record.features("visual", 0, 5)
    wider = np.arange(20 * 12, dtype=np.float64).reshape(20, 12)
    np.save(path, wider)
    window, _ = record.features("visual", 2, 6)
    np.testing.assert_array_equal(window, wider[2:6].astype(np.float32))


def test_features_of_a_file_cut_short_after_opening_name_it(tiny_root):
    record = open_dataset(tiny_root).videos["a"]
    path = record.feature_paths["visual"]
    record.features("visual", 0, 5)  # the header is read and kept
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 4 * 8 * 6])  # six rows of 8 float32 values gone
    with pytest.raises(DataError, match=r"a\.npy.*shorter than its header"):
        record.features("visual", 10, 20)


def test_open_dataset_raises_with_all_problems(tiny_root):
    (tiny_root / "features" / "visual" / "t1.npy").unlink()
    with pytest.raises(DataError, match="t1.npy"):
        open_dataset(tiny_root)


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "run_cv.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_check_cli_prints_summary_and_exits_zero(tiny_root):
    result = run_cli("--data-root", str(tiny_root), "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    for word in ("train", "val", "test", "visual", "audio", "subjects"):
        assert word in result.stdout


def test_check_cli_lists_every_problem_and_exits_nonzero(tiny_root):
    write_labels(tiny_root / LABEL_DIR / "Train_Set" / "a.txt", [(0.1, 0.2)] * 19 + [(0.1, "oops")])
    np.save(tiny_root / "features" / "visual" / "c.npy", np.zeros((20, 5), np.float32))
    result = run_cli("--data-root", str(tiny_root), "--check")
    assert result.returncode != 0
    assert "a.txt:21" in result.stdout and "c.npy" in result.stdout and "2 problem(s)" in result.stdout


def test_check_cli_fails_a_feature_file_40_percent_short(tiny_root):
    path = tiny_root / "features" / "visual" / "b_right.npy"
    np.save(path, np.ones((12, 8), np.float32))
    result = run_cli("--data-root", str(tiny_root), "--check")
    assert result.returncode == 1
    assert f"{path}: 12 feature rows for 20 frames (ratio 0.600" in result.stdout


def test_check_cli_reports_an_aligned_file(tiny_root):
    path = tiny_root / "features" / "visual" / "b_right.npy"
    np.save(path, np.ones((17, 8), np.float32))
    result = run_cli("--data-root", str(tiny_root), "--check")
    assert result.returncode == 0, result.stdout
    assert f"{path}: 17 rows for 20 frames; last row carried over 3 missing row(s)" in result.stdout


def test_a_listed_test_video_missing_from_the_sample_file_is_a_problem(tiny_root):
    sample = tiny_root / "CVPR_8th_ABAW_VA_test_set_sample.txt"
    sample.write_text("\n".join(line for line in sample.read_text().splitlines() if not line.startswith("t2/")) + "\n")
    problem = only_problem(tiny_root)
    assert problem.path == sample and "'t2'" in problem.message and "no rows in the sample file" in problem.message


def test_without_a_sample_file_the_feature_files_agree_on_the_frame_count(tiny_root):
    (tiny_root / "CVPR_8th_ABAW_VA_test_set_sample.txt").unlink()
    audio = tiny_root / "features" / "audio" / "t1.npy"
    np.save(audio, np.ones((60, 3), np.float32))  # written at 3x the frame rate
    problem = only_problem(tiny_root)  # the odd file is the one reported, not the visual file
    assert problem.path == audio and "60 feature rows for 20 frames" in problem.message
