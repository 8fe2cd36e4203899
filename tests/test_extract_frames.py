"""What every extractor shares: targets and frame counts, frame numbers from file names, NaN rows, resumable writes."""
import re

import numpy as np
import pytest

from abaw.data import LABEL_DIR, DataError
from abaw.extract import __main__ as cli
from abaw.extract.frames import (ExtractError, ExtractionReport, FeatureWriter, Target, extraction_targets, frame_images,
                                 frame_number, rows_for_frames, run_extraction)


def test_targets_are_every_video_with_its_annotation_or_sample_frame_count(tiny_root):
    sample = tiny_root / "CVPR_8th_ABAW_VA_test_set_sample.txt"
    lines = sample.read_text().splitlines()
    sample.write_text("\n".join(line for line in lines if not line.startswith("t2/00002.jpg")) + "\n")  # t2: frame 2 unlisted
    targets = {t.video: t for t in extraction_targets(tiny_root)}
    assert sorted(targets) == ["a", "b_left", "b_right", "c", "t1", "t2"]
    assert targets["a"] == Target("a", "train", 20) and targets["c"].split == "val"
    assert targets["t1"].n_frames == 20 and targets["t2"].n_frames == 20  # the last listed frame, 00020.jpg


def test_targets_need_no_features_but_a_sample_file(tiny_root):
    for path in (tiny_root / "features").rglob("*.npy"):
        path.unlink()
    assert len(extraction_targets(tiny_root)) == 6
    (tiny_root / "CVPR_8th_ABAW_VA_test_set_sample.txt").unlink()
    with pytest.raises(DataError, match="no test sample file"):
        extraction_targets(tiny_root)


def test_frame_numbers_come_from_file_names_not_listing_positions(tmp_path):
    for name in ("00001.jpg", "00002.jpg", "00004.jpg", "00010.JPG", "thumbs.db", "00003.txt", "00000.jpg"):
        (tmp_path / name).touch()
    assert sorted(frame_images(tmp_path)) == [1, 2, 4, 10]
    assert frame_number("video/00012.jpg") == 12 and frame_number("a.jpg") is None
    (tmp_path / "4.jpg").touch()
    with pytest.raises(ExtractError, match="00004.jpg and 4.jpg are both frame 4"):
        frame_images(tmp_path)


def test_rows_for_frames_put_nan_rows_where_frames_have_no_value():
    rows = rows_for_frames(5, np.array([1, 2, 4, 9]), np.array([[1.0], [2.0], [4.0], [9.0]]))
    assert rows.shape == (5, 1)
    assert rows[[0, 1, 3], 0].tolist() == [1.0, 2.0, 4.0]
    assert np.isnan(rows[[2, 4], 0]).all()  # frame 3 and 5 had no value; frame 9 is past the end


def test_the_writer_checks_rows_and_knows_finished_videos(tmp_path):
    writer = FeatureWriter(tmp_path, "visual", "float16")
    target = Target("105-30-1280x720", "train", 4)
    assert not writer.done(target)
    with pytest.raises(ValueError, match="one row per annotation frame"):
        writer.write(target, np.zeros((3, 2)))
    path = writer.write(target, np.ones((4, 2)))
    assert path == tmp_path / "features" / "visual" / "105-30-1280x720.npy"
    assert np.load(path).dtype == np.float16 and writer.done(target)
    assert not writer.done(Target("105-30-1280x720", "train", 5))  # a file for another frame count is redone
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_run_extraction_skips_finished_videos_and_counts_missing_frames(tmp_path):
    targets = [Target("a", "train", 3), Target("b", "test", 2)]
    writer = FeatureWriter(tmp_path, "x", "float32")
    calls = []

    def extract(target):
        calls.append(target.video)
        rows = np.ones((target.n_frames, 2))
        rows[0] = np.nan
        return rows

    first = run_extraction(targets, writer, extract, "x", settings={"command": "test"})
    assert calls == ["a", "b"] and first.written == ["a", "b"] and first.frames == 5 and first.missing == 2
    stamp = writer.path("a").stat().st_mtime_ns
    writer.path("b").unlink()
    second = run_extraction(targets, writer, extract, "x", settings={"command": "test"})
    assert calls == ["a", "b", "b"] and second.skipped == ["a"] and second.written == ["b"]
    assert writer.path("a").stat().st_mtime_ns == stamp


def test_report_rate():
    report = ExtractionReport(frames=300, seconds=2.0)
    assert report.frames_per_second == 150
def test_the_cli_names_bad_input_and_exits_1(tiny_root, capsys):
    (tiny_root / LABEL_DIR / "Train_Set" / "a.txt").write_text("valence,arousal\n0.1,oops\n")
    code = cli.main(["import", "--data-root", str(tiny_root), "--csv", str(tiny_root), "--frame-column", "frame"])
    assert code == 1 and "a.txt:2" in capsys.readouterr().out




def test_a_folder_written_with_other_settings_is_refused_not_skipped(tmp_path):
    targets = [Target("a", "train", 3)]
    writer = FeatureWriter(tmp_path, "audio", "float16")
    run_extraction(targets, writer, lambda t: np.ones((3, 39)), "mfcc", settings={"kind": "mfcc"})
    with pytest.raises(ExtractError, match="kind: 'mfcc' there, 'mel' now"):
        run_extraction(targets, writer, lambda t: np.ones((3, 64)), "mel", settings={"kind": "mel"})
    with pytest.raises(ExtractError, match="dtype: 'float16' there, 'float32' now"):
        run_extraction(targets, FeatureWriter(tmp_path, "audio", "float32"), lambda t: np.ones((3, 39)), "mfcc",
                       settings={"kind": "mfcc"})
    np.save(tmp_path / "features" / "other.npy", np.ones(2))
    (tmp_path / "features" / "theirs").mkdir()
    np.save(tmp_path / "features" / "theirs" / "a.npy", np.ones((3, 2)))
    with pytest.raises(ExtractError, match="without extraction.json"):
        run_extraction(targets, FeatureWriter(tmp_path, "theirs"), lambda t: np.ones((3, 2)), "x", settings={})


def test_the_cli_ends_with_the_check_of_the_new_modality(tiny_root, tmp_path, capsys, monkeypatch):
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    for video in ("a", "b_left", "b_right", "c", "t1", "t2"):
        (csv_dir / f"{video}.csv").write_text("frame,f0,f1\n1,0.5,0.25\n3,1.0,2.0\n")
    args = ["import", "--data-root", str(tiny_root), "--csv", str(csv_dir), "--frame-column", "frame", "--name", "au"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "Modalities" in out and re.search(r"│ au\s+│\s+2 │", out)  # the check's table, the new modality only
    assert "visual" not in out.split("Modalities")[1]
    import abaw.checks

    monkeypatch.setattr(abaw.checks, "check_dataset", lambda *a, **k: None)  # the check finds a problem
    assert cli.main(args) == 1
