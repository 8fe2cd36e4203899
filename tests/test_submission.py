"""Run-folder readers, the submission writer and validator, and make_submission.py end to end.

The run folders here are synthetic, in the exact layout the CV engine writes (abaw/runs.py): fold
models are noisy, shrunken copies of the true labels of a tiny demo dataset.
"""
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from abaw import demo
from abaw.data import open_dataset, parse_sample_file
from abaw.ensemble import LEARNED_MERGES, make_merger, nested_predict, score_videos, stack_members
from abaw.honest import fold_merged
from abaw.runs import Run, RunError, load_inputs, read_oof, read_predictions, write_predictions
from abaw.submission import (SubmissionExists, carry_nearest, check_submission, main, read_submission,
                             sample_values, write_submission)

TINY = demo.DemoSpec(n_train=6, n_val=4, n_test=3, max_frames=500)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory) -> Path:
    return demo.generate(tmp_path_factory.mktemp("tiny") / "demo", TINY)


def noisy_copy(rng, labels, noise=0.35, shrink=0.7):
    """A fold model's prediction: the labels shrunk, shifted per video, plus its own per-frame noise."""
    clean = np.where(labels == -5, 0.0, labels)
    return shrink * clean + rng.normal(0, 0.05, size=2) + rng.normal(0, noise, size=labels.shape)


def write_run(path: Path, root: Path, archs=("tcn", "mamba_va"), folds=3, fold_mode="grouped", seed=0,
              data_root="explicit") -> Path:
    """A run folder in the engine's layout, with every file the readers use."""
    rng = np.random.default_rng(seed)
    dataset = open_dataset(root)
    truth = demo.load_ground_truth(root)
    cv_splits = ("train",) if fold_mode == "holdout_val" else ("train", "val")
    cv_videos = dataset.split(*cv_splits)
    held_out = dataset.split("val") if fold_mode == "holdout_val" else []
    subjects = sorted({v.subject for v in cv_videos})
    fold_of = {v.name: subjects.index(v.subject) % folds for v in cv_videos}
    path.mkdir(parents=True)
    config = {"data_root": str(root) if data_root == "explicit" else data_root, "arch": list(archs),
              "folds": folds, "fold_mode": fold_mode, "seed": seed}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    rows = ["video,subject,fold"] + [f"{v.name},{v.subject},{fold_of[v.name]}" for v in cv_videos]
    rows += [f"{v.name},{v.subject},-1" for v in held_out]
    (path / "folds.csv").write_text("\n".join(rows) + "\n")
    for arch in archs:
        for k in range(folds):
            (path / arch / f"fold{k}").mkdir(parents=True)
            (path / arch / f"fold{k}" / "metrics.json").write_text("{}\n")
        oof = {v.name: noisy_copy(rng, v.labels) for v in cv_videos}
        write_predictions(path / arch / "oof.csv", oof, fold=fold_of, masks={v.name: v.label_mask for v in cv_videos})
        for k in range(folds):
            write_predictions(path / arch / "test" / f"fold{k}.csv",
                              {name: noisy_copy(rng, labels) for name, labels in truth.items()})
            if held_out:
                write_predictions(path / arch / "holdout" / f"fold{k}.csv",
                                  {v.name: noisy_copy(rng, v.labels) for v in held_out})
    (path / "summary.csv").write_text("arch,fold,ccc_v,ccc_a,ccc_mean\n")
    return path


@pytest.fixture(scope="module")
def grouped_run(tiny_demo, tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("runs") / "grouped", tiny_demo)


# ---------------------------------------------------------------------------------------------
# Run readers and write_predictions


