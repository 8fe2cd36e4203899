"""The subject rule on the release's real naming schemes, subject files, and folds that follow them."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from abaw.config import RunConfig
from abaw.cv import RunConflict, run_cv
from abaw.data import LABEL_DIR, load_dataset, open_dataset
from abaw.folds import FoldError, fingerprint, folds_path, load_or_make_folds, make_folds, read_fold_table
from abaw.subjects import default_subject
from conftest import SHAPE_CSV

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("videos, subject", [
    (["105"], "105"),
    (["10-60-1280x720"], "10-60-1280x720"),
    (["video59"], "video59"),
    (["video55_left", "video55_right"], "video55"),
    (["10-60-1280x720", "10-60-1280x720_right"], "10-60-1280x720"),   # the left side has no suffix
    (["135-24-1920x1080_left", "135-24-1920x1080_right"], "135-24-1920x1080"),
    ([f"video45_{i}" for i in range(1, 8)], "video45"),
    ([f"122-60-1920x1080-{i}" for i in range(1, 6)], "122-60-1920x1080"),
    (["video10_1_left", "video10_1_right"], "video10"),
])
def test_default_rule_joins_the_files_of_one_recording(videos, subject):
    assert {default_subject(v) for v in videos} == {subject}


@pytest.mark.parametrize("a, b", [
    ("105", "105-30-1280x720"),          # one id, two recordings (train and test in the release)
    ("122", "122-60-1920x1080-1"),
    ("video45_1", "video4_51"),
    ("video5", "video55_left"),
    ("left_video", "video"),
])
def test_default_rule_keeps_other_recordings_apart(a, b):
    assert default_subject(a) != default_subject(b)


def test_on_the_real_release_names_no_subject_spans_two_splits():
    shape = pd.read_csv(SHAPE_CSV, dtype={"video": str})
    subjects = shape.video.map(default_subject)
    assert subjects.nunique() == 559 and len(shape) == 594
    assert (shape.groupby(subjects)["split"].nunique() == 1).all()  # the official split keeps recordings whole


def test_folds_of_the_release_never_split_a_recording(release_root):
    dataset = open_dataset(release_root)
    assert len({v.subject for v in dataset.split("train", "val")}) == 411
    table = make_folds(dataset, 5, "grouped", 0)
    recording = table.video.map(default_subject)
    assert (table.groupby(recording)["fold"].nunique() == 1).all()
    parts = table[table.video.str.startswith("122-60-1920x1080")]
    assert len(parts) == 5 and parts.fold.nunique() == 1


def write_subjects(path: Path, rows, header="video,subject") -> Path:
    path.write_text("\n".join([header] + [",".join(r) for r in rows]) + "\n")
    return path


def test_a_subject_file_replaces_the_rule(tiny_root, tmp_path):
    rows = [("a", "alice"), ("b_left", "bob"), ("b_right", "carol"), ("c", "alice"), ("t1", "tina")]
    dataset = open_dataset(tiny_root, subjects=write_subjects(tmp_path / "s.csv", rows))
    subject = {v.name: v.subject for v in dataset.videos.values()}
    assert subject == {"a": "alice", "b_left": "bob", "b_right": "carol", "c": "alice", "t1": "tina", "t2": "t2"}
    assert "s.csv" in dataset.subject_rule
    assert dataset.subject_videos() == {"alice": ["a", "c"]}


def test_a_labelled_video_missing_from_the_subject_file_is_named(tiny_root, tmp_path):
    path = write_subjects(tmp_path / "s.csv", [("a", "x"), ("b_left", "y"), ("c", "z")])
    _, problems = load_dataset(tiny_root, subjects=path)
    assert [(p.path, p.message) for p in problems] == [
        (path, "train video 'b_right' has no subject: every train and validation video needs a row 'video,subject'")]


def test_a_malformed_subject_file_is_reported_by_line(tiny_root, tmp_path):
    path = write_subjects(tmp_path / "s.csv", [("a", "x"), ("b_left", ""), ("a", "y")])
    _, problems = load_dataset(tiny_root, subjects=path)
    lines = {p.line: p.message for p in problems if p.line is not None}
    assert "expected 'video,subject'" in lines[3] and "listed twice (first on line 2)" in lines[4]
    _, problems = load_dataset(tiny_root, subjects=tmp_path / "nope.csv")
    assert [p.message for p in problems] == ["subject file not found"]
    _, problems = load_dataset(tiny_root, subjects=write_subjects(tmp_path / "h.csv", [("a", "x")],
                                                                  header="name,person"))
    assert problems[0].line == 1 and "header" in problems[0].message
    _, problems = load_dataset(tiny_root, subjects=write_subjects(tmp_path / "e.csv", []))
    assert len(problems) == 1 and "no rows" in problems[0].message  # one problem, not one per video


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "run_cv.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_check_prints_the_subject_count_and_every_subject_of_several_videos(small_root, tmp_path):
    result = run_cli("--data-root", str(small_root), "--check")
    assert result.returncode == 0, result.stdout
    dataset = open_dataset(small_root)
    groups = dataset.subject_videos()
    assert f"subjects: {len(dataset.subjects)} (default" in result.stdout
    assert f"{len(groups)} made of more than one video" in result.stdout and len(groups) >= 3
    for subject, videos in groups.items():
        assert f"  {subject} (" in result.stdout and f"{len(videos)} videos): {' '.join(videos)}" in result.stdout
    missing = write_subjects(tmp_path / "s.csv", [(v.name, "p") for v in dataset.split("train")])
    result = run_cli("--data-root", str(small_root), "--check", "--subjects", str(missing))
    assert result.returncode == 1 and f"{missing}: val video" in result.stdout


def one_subject_per_video(dataset, path: Path) -> Path:
    """A subject file that undoes the default rule: each video its own subject (as abaw 0.1 nearly did)."""
    return write_subjects(path, [(v.name, v.name) for v in dataset.split("train", "val")])


def test_the_fold_fingerprint_covers_the_grouping(small_root, tmp_path):
    by_rule = open_dataset(small_root)
    by_file = open_dataset(small_root, subjects=one_subject_per_video(by_rule, tmp_path / "s.csv"))
    assert fingerprint(by_rule) != fingerprint(by_file)
    assert folds_path(by_rule, 3, "grouped", 0) != folds_path(by_file, 3, "grouped", 0)


def test_a_fold_table_made_under_another_grouping_is_refused(small_root, tmp_path):
    dataset = open_dataset(small_root)
    other = open_dataset(small_root, subjects=one_subject_per_video(dataset, tmp_path / "s.csv"))
    stale = make_folds(other, 3, "grouped", 0)  # e.g. made by an older rule, then copied or renamed
    path = folds_path(dataset, 3, "grouped", 0, tmp_path / "folds")
    path.parent.mkdir()
    stale.to_csv(path, index=False)
    with pytest.raises(FoldError, match="made under another subject grouping") as error:
        load_or_make_folds(dataset, 3, "grouped", 0, tmp_path / "folds")
    assert "default" in str(error.value) and str(path) in str(error.value)


def test_a_resumed_run_whose_fold_table_changed_is_refused(small_root, tmp_path):
    dataset = open_dataset(small_root)
    config = RunConfig(arch=["linear"], folds=3, epochs=1, window=200, hop=200, out=str(tmp_path / "run"))
    assert run_cv(config, dataset, folds_dir=tmp_path / "folds") == 0
    saved = read_fold_table(tmp_path / "run" / "folds.csv")
    moved = saved.copy()
    moved.loc[0, "fold"] = (moved.loc[0, "fold"] + 1) % 3  # the table the run was made with, by hand
    moved.to_csv(tmp_path / "run" / "folds.csv", index=False)
    before = (tmp_path / "run" / "folds.csv").read_bytes()
    with pytest.raises(RunConflict, match="differs from the fold table this run would use now") as error:
        run_cv(config, dataset, folds_dir=tmp_path / "folds")
    assert f"{saved.video[0]!r}: fold {moved.fold[0]} -> {saved.fold[0]}" in str(error.value)
    assert (tmp_path / "run" / "folds.csv").read_bytes() == before  # not overwritten
