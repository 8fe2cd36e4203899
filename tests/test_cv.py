"""The CV engine: resumable after a kill, a diverging fold fails alone, configs resolve strictly."""
import json
import hashlib
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from abaw import cli
from abaw.config import RunConfig
from abaw.cv import RunConflict, run_cv
from abaw.data import open_dataset
from abaw.folds import read_fold_table

REPO = Path(__file__).resolve().parents[1]
def run_args(root, out, *extra):
    return [sys.executable, str(REPO / "run_cv.py"), "--data-root", str(root), "--out", str(out),
            "--arch", "tcn", "--folds", "3", "--epochs", "4", "--patience", "10", "--window", "200",
            "--hop", "100", "--batch-size", "8", *extra]


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_killed_run_resumes_and_matches_an_unbroken_run(small_root, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    clean = subprocess.run(run_args(small_root, tmp_path / "clean"), cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stdout + clean.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(run_args(small_root, out), cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = out / "tcn" / "fold1" / "history.csv"
    deadline = time.time() + 300
    while time.time() < deadline and not (history.exists() and len(history.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-fold: fold 0 complete, fold 1 two epochs in
    proc.wait()
    assert (out / "tcn" / "fold0" / "metrics.json").exists()
    assert not (out / "tcn" / "fold1" / "metrics.json").exists() and (out / "tcn" / "fold1" / "last.pt").exists()
    fold0_before = digests(out / "tcn" / "fold0")

    rerun = subprocess.run(run_args(small_root, out), cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "1 already complete, 2 to train" in rerun.stdout
    assert digests(out / "tcn" / "fold0") == fold0_before  # completed fold untouched
    # The resumed fold continued from its checkpoint and ends exactly where an unbroken run does.
    for name in ("tcn/oof.csv", "tcn/fold1/history.csv", "tcn/test/fold1.csv"):
        a, b = pd.read_csv(out / name), pd.read_csv(tmp_path / "clean" / name)
        b = b.drop(columns=[c for c in ("seconds",) if c in b])
        pd.testing.assert_frame_equal(a.drop(columns=[c for c in ("seconds",) if c in a]), b)
    oof = pd.read_csv(out / "tcn" / "oof.csv")
    dataset = open_dataset(small_root)
    assert len(oof) == sum(v.label_mask.sum() for v in dataset.split("train", "val"))
    test = pd.read_csv(out / "tcn" / "test" / "fold2.csv")
    assert len(test) == sum(v.n_frames for v in dataset.split("test")) and test.frame.min() == 1
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.fold.astype(str)) == ["0", "1", "2", "oof"]


def test_a_diverging_fold_fails_alone_with_a_clear_message(small_root, tmp_path, monkeypatch):
    import abaw.train as train

    real_loss = train.ccc_loss

    def loss_nan_in_fold_1(pred, target, mask):
        loss = real_loss(pred, target, mask)
        return loss * float("nan") if torch.is_grad_enabled() and _current_fold[0] == 1 else loss

    _current_fold = [None]
    real_train = train.FoldTrainer._train

    def tracking_train(self):
        _current_fold[0] = self.fold
        return real_train(self)

    monkeypatch.setattr(train, "ccc_loss", loss_nan_in_fold_1)
    monkeypatch.setattr(train.FoldTrainer, "_train", tracking_train)
    config = RunConfig(data_root=str(small_root), arch=["linear"], folds=3, epochs=1, window=200, hop=200,
                       out=str(tmp_path / "run"))
    assert run_cv(config, open_dataset(small_root), folds_dir=tmp_path / "folds") == 1
    failed = tmp_path / "run" / "linear" / "fold1" / "failed.json"
    assert "loss is nan at epoch 1" in failed.read_text()
    for k in (0, 2):
        assert (tmp_path / "run" / "linear" / f"fold{k}" / "metrics.json").exists()
    summary = pd.read_csv(tmp_path / "run" / "summary.csv")
    assert summary.set_index(summary.fold.astype(str)).loc["1", "status"] == "failed"
    assert "oof" not in summary.fold.astype(str).tolist()  # no OOF score from a partial set of folds


def test_a_run_folder_with_other_settings_is_never_overwritten(small_root, tmp_path):
    dataset = open_dataset(small_root)
    config = RunConfig(arch=["linear"], folds=2, epochs=1, window=200, hop=200, out=str(tmp_path / "run"))
    assert run_cv(config, dataset, folds_dir=tmp_path / "folds") == 0
    changed = RunConfig(arch=["linear"], folds=2, epochs=2, window=200, hop=200, out=str(tmp_path / "run"))
    with pytest.raises(RunConflict, match="epochs: 1 -> 2"):
        run_cv(changed, dataset, folds_dir=tmp_path / "folds")


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nlr: 0.01\narch: [tcn, linear]\n")
    config = cli.resolve(cli.run_cv_parser().parse_args(["--config", str(path), "--lr", "0.5"]))
    assert (config.epochs, config.lr, config.arch, config.folds) == (3, 0.5, ["tcn", "linear"], 5)
    path.write_text("epochs: 3\nlearning_rate: 0.01\n")
    with pytest.raises(ValueError, match=r"c.yaml: unknown option\(s\) \['learning_rate'\]"):
        cli.resolve(cli.run_cv_parser().parse_args(["--config", str(path)]))


def test_unknown_architecture_is_refused_before_training(small_root, tmp_path):
    result = subprocess.run(run_args(small_root, tmp_path / "r") + ["--arch", "nope"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown architecture" in result.stdout and "mamba_va" in result.stdout
    assert not (tmp_path / "r").exists()


def test_parallel_folds_in_worker_processes_match_one_process(small_root, tmp_path):
    dataset = open_dataset(small_root)
    runs = {}
    for jobs in (1, 2):
        config = RunConfig(arch=["linear", "context_ridge"], folds=3, epochs=1, window=200, hop=200, jobs=jobs,
                           out=str(tmp_path / f"jobs{jobs}"))
        assert run_cv(config, dataset, folds_dir=tmp_path / "folds") == 0
        runs[jobs] = pd.read_csv(tmp_path / f"jobs{jobs}" / "summary.csv")
    assert list(runs[2].status) == ["completed"] * 8
    np.testing.assert_allclose(runs[1].ccc, runs[2].ccc, atol=1e-4)  # thread counts differ, the math doesn't


@pytest.mark.parametrize("bad, words", [
    (dict(hop=400, window=300), "hop (400) larger than window (300)"),
    (dict(patience=0), "patience must be at least 1"),
    (dict(epochs=0), "epochs must be at least 1"),
    (dict(folds=1), "folds must be at least 2"),
    (dict(folds=2, fold_mode="val_fold"), "3 with fold_mode val_fold"),
])
def test_invalid_settings_are_refused_up_front(bad, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        RunConfig(**bad)


@pytest.mark.parametrize("args, words", [
    (["--config", "missing.yaml"], "config file missing.yaml not found"),
    (["--hop", "500"], "hop (500) larger than window"),
])
def test_cli_reports_bad_options_without_a_traceback(small_root, tmp_path, args, words):
    result = subprocess.run(run_args(small_root, tmp_path / "r") + args, cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and words in result.stdout and "Traceback" not in result.stderr


def test_non_finite_validation_fails_the_fold_not_the_run(small_root, tmp_path, monkeypatch):
    import abaw.train as train

    real_evaluate = train.evaluate

    def nan_for_fold_0(model, videos, config, device):
        scores, preds = real_evaluate(model, videos, config, device)
        if scores and videos and videos[0].name in fold0:
            scores = {k: float("nan") for k in scores}
        return scores, preds

    dataset = open_dataset(small_root)
    config = RunConfig(arch=["linear"], folds=3, epochs=1, window=200, hop=200, out=str(tmp_path / "run"))
    from abaw.folds import load_or_make_folds

    folds, _ = load_or_make_folds(dataset, 3, "grouped", 0, tmp_path / "folds")
    fold0 = set(folds[folds.fold == 0].video)
    monkeypatch.setattr(train, "evaluate", nan_for_fold_0)
    assert run_cv(config, dataset, folds_dir=tmp_path / "folds") == 1
    assert "validation CCC is nan" in (tmp_path / "run" / "linear" / "fold0" / "failed.json").read_text()
    assert not (tmp_path / "run" / "linear" / "fold0" / "last.pt").exists()
    assert (tmp_path / "run" / "linear" / "fold1" / "metrics.json").exists()


def test_adding_an_architecture_keeps_the_others_in_the_summary(small_root, tmp_path):
    dataset = open_dataset(small_root)
    for arch in ("linear", "tcn"):
        config = RunConfig(arch=[arch], folds=2, epochs=1, window=200, hop=200, out=str(tmp_path / "run"))
        assert run_cv(config, dataset, folds_dir=tmp_path / "folds") == 0
    summary = pd.read_csv(tmp_path / "run" / "summary.csv")
    assert sorted(set(summary.arch)) == ["linear", "tcn"]


def test_stop_split_chooses_epochs_on_training_subjects_only(small_root, tmp_path, monkeypatch):
    import abaw.train as train

    dataset = open_dataset(small_root)
    evaluated = []
    real_evaluate = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda model, videos, config, device: (
        evaluated.append({v.name for v in videos}), real_evaluate(model, videos, config, device))[1])
    config = RunConfig(arch=["linear"], folds=3, epochs=2, window=200, hop=200, stop_split=0.2,
                       out=str(tmp_path / "run"))
    assert run_cv(config, dataset, folds_dir=tmp_path / "folds") == 0
    folds = read_fold_table(tmp_path / "run" / "folds.csv")
    subject_of = dict(zip(folds.video, folds.subject))
    fold0 = set(folds[folds.fold == 0].video)
    trainer = train.FoldTrainer(config, "linear", 0, dataset, folds, tmp_path / "x")
    stop = {v.name for v in trainer.stop_videos}
    assert stop and not stop & fold0 and not stop & {v.name for v in trainer.train_videos}
    assert not {subject_of[n] for n in stop} & {subject_of[v.name] for v in trainer.train_videos}
    assert stop in evaluated and fold0 not in evaluated[:2]  # epochs 1-2 of fold 0 were judged on `stop`
    assert len(pd.read_csv(tmp_path / "run" / "linear" / "oof.csv")) == sum(
        v.label_mask.sum() for v in dataset.split("train", "val"))


def test_a_presence_run_gives_the_model_one_more_channel_it_uses(small_root, tmp_path):
    """Training and whole-video prediction both feed the channel (a width mismatch would fail the fold)."""
    dataset = open_dataset(small_root)
    config = RunConfig(arch=["linear"], folds=2, epochs=1, window=200, hop=200, presence=True,
                       out=str(tmp_path / "run"))
    assert run_cv(config, dataset, folds_dir=tmp_path / "folds") == 0
    saved = torch.load(tmp_path / "run" / "linear" / "fold0" / "model.pt", weights_only=True)
    assert saved["model_config"]["input_dim"] == dataset.modalities["visual"] + 1
    assert saved["run_config"]["presence"] is True
    assert saved["state_dict"]["head.weight"].shape == (2, dataset.modalities["visual"] + 1)


def test_a_run_made_before_an_option_existed_resumes_with_its_default(small_root, tmp_path):
    dataset = open_dataset(small_root)
    config = RunConfig(arch=["linear"], folds=2, epochs=1, window=200, hop=200, out=str(tmp_path / "run"))
    assert run_cv(config, dataset, folds_dir=tmp_path / "folds") == 0
    path = tmp_path / "run" / "config.yaml"
    older = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k not in ("presence", "subjects")}
    path.write_text(yaml.safe_dump(older))  # as abaw 0.1 wrote it
    assert run_cv(config, dataset, folds_dir=tmp_path / "folds") == 0
    with pytest.raises(RunConflict, match=r"presence: False -> True"):
        run_cv(RunConfig(**{**vars(config), "presence": True}), dataset, folds_dir=tmp_path / "folds")


def test_a_classical_arch_cross_validates_beside_a_neural_one(small_root, tmp_path):
    """run_cv.py --arch context_ridge tcn: the same files and summary rows for both kinds."""
    from abaw.train import load_classical

    dataset = open_dataset(small_root)
    config = RunConfig(data_root=str(small_root), arch=["context_ridge", "tcn"], folds=3, epochs=1, window=200, hop=200,
                       out=str(tmp_path / "run"))
    assert run_cv(config, dataset, folds_dir=tmp_path / "folds") == 0
    run = tmp_path / "run"
    summary = pd.read_csv(run / "summary.csv", dtype={"fold": str})
    for arch in ("context_ridge", "tcn"):
        rows = summary[summary.arch == arch]
        assert list(rows.fold) == ["0", "1", "2", "oof"] and (rows.status == "completed").all()
        assert len(pd.read_csv(run / arch / "oof.csv")) == sum(v.label_mask.sum() for v in dataset.split("train", "val"))
    assert summary.set_index(["arch", "fold"]).loc[("context_ridge", "oof"), "ccc"] > 0.5
    test_frames = sum(v.n_frames for v in dataset.split("test"))
    for k in range(3):
        fold = run / "context_ridge" / f"fold{k}"
        assert sorted(p.name for p in fold.iterdir()) == ["metrics.json", "model.json", "model.npz", "oof.csv"]
        metrics = yaml.safe_load((fold / "metrics.json").read_text())
        assert (metrics["best_epoch"], metrics["epochs_run"], metrics["stop_ccc"]) == (-1, 0, metrics["mean"])
        test = pd.read_csv(run / "context_ridge" / "test" / f"fold{k}.csv", dtype={"video": str})
        assert len(test) == test_frames
        model = load_classical(fold)  # the saved model predicts what the fold wrote
        for name, rows in test.groupby("video"):
            pred = model.predict(dataset.videos[name])[rows.frame.to_numpy() - 1]
            np.testing.assert_allclose(rows[["valence", "arousal"]].to_numpy(), pred, atol=1e-6)
    # ... and through the merges and the report like any other member
    from abaw.submission import main as make_submission

    out = tmp_path / "sub"
    assert make_submission(["--runs", str(run), "--out", str(out), "--report"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["arch"] for m in manifest["members"]] == ["context_ridge", "tcn"]
    assert "run/context_ridge alone" in manifest["merge"]["learned"]["candidates"]
    report = pd.read_csv(out / "report.csv", dtype={"member": str})
    assert {"run/context_ridge", "run/tcn"} <= set(report["member"].dropna())
    assert report.loc[report["kind"] == "submission", "mean"].notna().all()
    # rerun: every fold is complete (metrics.json), nothing is refitted
    before = digests(run / "context_ridge")
    assert run_cv(config, dataset, folds_dir=tmp_path / "folds") == 0
    assert digests(run / "context_ridge") == before
    # holdout_val: the held-out videos are predicted by every fold model
    held = RunConfig(arch=["context_ridge"], folds=2, fold_mode="holdout_val", out=str(tmp_path / "held"))
    assert run_cv(held, dataset, folds_dir=tmp_path / "folds") == 0
    holdout = pd.read_csv(tmp_path / "held" / "context_ridge" / "holdout" / "fold1.csv")
    assert len(holdout) == sum(v.n_frames for v in dataset.split("val"))