def test_write_predictions_round_trips_with_six_decimals_and_one_based_frames(tmp_path):
    values = {"v1": np.array([[0.1234567, -0.5], [0.25, 1.0], [np.nan, np.nan]]), "v2": np.array([[0.0, 0.0]])}
    masks = {"v1": np.array([True, True, False]), "v2": np.array([True])}
    write_predictions(tmp_path / "oof.csv", values, fold={"v1": 0, "v2": 1}, masks=masks)
    lines = (tmp_path / "oof.csv").read_text().splitlines()
    assert lines[:3] == ["video,frame,valence,arousal,fold", "v1,1,0.123457,-0.500000,0", "v1,2,0.250000,1.000000,0"]
    assert list(tmp_path.iterdir()) == [tmp_path / "oof.csv"]  # no temporary file left behind
    predictions, folds = read_oof(tmp_path / "oof.csv", {"v1": 3, "v2": 1})
    assert folds == {"v1": 0, "v2": 1}
    np.testing.assert_allclose(predictions["v1"][:2], [[0.123457, -0.5], [0.25, 1.0]])
    assert np.isnan(predictions["v1"][2]).all()


def test_write_predictions_refuses_nan_in_written_frames(tmp_path):
    with pytest.raises(ValueError, match="'v1' frame 2"):
        write_predictions(tmp_path / "t.csv", {"v1": np.array([[0.0, 0.0], [np.nan, 0.0]])})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("body, message", [
    ("video,frame,valence,arousal\nv,1,0.1,0.2\nv,1,0.1,0.2\n", r"t.csv:3: frame listed twice"),
    ("video,frame,valence,arousal\nv,0,0.1,0.2\n", r"t.csv:2: frame numbers start at 1"),
    ("video,frame,valence,arousal\nv,1,0.1,0.2\nv,2,abc,0.2\n", r"t.csv:3: missing or non-numeric valence"),
    ("video,frame,valence\nv,1,0.1\n", r"t.csv:1: expected header"),
    ("video,frame,valence,arousal\nv,1,0.1,0.2\nv,9,0.1,0.2\n", r"t.csv:3: frame beyond the video's 5 frames"),
])
def test_prediction_file_errors_name_the_file_and_line(tmp_path, body, message):
    (tmp_path / "t.csv").write_text(body)
    with pytest.raises(RunError, match=message):
        read_predictions(tmp_path / "t.csv", {"v": 5})


def test_run_lists_archs_and_folds_and_reads_predictions(grouped_run, tiny_demo):
    run = Run.open(grouped_run)
    assert run.archs == ["tcn", "mamba_va"] and run.folds("tcn") == [0, 1, 2]
    assert run.fold_mode == "grouped" and not run.is_demo and len(run.config_hash) == 12
    dataset = open_dataset(tiny_demo)
    n_frames = {n: v.n_frames for n, v in dataset.videos.items()}
    oof, fold_of = run.read_oof("tcn", n_frames)
    assert set(oof) == {v.name for v in dataset.split("train", "val")}
    for name, prediction in oof.items():
        assert prediction.shape == (n_frames[name], 2)
        assert (np.isfinite(prediction).all(axis=1) == dataset.videos[name].label_mask).all()
    test = run.read_test("tcn", n_frames)
    assert sorted(test) == [0, 1, 2] and set(test[0]) == {v.name for v in dataset.split("test")}
    assert run.read_holdout("tcn") == {}


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(RunError, match="config.yaml: missing"):
        Run.open(tmp_path)


def test_an_unfinished_fold_is_refused_not_skipped(tiny_demo, tmp_path):
    run = write_run(tmp_path / "run", tiny_demo, archs=("tcn",))
    (run / "tcn" / "fold1" / "metrics.json").unlink()
    with pytest.raises(RunError, match=r"fold\(s\) \[1\] not finished"):
        Run.open(run).folds("tcn")


# ---------------------------------------------------------------------------------------------
# Writer and validator


@pytest.fixture
def sample(tiny_demo):
    return open_dataset(tiny_demo).sample


def truth_predictions(root):
    return {name: np.where(labels == -5, 0.0, labels).astype(np.float64) for name, labels in
            demo.load_ground_truth(root).items()}


