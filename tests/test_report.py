"""abaw.report: its tables against independent recomputations, its figures, its CLI and both notebooks.

One small real run (linear and tcn, 3 folds, 1 epoch, validation held out so every report row is
scored) and one small study (3 trials, the last pruned) are made once for the module.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import optuna
import pandas as pd
import pytest
from matplotlib.figure import Figure
from nbclient import NotebookClient
from optuna.trial import TrialState

import abaw.tune as tune
from abaw import report
from abaw.config import RunConfig
from abaw.cv import run_cv
from abaw.data import INVALID_LABEL, open_dataset
from abaw.honest import REPORT_COLUMNS, honest_report
from abaw.metrics import ccc

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
ARCHS = ["linear", "tcn"]
FOLDS = 3
STUDY = "small"


@pytest.fixture(scope="module")
def run_dir(small_root, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("report")
    config = RunConfig(data_root=str(small_root), arch=ARCHS, folds=FOLDS, epochs=1, window=200, hop=200,
                       fold_mode="holdout_val", out=str(base / "run"))
    assert run_cv(config, open_dataset(small_root), folds_dir=base / "folds") == 0
    return base / "run"


@pytest.fixture(scope="module")
def inputs(run_dir):
    return report.load_runs([run_dir])


@pytest.fixture(scope="module")
def labels(small_root) -> dict[str, np.ndarray]:
    return {v.name: v.labels.astype(np.float64) for v in open_dataset(small_root).split("train", "val")}


@pytest.fixture(scope="module")
def study_storage(small_root, tmp_path_factory) -> str:
    """3 trials on one fold, 2 epochs: trials 0-1 learn and complete, trial 2 learns nothing and is pruned."""
    base = tmp_path_factory.mktemp("study")
    real = tune.suggest_training

    def suggest(trial):
        params = real(trial)
        params["window"] = 200
        params["lr"] = 1e-9 if trial.number >= 2 else 3e-3
        return params

    config = RunConfig(data_root=str(small_root), arch=["linear"], folds=FOLDS, epochs=2, window=200, hop=200,
                       out=str(base / STUDY))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tune, "suggest_training", suggest)
        study = tune.run_study(config, open_dataset(small_root), STUDY, n_trials=3, tune_folds=[0],
                               folds_dir=base / "folds")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    return f"sqlite:///{base / STUDY / 'study.db'}"


@pytest.fixture(scope="module")
def study(study_storage):
    return report.load_study(study_storage, STUDY)


def oof_table(run_dir: Path, arch: str, labels) -> pd.DataFrame:
    """oof.csv read with pandas, each row joined with its label."""
    table = pd.read_csv(run_dir / arch / "oof.csv", dtype={"video": str})
    label_rows = np.stack([labels[v][f - 1] for v, f in zip(table["video"], table["frame"])])
    return table.assign(label_v=label_rows[:, 0], label_a=label_rows[:, 1])


def pooled_ccc(rows: pd.DataFrame) -> tuple[float, float]:
    valid = ((rows[["label_v", "label_a"]] != INVALID_LABEL).all(axis=1)).to_numpy()
    v = ccc(rows["valence"].to_numpy(), rows["label_v"].to_numpy(), valid)
    a = ccc(rows["arousal"].to_numpy(), rows["label_a"].to_numpy(), valid)
    return float(v), float(a)


# ---------------------------------------------------------------------------------------------
# Choosing runs and studies


def test_run_paths_prefer_the_environment_then_the_argument_then_the_latest_demo_run(tmp_path, monkeypatch):
    monkeypatch.delenv(report.RUNS_ENV, raising=False)
    demo_run = tmp_path / "runs" / "d"
    demo_run.mkdir(parents=True)
    (demo_run / "config.yaml").write_text("data_root: null\narch: [tcn]\n")
    (demo_run / "summary.csv").write_text("arch,fold,ccc_v,ccc_a,ccc,status\n")
    assert report.run_paths(None, tmp_path / "runs") == [str(demo_run)]
    assert report.run_paths(["a", Path("b")], tmp_path / "runs") == ["a", "b"]
    monkeypatch.setenv(report.RUNS_ENV, os.pathsep.join(["x", "y"]))
    assert report.run_paths(["a"], tmp_path / "runs") == ["x", "y"]


def test_study_source_prefers_the_environment_and_defaults_to_the_study_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(report.STUDY_STORAGE_ENV, raising=False)
    monkeypatch.delenv(report.STUDY_NAME_ENV, raising=False)
    storage, name = report.study_source(None, "mva", tmp_path / "runs")
    assert (name, storage) == ("mva", f"sqlite:///{tmp_path / 'runs' / 'mva' / 'study.db'}")
    monkeypatch.setenv(report.STUDY_STORAGE_ENV, "postgresql://u@h/db")
    monkeypatch.setenv(report.STUDY_NAME_ENV, "other")
    assert report.study_source("sqlite:///x.db", "mva") == ("postgresql://u@h/db", "other")


def test_a_missing_sqlite_study_is_an_error_and_no_empty_database_appears(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such study database"):
        report.load_study(f"sqlite:///{tmp_path / 'none.db'}", "x")
    assert not (tmp_path / "none.db").exists()


# ---------------------------------------------------------------------------------------------
# Run tables


def test_fold_scores_are_each_folds_metrics_json(run_dir, inputs):
    table = report.fold_scores(inputs)
    assert list(table.columns) == ["member", "arch", "fold", "ccc_v", "ccc_a", "mean", "status"]
    assert list(zip(table["arch"], table["fold"])) == [(a, k) for a in ARCHS for k in range(FOLDS)]
    assert (table["member"] == "run/" + table["arch"]).all() and (table["status"] == "completed").all()
    for row in table.itertuples():
        metrics = json.loads((run_dir / row.arch / f"fold{row.fold}" / "metrics.json").read_text())
        assert (row.ccc_v, row.ccc_a, row.mean) == pytest.approx(
            (metrics["valence"], metrics["arousal"], metrics["mean"]), abs=1e-6)
    pd.testing.assert_frame_equal(report.fold_scores(run_dir), table)  # a run folder works as well


def test_oof_scores_agree_with_summary_csv_and_a_pandas_recomputation(run_dir, inputs, labels):
    table = report.oof_scores(inputs).set_index("member")
    summary = pd.read_csv(run_dir / "summary.csv", dtype={"fold": str}).query("fold == 'oof'").set_index("arch")
    for arch in ARCHS:
        row = table.loc[f"run/{arch}"]
        assert (row.ccc_v, row.ccc_a, row["mean"]) == pytest.approx(
            tuple(summary.loc[arch, ["ccc_v", "ccc_a", "ccc"]]), abs=1e-5)
        rows = oof_table(run_dir, arch, labels)
        v, a = pooled_ccc(rows)
        assert (row.ccc_v, row.ccc_a) == pytest.approx((v, a), abs=1e-9)
        assert row.frames == ((rows[["label_v", "label_a"]] != INVALID_LABEL).all(axis=1)).sum()


def test_merge_report_is_the_submission_report_with_every_row_scored(inputs):
    table = report.merge_report(inputs)
    expected = honest_report(inputs.members, inputs.labels, inputs.truth)
    assert list(table.columns) == REPORT_COLUMNS
    assert table["model"].tolist() == [r.model for r in expected]
    assert table["kind"].tolist() == [r.kind.value for r in expected]
    assert table["mean"].to_numpy() == pytest.approx([r.mean for r in expected])
    assert table["mean"].notna().all()  # holdout_val: every merge is scorable
    models = set(table["model"])
    for arch in ARCHS:
        assert {f"run/{arch} fold {k}" for k in range(FOLDS)} <= models
        assert {f"run/{arch} folds merged: {m}" for m in ("mean", "median", "ccc_centering")} <= models
        assert f"run/{arch} fold models: average score" in models
    assert "mean over 2 members of fold ccc_centering" in models
    assert {f"{name} over 2 members" for name in ("calibrated_mean", "weighted_calibrated", "auto")} <= models
    assert set(table.loc[table["kind"] == "predictor", "post"]) == {
        "smoothing", "smoothing + lag", "smoothing + lag + calibration"}
    assert set(table["source"]) == {"holdout", "test"}
    fold_rows = table[table["kind"] == "fold_model"]
    assert fold_rows["fold"].notna().all() and set(fold_rows["member"]) == {f"run/{a}" for a in ARCHS}


def test_per_video_ccc_agrees_with_a_pandas_recomputation_from_oof_csv(run_dir, inputs, labels):
    table = report.per_video_ccc(inputs)
    assert list(table.columns) == ["member", "video", "fold", "frames", "ccc_v", "ccc_a", "mean"]
    for arch in ARCHS:
        rows = oof_table(run_dir, arch, labels)
        mine = table[table["member"] == f"run/{arch}"].set_index("video")
        assert sorted(mine.index) == sorted(rows["video"].unique())
        for video, group in rows.groupby("video"):
            v, a = pooled_ccc(group)
            assert (mine.loc[video, "ccc_v"], mine.loc[video, "ccc_a"], mine.loc[video, "mean"]) == pytest.approx(
                (v, a, (v + a) / 2), abs=1e-9)
            assert mine.loc[video, "fold"] == group["fold"].iat[0]

    summary = report.per_video_summary(table)
    assert list(summary.index) == [f"run/{a}" for a in ARCHS]
    grouped = table.groupby("member")["mean"]
    assert summary["median"].to_numpy() == pytest.approx(grouped.median()[summary.index].to_numpy())
    assert summary["videos"].tolist() == grouped.size()[summary.index].tolist()
    assert summary["below_zero"].tolist() == [int((grouped.get_group(m) < 0).sum()) for m in summary.index]


def test_fold_agreement_is_symmetric_with_ones_on_the_diagonal_and_matches_the_test_files(run_dir, inputs):
    agreement = report.fold_agreement(inputs)
    assert list(agreement) == [f"run/{a}" for a in ARCHS]
    for arch in ARCHS:
        matrix = agreement[f"run/{arch}"].to_numpy()
        assert matrix.shape == (FOLDS, FOLDS)
        np.testing.assert_allclose(matrix, matrix.T, atol=1e-12)
        np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-6)
        a, b = (pd.read_csv(run_dir / arch / "test" / f"fold{k}.csv", dtype={"video": str}) for k in (0, 1))
        both = a.merge(b, on=["video", "frame"])
        assert len(both) == len(a) == len(b)
        expected = np.mean([ccc(both[f"{d}_x"].to_numpy(), both[f"{d}_y"].to_numpy()) for d in ("valence", "arousal")])
        assert matrix[0, 1] == pytest.approx(expected, abs=1e-9)
    valence = report.fold_agreement(inputs, "ccc_v")["run/tcn"]
    assert not np.allclose(valence.to_numpy(), agreement["run/tcn"].to_numpy())


def test_best_and_worst_are_really_the_best_and_worst(inputs):
    per_video = report.per_video_ccc(inputs)
    chosen = report.best_and_worst(per_video, n=2)
    for member, rows in per_video.groupby("member"):
        ranked = rows.sort_values("mean")["video"].tolist()
        picked = chosen[chosen["member"] == member]
        assert set(picked.loc[picked["rank"] == "best", "video"]) == set(ranked[-2:])
        assert set(picked.loc[picked["rank"] == "worst", "video"]) == set(ranked[:2])
    few = per_video[per_video["video"].isin(per_video["video"].unique()[:3])]
    assert report.best_and_worst(few, n=2).groupby("member")["video"].nunique().eq(3).all()  # never twice


# ---------------------------------------------------------------------------------------------
# Run figures


def test_run_figures_have_one_panel_per_member_source_or_video(inputs):
    folds, oof = report.fold_scores(inputs), report.oof_scores(inputs)
    per_video = report.per_video_ccc(inputs)
    assert len(report.plot_fold_scores(folds, oof).axes) == 3
    assert len(report.plot_merge_report(report.merge_report(inputs)).axes) == 2  # held-out and demo test
    assert len(report.plot_per_video_ccc(per_video).axes) == 2
    heatmaps = report.plot_fold_agreement(report.fold_agreement(inputs))
    assert [ax.get_title() for ax in heatmaps.axes[:2]] == ["run/linear", "run/tcn"]

    fig = report.plot_best_and_worst(inputs, per_video, "run/tcn", n=2)
    assert isinstance(fig, Figure) and len(fig.axes) == 8  # 4 videos x (valence, arousal)
    chosen = report.best_and_worst(per_video[per_video["member"] == "run/tcn"], 2)
    top_left = fig.axes[0]
    assert top_left.get_title().startswith(chosen["video"].iat[0])
    label_line, prediction_line = top_left.get_lines()
    tcn = next(m for m in inputs.members if m.label == "run/tcn")
    np.testing.assert_array_equal(prediction_line.get_ydata(), tcn.oof[chosen["video"].iat[0]][:, 0])
    with pytest.raises(ValueError, match="no per-video scores"):
        report.plot_best_and_worst(inputs, per_video, "run/nope")


# ---------------------------------------------------------------------------------------------
# Study tables and figures


def test_study_tables(study):
    states = report.trial_states(study)
    assert states["trials"].to_dict() == {"COMPLETE": 2, "PRUNED": 1}
    best = report.best_trials(study)
    assert best["trial"].tolist() == sorted([0, 1], key=lambda n: -study.trials[n].value)
    assert best["trial"].iat[0] == study.best_trial.number and best["CCC"].iat[0] == study.best_value
    pruned = report.pruned_trials(study)
    assert pruned["trial"].tolist() == [2]
    assert pruned["pruned_at_step"].iat[0] == max(study.trials[2].intermediate_values) == 1


def test_study_figures(study):
    for plot in (report.plot_optimization_history, report.plot_param_importances, report.plot_pruned_trials):
        assert isinstance(plot(study), Figure)
    lines = report.plot_pruned_trials(study).axes[0].get_lines()
    pruned_line = [line for line in lines if line.get_label() == "trial 2 (pruned)"]
    assert len(pruned_line) == 1 and list(pruned_line[0].get_ydata()) == [
        study.trials[2].intermediate_values[s] for s in (0, 1)]
    assert len(lines) == 2 + 2  # two complete curves; the pruned curve and its end mark


# ---------------------------------------------------------------------------------------------
# python -m abaw.report


def test_cli_writes_every_figure_and_table(run_dir, study_storage, tmp_path):
    out = tmp_path / "figures"
    env = {**os.environ, "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "abaw.report", str(run_dir), "--out", str(out),
                             "--study", STUDY, "--storage", study_storage],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    pngs = {"fold_scores", "merge_report", "per_video_ccc", "fold_agreement", "best_and_worst_run_linear",
            "best_and_worst_run_tcn", "study_optimization_history", "study_param_importances", "study_pruned_trials"}
    csvs = {"fold_scores", "oof_scores", "merge_report", "per_video_ccc", "per_video_summary", "best_and_worst",
            "fold_agreement_run_linear", "fold_agreement_run_tcn", "study_trial_states", "study_best_trials",
            "study_pruned_trials"}
    assert {p.stem for p in out.glob("*.png")} == pngs
    assert {p.stem for p in out.glob("*.csv")} == csvs
    assert not list(out.glob(".*"))  # no temporary file left behind
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert pd.read_csv(out / "merge_report.csv")["mean"].notna().all()


def test_cli_reports_a_missing_run_cleanly(tmp_path):
    assert report.main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1


# ---------------------------------------------------------------------------------------------
# Notebooks


def execute(name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=300,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()  # Jupyter's cwd: the notebook's
    return nb


def output_counts(nb) -> dict[str, int]:
    """How many outputs carry each MIME type (and how many are errors)."""
    counts: dict[str, int] = {}
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            for kind in output.get("data", {}) if "data" in output else [output["output_type"]]:
                counts[kind] = counts.get(kind, 0) + 1
    return counts


@pytest.fixture
def kernel_env(monkeypatch):
    """The kernel inherits this process's environment."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")  # the notebooks ask for inline figures themselves
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_ensemble_notebook_runs_headless_and_shows_every_table_and_figure(run_dir, kernel_env, monkeypatch):
    monkeypatch.setenv(report.RUNS_ENV, str(run_dir))
    nb = execute("ensemble_gains.ipynb")
    counts = output_counts(nb)
    assert "error" not in counts
    # tables: fold scores, OOF scores, merge report, post-processing steps, per-video summary, best and worst
    assert counts.get("text/html") == 6
    # figures: fold scores, merge report, per-video CCC, fold agreement, best/worst of each of the 2 archs
    assert counts.get("image/png") == 6
    assert str(run_dir) in nb.cells[2].outputs[0]["data"]["text/plain"]  # ABAW_RUNS was used


def test_study_notebook_runs_headless_and_shows_every_table_and_figure(study_storage, kernel_env, monkeypatch):
    monkeypatch.setenv(report.STUDY_STORAGE_ENV, study_storage)
    monkeypatch.setenv(report.STUDY_NAME_ENV, STUDY)
    counts = output_counts(execute("optuna_study.ipynb"))
    assert "error" not in counts and "stream" not in counts  # no warning printed either
    assert counts.get("text/html") == 3  # trial states, best trials, pruned trials
    assert counts.get("image/png") == 3  # optimization history, parameter importances, pruned trials


@pytest.mark.parametrize("name", ["ensemble_gains.ipynb", "optuna_study.ipynb"])
def test_committed_notebooks_have_no_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert "parameters" in code[0].metadata.get("tags", [])
