"""Hostile inputs to the data layer: each one is a problem naming its file (and line or row), never a
traceback and never a silent NaN or inf reaching a model."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from abaw.data import FEATURE_LIMIT, LABEL_DIR, DataError, load_dataset, open_dataset
from conftest import write_labels

REPO = Path(__file__).resolve().parents[1]


def only_problem(root, **kwargs):
    _, problems = load_dataset(root, **kwargs)
    assert len(problems) == 1, problems
    return problems[0]


@pytest.mark.parametrize("cell", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999"])
def test_a_nan_or_inf_label_names_file_and_line(tiny_root, cell):
    path = tiny_root / LABEL_DIR / "Train_Set" / "a.txt"
    write_labels(path, [(0.1, 0.2), (-5, -5), (0.3, cell)] + [(0.1, 0.2)] * 17)  # -5 is no label, and valid
    problem = only_problem(tiny_root)
    assert problem.path == path and problem.line == 4
    assert f"arousal is {cell!r}, not a finite number" in problem.message and "a.txt:4" in str(problem)


def _corrupt(root, value, row=7, column=2, video="a"):
    path = root / "features" / "visual" / f"{video}.npy"
    array = np.load(path)
    array[row, column] = value
    array[12] = np.nan  # a no-face row: legal, and must not hide the bad value from the scan
    np.save(path, array)
    return path


@pytest.mark.parametrize("value, kind", [(np.inf, "infinite"), (-np.inf, "infinite"),
                                         (1e30, "absurd (|x| > 1e+06)"), (-3e6, "absurd (|x| > 1e+06)")])
def test_a_bad_feature_value_is_found_by_the_scan_naming_file_and_row(tiny_root, value, kind):
    path = _corrupt(tiny_root, value)
    problem = only_problem(tiny_root, scan_values=True)
    assert problem.path == path and problem.row == 7
    assert f"{kind} feature value {value:g} in column 2" in problem.message
    assert f"{path} (row 7): " in str(problem)


def test_nan_rows_and_large_real_values_pass_the_scan(tiny_root):
    _corrupt(tiny_root, FEATURE_LIMIT * 0.9)  # big, yet a value some feature could hold
    assert load_dataset(tiny_root, scan_values=True)[1] == []


@pytest.mark.parametrize("value", [np.inf, 1e30])
def test_a_window_holding_a_bad_value_raises_naming_file_and_row(tiny_root, value):
    """Without the scan (a training run), the value is caught as its window is read, before any model."""
    path = _corrupt(tiny_root, value)
    video = open_dataset(tiny_root).videos["a"]  # headers only: no problem yet
    assert video.features("visual", 0, 7)[0].shape == (7, 8)  # windows without it still read
    with pytest.raises(DataError) as caught:
        video.features("visual", 4, 10)
    [problem] = caught.value.problems
    assert problem.path == path and problem.row == 7 and str(path) in str(caught.value)
    assert pickle.loads(pickle.dumps(caught.value)).problems == [problem]  # crosses to joblib's parent whole


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_inf_in_a_float16_feature_file_is_caught_by_the_scan_and_the_window(tiny_root, value):
    """float16 is the extractors' default storage: 1e6 itself overflows float16, so the check must not
    compare in float16 (there inf <= float16(1e6) = inf would hold)."""
    path = tiny_root / "features" / "visual" / "a.npy"
    array = np.load(path).astype(np.float16)
    array[7, 2] = value
    array[12] = np.nan
    np.save(path, array)
    problem = only_problem(tiny_root, scan_values=True)
    assert problem.path == path and problem.row == 7 and "infinite feature value" in problem.message
    with pytest.raises(DataError) as caught:
        open_dataset(tiny_root).videos["a"].features("visual", 4, 10)
    assert caught.value.problems[0].row == 7


def test_a_float64_value_beyond_float32_is_named_not_cast_to_inf(tiny_root):
    path = tiny_root / "features" / "audio" / "c.npy"
    array = np.zeros((20, 3))
    array[5, 0] = 1e39
    np.save(path, array)
    with pytest.raises(DataError, match=r"absurd \(\|x\| > 1e\+06\) feature value 1e\+39"):
        open_dataset(tiny_root).videos["c"].features("audio")


def test_a_npy_of_random_bytes_names_the_file(tiny_root):
    path = tiny_root / "features" / "audio" / "b_left.npy"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    problem = only_problem(tiny_root)
    assert problem.path == path and "not a NumPy .npy file" in problem.message


def test_a_truncated_npy_names_the_file(tiny_root):
    path = tiny_root / "features" / "audio" / "b_left.npy"
    path.write_bytes(path.read_bytes()[:-40])
    problem = only_problem(tiny_root)
    assert problem.path == path and "cannot read .npy" in problem.message


def test_a_utf16_label_file_with_its_bom_is_read(tiny_root):
    """The BOM makes UTF-16 unambiguous, and Windows tools write it: decoded, not refused."""
    path = tiny_root / LABEL_DIR / "Validation_Set" / "c.txt"
    before = open_dataset(tiny_root).videos["c"].labels
    path.write_text(path.read_text(), encoding="utf-16")  # BOM + UTF-16 LE
    assert path.read_bytes()[:2] == b"\xff\xfe"
    np.testing.assert_array_equal(open_dataset(tiny_root).videos["c"].labels, before)


@pytest.mark.parametrize("data, line, words", [
    ("valence,arousal\n0.1,0.2\n".encode("utf-16-le"), 1, "NUL character: UTF-16 without a byte-order mark"),
    (b"valence,arousal\n0.1,0.2\n0.\xe9,0.1\n", 3, "not UTF-8 text"),
    (b"\xff\xfe" + "valence,arousal\n0.1".encode("utf-16-le") + b"\x00", 2, "not UTF-16 text"),
])
def test_an_undecodable_label_file_names_file_and_line(tiny_root, data, line, words):
    path = tiny_root / LABEL_DIR / "Train_Set" / "a.txt"
    path.write_bytes(data)
    problem = only_problem(tiny_root)
    assert problem.path == path and problem.line == line and words in problem.message


@pytest.mark.parametrize("edit, words", [
    (lambda rows: rows[:5] + [rows[6], rows[5]] + rows[7:], "frame 5 of video 't1' goes backwards after frame 6"),
    (lambda rows: rows[:6] + ["t1/5.jpg,,"] + rows[6:], "duplicate frame: frame 5 of video 't1' again"),
])
def test_sample_frames_going_backwards_or_repeating_name_file_and_line(tiny_root, edit, words):
    path = tiny_root / "CVPR_8th_ABAW_VA_test_set_sample.txt"
    rows = path.read_text().splitlines()  # rows[k] is t1's frame k, on line k + 1
    path.write_text("\n".join(edit(rows)) + "\n")
    problem = only_problem(tiny_root)
    assert problem.path == path and problem.line == 7 and words in problem.message
    assert "line 6)" in problem.message  # where the earlier frame is


def run_check(root):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "run_cv.py"), "--data-root", str(root), "--check"],
                          capture_output=True, text=True, cwd=REPO, timeout=120, env=env)


def test_check_cli_scans_feature_values(tiny_root):
    assert "every file scanned, no ±inf and no |x| > 1e+06" in run_check(tiny_root).stdout
    path = _corrupt(tiny_root, np.inf, video="t2")
    result = run_check(tiny_root)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 problem(s)" in result.stdout and "Traceback" not in result.stderr
    assert f"{path} (row 7): infinite feature value inf in column 2" in result.stdout


def test_a_run_stops_with_an_error_naming_the_file_not_a_traceback(tiny_root, tmp_path, capsys, monkeypatch):
    """No --check, so no scan: the first window holding the value stops the run before a model sees it."""
    from abaw.cli import run_cv_main

    monkeypatch.chdir(tmp_path)  # the fold table goes to ./folds: never into the repository

    path = _corrupt(tiny_root, 1e30, video="b_left")
    code = run_cv_main(["--data-root", str(tiny_root), "--arch", "context_ridge", "--folds", "2",
                        "--device", "cpu", "--out", str(tmp_path / "run")])
    assert code == 2
    assert f"error: 1 problem(s) in the dataset:\n  {path} (row 7): absurd" in capsys.readouterr().out