def test_writer_round_trips_through_the_validator(tiny_demo, sample, tmp_path):
    predictions = truth_predictions(tiny_demo)
    submission = write_submission(predictions, sample, tmp_path / "sub", {"merge": {"name": "test"}})
    assert check_submission(submission.file, sample) == []
    lines = submission.file.read_text().splitlines()
    assert lines[0] == "image_location,valence,arousal" and len(lines) == len(sample.image_locations) + 1
    assert [line.split(",")[0] for line in lines[1:]] == sample.image_locations
    read_back = read_submission(submission.file)
    for video, values in predictions.items():
        np.testing.assert_allclose(read_back[video], values, atol=5e-7)
    with zipfile.ZipFile(submission.zip) as archive:
        assert archive.namelist() == ["predictions.txt"]
        assert archive.read("predictions.txt") == submission.file.read_bytes()
    manifest = json.loads((tmp_path / "sub" / "manifest.json").read_text())
    assert manifest["rows"] == len(sample.image_locations) and manifest["merge"] == {"name": "test"}
    assert {"created", "abaw_version", "sha256"} <= set(manifest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]  # no staging folder left


def test_every_listed_frame_gets_the_nearest_prediction_clipped(tiny_demo, sample, tmp_path):
    predictions = truth_predictions(tiny_demo)
    video = sample.videos[0]
    short = predictions[video][:-7].copy() * 3  # ends 7 frames early; values beyond [-1, 1]
    short[10:13] = np.nan  # frames without a prediction inside the video
    predictions[video] = short
    submission = write_submission(predictions, sample, tmp_path / "sub")
    assert check_submission(submission.file, sample) == []
    written = read_submission(submission.file)[video]
    np.testing.assert_allclose(written[-7:], np.clip(np.repeat(short[-1:], 7, axis=0), -1, 1), atol=5e-7)
    np.testing.assert_allclose(written[10:13], np.clip(short[[9, 9, 13]], -1, 1), atol=5e-7)  # tie -> earlier
    assert submission.manifest["frames_carried_from_nearest_prediction"] == 10
    assert np.abs(written).max() <= 1.0


def test_carry_nearest_prefers_the_earlier_frame_on_a_tie():
    predictions = np.array([[0.1, 0.1], [np.nan, np.nan], [0.3, 0.3]])
    values, carried = carry_nearest(predictions, np.array([1, 2, 3, 4, 9]))
    np.testing.assert_array_equal(values[:, 0], [0.1, 0.1, 0.3, 0.3, 0.3])
    assert carried == 3


def test_a_test_video_without_predictions_is_an_error(tiny_demo, sample, tmp_path):
    predictions = truth_predictions(tiny_demo)
    del predictions[sample.videos[0]]
    with pytest.raises(ValueError, match="no predictions for 1 test video"):
        write_submission(predictions, sample, tmp_path / "sub")
    assert not (tmp_path / "sub").exists()


def test_per_video_format(tiny_demo, sample, tmp_path):
    submission = write_submission(truth_predictions(tiny_demo), sample, tmp_path / "sub", per_video=True)
    videos = list(dict.fromkeys(sample.videos.tolist()))
    assert sorted(p.name for p in submission.file.iterdir()) == sorted(f"{v}.txt" for v in videos)
    lines = (submission.file / f"{videos[0]}.txt").read_text().splitlines()
    assert lines[0] == "valence,arousal" and len(lines) == 1 + sample.frames_per_video()[videos[0]]
    with zipfile.ZipFile(submission.zip) as archive:
        assert sorted(archive.namelist()) == sorted(f"{v}.txt" for v in videos)


def test_refuses_to_overwrite_unless_asked(tiny_demo, sample, tmp_path):
    predictions = truth_predictions(tiny_demo)
    first = write_submission(predictions, sample, tmp_path / "sub")
    before = first.file.read_bytes()
    with pytest.raises(SubmissionExists, match="--overwrite"):
        write_submission({k: v * 0 for k, v in predictions.items()}, sample, tmp_path / "sub")
    assert first.file.read_bytes() == before
    second = write_submission({k: v * 0 for k, v in predictions.items()}, sample, tmp_path / "sub", overwrite=True)
    assert second.file.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


@pytest.fixture
def valid_lines(tiny_demo, sample, tmp_path):
    submission = write_submission(truth_predictions(tiny_demo), sample, tmp_path / "valid")
    return submission.file.read_text().splitlines()


def _edit(lines, kind):
    lines = list(lines)
    if kind == "header":
        lines[0] = "image,valence,arousal"
    elif kind == "missing":
        del lines[5]
    elif kind == "extra":
        lines.append("nosuchvideo/00001.jpg,0.1,0.1")
    elif kind == "duplicate":
        lines.insert(6, lines[5])
    elif kind == "order":
        lines[5], lines[6] = lines[6], lines[5]
    elif kind == "nan":
        lines[5] = lines[5].rsplit(",", 1)[0] + ",nan"
    elif kind == "range":
        lines[5] = lines[5].split(",")[0] + ",1.5,0.0"
    elif kind == "cells":
        lines[5] = lines[5] + ",0.3"
    return lines


@pytest.mark.parametrize("kind, expected", [
    ("header", [(1, "header must be")]),
    ("missing", [(6, "missing frame"), (None, "rows, the sample")]),
    ("extra", [(None, "is not in the sample file"), (None, "rows, the sample")]),
    ("duplicate", [(7, "duplicate frame"), (None, "rows, the sample")]),
    ("order", [(7, "out of order")]),
    ("nan", [(6, "arousal is nan, not a finite number")]),
    ("range", [(6, "valence 1.5 outside [-1, 1]")]),
    ("cells", [(6, "expected 3 cells"), (6, "missing frame")]),
])
def test_validator_names_each_problem_and_its_line(valid_lines, sample, tmp_path, kind, expected):
    path = tmp_path / "edited.txt"
    path.write_text("\n".join(_edit(valid_lines, kind)) + "\n")
    problems = check_submission(path, sample)
    assert len(problems) == len(expected), problems
    for problem, (line, text) in zip(problems, expected):
        assert text in problem.message
        if line is not None:
            assert problem.line == line
    if kind == "extra":
        assert problems[0].line == len(valid_lines) + 1
    assert main(["--check", str(path), "--sample", str(sample.path)]) == 1


def test_check_cli_accepts_a_valid_file(valid_lines, sample, tmp_path, capsys):
    path = tmp_path / "ok.txt"
    path.write_text("\r\n".join(valid_lines) + "\r\n")  # Windows line endings are fine
    assert main(["--check", str(path), "--sample", str(sample.path)]) == 0
    assert "OK" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# make_submission.py end to end


def _single_fold_test_average(rows, run_name):
    """The 'average score' rows of the single fold models on the demo test ground truth."""
    return [r["mean"] for r in rows if r["member"].startswith(run_name) and r["kind"] == "fold_average"
            and r["source"] == "test"]


@pytest.mark.parametrize("merge", ["ccc_centering", "weighted_calibrated"])
def test_merged_submission_scores_at_least_the_mean_of_single_fold_models(grouped_run, tiny_demo, tmp_path, merge):
    """Done-when of issue #5, on synthetic fold predictions (the engine adds the real-run version)."""
    out = tmp_path / f"sub_{merge}"
    assert main(["--runs", str(grouped_run), "--merge", merge, "--post", "none", "--out", str(out), "--report"]) == 0
    sample = parse_sample_file(next(tiny_demo.glob("*test_set_sample*")))[0]
    assert check_submission(out / "predictions.txt", sample) == []
    merged = score_videos(read_submission(out / "predictions.txt"), demo.load_ground_truth(tiny_demo))["mean"]
    rows = [r for r in _read_report(out / "report.csv")]
    single = _single_fold_test_average(rows, "grouped")
    assert len(single) == 2  # one per architecture
    assert merged >= np.mean(single) + 0.05
    assert float(rows[-1]["mean"]) == pytest.approx(merged, abs=1e-5)  # the report's submission row is this file
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["arch"] for m in manifest["members"]] == ["tcn", "mamba_va"]
    assert manifest["merge"]["name"] == merge
    assert manifest["runs"][0]["config_hash"] == Run.open(grouped_run).config_hash
    if merge == "weighted_calibrated":
        assert manifest["merge"]["fold_merge"] == "mean" and len(manifest["merge"]["learned"]["weights"]) == 2


def _labelled_std(predictions, labels):
    """Per-dimension std of the predictions over all labelled frames of the videos, concatenated."""
    values = np.concatenate([predictions[v] for v in predictions])
    target = np.concatenate([labels[v] for v in predictions])
    return values[(target != -5).all(axis=1) & np.isfinite(values).all(axis=1)].std(axis=0)


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory) -> Path:
    """A synthetic run whose test set, like its OOF, spans many recordings, so their label spreads are alike
    (TINY's 3 test videos are the parts of one recording)."""
    root = demo.generate(tmp_path_factory.mktemp("wide") / "demo",
                         demo.DemoSpec(n_train=12, n_val=4, n_test=12, max_frames=500))
    return write_run(tmp_path_factory.mktemp("runs") / "wide", root)


@pytest.mark.parametrize("merge", LEARNED_MERGES)
def test_a_learned_submission_has_the_spread_of_the_predictor_the_report_scored(wide_run, tmp_path, merge):
    """Issue #10: within 5% of the std of the nested OOF learned merge, per dimension.

    The fold models of write_run disagree (independent noise), so a fold mean varies less than one
    fold model; through the scale fitted on OOF (one fold model per frame) it comes out shrunk.
    """
    grouped_run = wide_run
    inputs = load_inputs([str(grouped_run)])
    oof = stack_members([m.oof for m in inputs.members])
    scored = _labelled_std(nested_predict(make_merger(merge), oof, inputs.labels, inputs.members[0].oof_fold),
                           inputs.labels)
    out = tmp_path / "sub"
    assert main(["--runs", str(grouped_run), "--merge", merge, "--post", "none", "--out", str(out), "--report"]) == 0
    written = np.loadtxt(out / "predictions.txt", delimiter=",", skiprows=1, usecols=(1, 2))
    assert np.abs(written.std(axis=0) / scored - 1).max() <= 0.05, written.std(axis=0) / scored

    # The test can fail: the fold means through the same fitted merge (the submission before
    # issue #10) fall short of the bound.
    fitted = make_merger(merge).fit(oof, inputs.labels)
    fold_means = fitted.predict(stack_members([fold_merged(m, "mean") for m in inputs.members]))
    shrunk = sample_values(fold_means, inputs.dataset.sample)[0].std(axis=0) / scored
    assert (shrunk < 0.95).all(), shrunk

    restored = json.loads((out / "manifest.json").read_text())["merge"]["spread_restored"]
    assert np.all(np.array(restored["factor"]) > 1) and "no labels" in restored["how"]
    rows = _read_report(out / "report.csv")  # the report's test row scores what was written
    test_row = next(r for r in rows if r["kind"] == "merge" and r["merge"] == merge and r["source"] == "test")
    assert test_row["mean"] == pytest.approx(rows[-1]["mean"], abs=5e-4)  # apart from clipping to [-1, 1]


def _read_report(path):
    import csv

    rows = list(csv.DictReader(path.open()))
    for row in rows:
        for key in ("ccc_v", "ccc_a", "mean"):
            row[key] = float(row[key]) if row[key] else None
    return rows


def test_report_only_writes_its_csv_and_no_submission(grouped_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    csv_path = tmp_path / "report.csv"
    assert main(["--report", "--runs", str(grouped_run), "--report-csv", str(csv_path)]) == 0
    rows = _read_report(csv_path)
    models = [r["model"] for r in rows]
    assert "grouped/tcn fold 0" in models and "mean over 2 members (OOF predictions)" in models
    fold0 = next(r for r in rows if r["model"] == "grouped/tcn fold 0")
    assert fold0["scored_on"].startswith("OOF fold 0") and (fold0["kind"], fold0["source"], fold0["fold"]) == (
        "fold_model", "oof_fold", "0")
    assert any(r["source"] == "none" and r["scored_on"].startswith("not scorable on OOF") for r in rows)
    assert "Honest ensemble report" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.csv"]  # no submissions/ folder


def test_holdout_runs_score_fold_models_and_merges_on_the_held_out_videos(tiny_demo, tmp_path):
    run = write_run(tmp_path / "runs" / "held", tiny_demo, archs=("tcn",), fold_mode="holdout_val")
    assert Run.open(run).holdout_videos() == [v.name for v in open_dataset(tiny_demo).split("val")]
    assert main(["--report", "--runs", str(run), "--report-csv", str(tmp_path / "r.csv")]) == 0
    rows = _read_report(tmp_path / "r.csv")
    held = [r for r in rows if r["source"] == "holdout"]
    assert {"held/tcn fold 0", "held/tcn folds merged: mean", "held/tcn folds merged: ccc_centering",
            "weighted_calibrated over 1 member", "auto over 1 member + smoothing + lag + calibration"
            } <= {r["model"] for r in held}
    merged = next(r for r in held if r["model"] == "held/tcn folds merged: mean")
    average = next(r for r in held if r["model"] == "held/tcn fold models: average score")
    assert merged["mean"] > average["mean"]


def test_refuses_an_existing_submission_folder(grouped_run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    assert main(["--runs", str(grouped_run), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().out and not any(out.iterdir())


def test_no_arguments_uses_the_latest_demo_run(tiny_demo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ABAW_DEMO_ROOT", str(tiny_demo))
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path / "runs" / "other_data", tiny_demo, archs=("tcn",), data_root=str(tmp_path / "elsewhere"))
    write_run(tmp_path / "runs" / "demo_run", tiny_demo, archs=("tcn",), folds=2, data_root=None)
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "Honest ensemble report: runs/demo_run" in out and "zip:" in out
    (folder,) = (tmp_path / "submissions").iterdir()
    assert folder.name.startswith("demo_run_auto_")
    written = {p.name for p in folder.iterdir()}
    assert written == {"predictions.txt", f"{folder.name}.zip", "manifest.json", "report.csv"}
    assert os.path.getsize(folder / f"{folder.name}.zip") > 0


def test_check_with_a_missing_sample_file_is_a_clear_error(tmp_path, capsys):
    from abaw.submission import main

    assert main(["--check", str(tmp_path / "x.txt"), "--sample", str(tmp_path / "missing.txt")]) == 1
    assert "missing.txt not found" in capsys.readouterr().out


def test_the_submission_never_reads_test_or_held_out_labels(tiny_demo, tmp_path):
    """Merge and post-processing are fitted on OOF only: other held-out and test labels, the same file."""
    import shutil

    from abaw.data import LABEL_DIR, SPLIT_DIRS

    root = Path(shutil.copytree(tiny_demo, tmp_path / "demo"))
    run = write_run(tmp_path / "runs" / "held", root, fold_mode="holdout_val")
    assert main(["--runs", str(run), "--out", str(tmp_path / "a"), "--report"]) == 0

    rng = np.random.default_rng(5)
    for path in (root / LABEL_DIR / SPLIT_DIRS["val"]).glob("*.txt"):  # the held-out videos' labels
        lines = path.read_text().splitlines()
        path.write_text("\n".join([lines[0]] + [f"{a:.3f},{b:.3f}" for a, b in rng.uniform(-1, 1, (len(lines) - 1, 2))])
                        + "\n")
    truth = (root / demo.GROUND_TRUTH_NAME).read_text().splitlines()
    (root / demo.GROUND_TRUTH_NAME).write_text("\n".join(
        [truth[0]] + [f"{line.split(',')[0]},{a:.3f},{b:.3f}" for line, (a, b) in
                      zip(truth[1:], rng.uniform(-1, 1, (len(truth) - 1, 2)))]) + "\n")
    assert main(["--runs", str(run), "--out", str(tmp_path / "b"), "--report"]) == 0

    assert (tmp_path / "a" / "predictions.txt").read_bytes() == (tmp_path / "b" / "predictions.txt").read_bytes()
    manifests = [json.loads((tmp_path / x / "manifest.json").read_text()) for x in "ab"]
    assert manifests[0]["post"] == manifests[1]["post"] and manifests[0]["merge"] == manifests[1]["merge"]
    assert manifests[0]["post"]["spec"] != "none"  # something was chosen, and chosen the same way
    held = [[r["mean"] for r in _read_report(tmp_path / x / "report.csv") if r["source"] == "holdout"] for x in "ab"]
    assert held[0] != held[1]  # the report did read the held-out labels: to score, never to choose


def test_the_default_submission_is_the_predictor_the_report_scored(wide_run, tmp_path):
    """The report's row for auto + every post-processing step on the test labels scores the written file."""
    out = tmp_path / "sub"
    assert main(["--runs", str(wide_run), "--out", str(out), "--report"]) == 0
    rows = _read_report(out / "report.csv")
    chain = next(r for r in rows if r["kind"] == "predictor" and r["post"] == "smoothing + lag + calibration"
                 and r["source"] == "test")
    assert rows[-1]["kind"] == "submission"
    assert chain["mean"] == pytest.approx(rows[-1]["mean"], abs=5e-4)  # apart from clipping to [-1, 1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["merge"]["name"] == "auto" and manifest["post"]["name"] == "auto"
    assert set(manifest["merge"]["learned"]["chosen"]) == {"valence", "arousal"}

    # Value for value: the report's chain, as honest.py builds it, is what was written.
    from abaw.honest import fitted_on_oof
    from abaw.predictor import Predictor

    inputs = load_inputs([str(wide_run)])
    oof = stack_members([m.oof for m in inputs.members])
    scored = fitted_on_oof(Predictor("auto", "auto"), inputs.members, oof, inputs.labels,
                           inputs.members[0].oof_fold, "test")
    written = np.loadtxt(out / "predictions.txt", delimiter=",", skiprows=1, usecols=(1, 2))
    np.testing.assert_allclose(sample_values(scored, inputs.dataset.sample)[0], written, atol=1e-6)


def test_runs_with_other_folds_are_not_merged(tiny_demo, tmp_path, capsys):
    a = write_run(tmp_path / "runs" / "a", tiny_demo, archs=("tcn",), folds=3)
    b = write_run(tmp_path / "runs" / "b", tiny_demo, archs=("linear",), folds=2)
    assert main(["--runs", str(a), str(b), "--out", str(tmp_path / "s")]) == 1
    out = capsys.readouterr().out
    assert "b/folds.csv" in out and "must share their folds" in out


def test_a_bad_post_spec_is_refused_before_any_work(tmp_path, capsys):
    assert main(["--runs", str(tmp_path / "no-such-run"), "--post", "gaussian:30"]) == 1
    out = capsys.readouterr().out
    assert "gaussian:30" in out and "no-such-run" not in out  # the SPEC, before the run is even opened


def test_a_non_default_submission_gets_its_own_honest_rows(grouped_run, tmp_path):
    out = tmp_path / "sub"
    assert main(["--runs", str(grouped_run), "--merge", "mean", "--post", "gaussian:15,cal",
                 "--out", str(out), "--report"]) == 0
    rows = _read_report(out / "report.csv")
    mine = [r for r in rows if r["model"].startswith("submitted: mean")]
    assert {r["source"] for r in mine} == {"oof_nested", "test"}
    test_row = next(r for r in mine if r["source"] == "test")
    assert test_row["mean"] == pytest.approx(rows[-1]["mean"], abs=5e-4)  # the written file, apart from clipping
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["post"]["spec"] == "gaussian:15,cal" and "spread_restored" in manifest["merge"]
