"""context_ridge: context features, the streamed ridge against scikit-learn, the leave-group-out
CCC against explicit predictions, the PCA path, frames without a face, and no peeking at a fold."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge

from abaw.config import RunConfig
from abaw.data import VideoRecord, open_dataset
from abaw.folds import load_or_make_folds
from abaw.metrics import ccc
from abaw.models import create_model
from abaw.models.context_ridge import ContextRidge, context_feature_names, context_features
from abaw.train import FoldTrainer
from conftest import make_videos


def ridge(**overrides) -> ContextRidge:
    return create_model("context_ridge", size="abaw", **overrides)


def stacked(model, videos):
    """Every labelled row of the videos' design matrices, float64, and their labels."""
    x = np.concatenate([model.design(v)[v.label_mask] for v in videos]).astype(np.float64)
    y = np.concatenate([v.labels[v.label_mask] for v in videos]).astype(np.float64)
    return x, y


def sklearn_ridge(x, y, alpha):
    """scikit-learn's Ridge on the standardised design (alpha per frame: alpha * n) -> w (P, 2), b (2,) on raw columns."""
    mu, sd = x.mean(0), x.std(0)
    sd[sd == 0] = 1.0
    fitted = Ridge(alpha=alpha * len(x)).fit((x - mu) / sd, y)
    w = fitted.coef_.T / sd[:, None]
    return w, fitted.intercept_ - mu @ w


# --------------------------------------------------------------------------- context features
def naive_context(z, present, scales, video_mean, presence):
    """Frame by frame, window by window: the definition, without cumulative sums."""
    T, k = z.shape
    rows = []
    for t in range(T):
        row = list(np.where(present[t], z[t], 0)) + ([float(present[t])] if presence else [])
        for w in scales:
            frames = [s for s in range(t - w // 2, t + w // 2 + 1) if 0 <= s < T]
            seen = [s for s in frames if present[s]]
            row += list(np.mean([z[s] for s in seen], axis=0)) if seen else [0.0] * k
            if presence:
                row.append(len(seen) / len(frames))
        if video_mean:
            row += list(z[present].mean(0)) if present.any() else [0.0] * k
            if presence:
                row.append(present.mean())
        rows.append(row)
    return np.array(rows)


@pytest.mark.parametrize("video_mean, presence", [(True, True), (False, True), (True, False)])
def test_context_features_match_a_naive_loop(video_mean, presence):
    rng = np.random.default_rng(0)
    T, k = 57, 3
    z = rng.standard_normal((T, k)).astype(np.float32)
    present = rng.random(T) > 0.2
    present[20:35] = False  # a stretch longer than the 9-frame window: some windows see no face
    scales = (3, 9, 101)    # 101 > T: every window is cut at both edges
    got = context_features(z, present, scales, video_mean, presence)
    want = naive_context(z, present, scales, video_mean, presence)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert len(context_feature_names("visual", k, scales, video_mean, presence)) == got.shape[1]
    nobody = context_features(z, np.zeros(T, bool), scales, video_mean, presence)
    assert np.isfinite(nobody).all() and not nobody.any()  # no face anywhere: zeros, presence 0


def test_scales_must_be_odd_centred_windows():
    with pytest.raises(ValueError, match="odd"):
        ridge(scales=(8, 33))


# --------------------------------------------------------------------------- the ridge itself
@pytest.mark.parametrize("max_dim", [64, 5])  # without and with the PCA
def test_streamed_ridge_equals_sklearn_on_the_standardised_design(tmp_path, max_dim):
    videos = make_videos(tmp_path, {"visual": 8, "audio": 3})
    alpha = 0.03
    model = ridge(modalities=("visual", "audio"), scales=(5, 21), alphas=(alpha,), calibrate=False,
                  max_dim=max_dim, inner_folds=3).fit(videos)
    w, b = sklearn_ridge(*stacked(model, videos), alpha)
    np.testing.assert_allclose(model.coef_, w, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(model.intercept_, b, rtol=1e-6, atol=1e-9)
    # and an alpha far off gives another model: the comparison can fail
    assert not np.allclose(model.coef_, sklearn_ridge(*stacked(model, videos), 30.0)[0], rtol=1e-3)


def test_leave_group_out_ccc_from_statistics_equals_explicit_predictions(tmp_path):
    videos = make_videos(tmp_path, {"visual": 6})
    alphas = (1e-3, 0.1, 10.0)
    model = ridge(scales=(5, 21), alphas=alphas, inner_folds=3).fit(videos)
    by_subject = {}
    for v in videos:
        by_subject.setdefault(v.subject, set()).add(model.groups_[v.name])
    assert len(set(model.groups_.values())) == 3 and all(len(g) == 1 for g in by_subject.values())
    groups = sorted(set(model.groups_.values()))
    data = {g: stacked(model, [v for v in videos if model.groups_[v.name] == g]) for g in groups}
    y = np.concatenate([data[g][1] for g in groups])
    scales, shifts = [], []
    for i, alpha in enumerate(alphas):
        held_out = []
        for g in groups:  # an explicit model per held-out group, fitted on the others' rows
            x_rest = np.concatenate([data[h][0] for h in groups if h != g])
            y_rest = np.concatenate([data[h][1] for h in groups if h != g])
            w, b = sklearn_ridge(x_rest, y_rest, alpha)
            held_out.append(data[g][0] @ w + b)
        pred = np.concatenate(held_out)
        np.testing.assert_allclose(model.cv_ccc_raw_[i], ccc(pred, y), rtol=1e-6)
        cov = ((pred - pred.mean(0)) * (y - y.mean(0))).mean(0)
        scale = np.where(cov > 0, y.std(0) / pred.std(0), 1.0)
        shift = y.mean(0) - scale * pred.mean(0)
        np.testing.assert_allclose(model.cv_ccc_[i], ccc(pred * scale + shift, y), rtol=1e-6)
        scales.append(scale)
        shifts.append(shift)
    # the final model: the best alpha per target, refitted on every group, calibrated
    best = model.cv_ccc_.argmax(0)
    np.testing.assert_array_equal(model.alpha_, np.array(alphas)[best])
    x_all, y_all = stacked(model, videos)
    for j in range(2):
        w, b = sklearn_ridge(x_all, y_all, alphas[best[j]])
        np.testing.assert_allclose(model.coef_[:, j], w[:, j] * scales[best[j]][j], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(model.intercept_[j], b[j] * scales[best[j]][j] + shifts[best[j]][j], rtol=1e-6)


def test_calibration_undoes_the_shrinkage(tmp_path):
    videos = make_videos(tmp_path, {"visual": 6})
    model = ridge(scales=(5, 21), alphas=(3.0,), inner_folds=3).fit(videos)
    assert (model.calibration_[0] > 1).all()  # a strong penalty shrinks: calibration scales up
    plain = ridge(scales=(5, 21), alphas=(3.0,), inner_folds=3, calibrate=False).fit(videos)
    assert (model.cv_ccc_ > plain.cv_ccc_).all()
    np.testing.assert_array_equal(plain.calibration_, [[1, 1], [0, 0]])


# --------------------------------------------------------------------------- PCA
def test_pca_is_used_when_features_are_wider_than_max_dim(tmp_path):
    noise = np.linspace(0.2, 2.0, 20)  # distinct variances: the components are well defined
    videos = make_videos(tmp_path, {"visual": 20}, noise=noise)
    model = ridge(scales=(5, 21), max_dim=6, pca_stride=1, inner_folds=3).fit(videos)
    comps = model.components_["visual"]
    assert comps.shape == (20, 6)
    frames = []
    for v in videos:
        x, present = v.features("visual")
        frames.append(x[present])
    pca = PCA(6).fit(np.concatenate(frames))
    np.testing.assert_allclose(np.abs(comps.T @ pca.components_.T), np.eye(6), atol=1e-4)
    np.testing.assert_allclose(model.mean_["visual"], pca.mean_, atol=1e-5)
    x, present = videos[0].features("visual")
    design = model.design(videos[0])
    assert design.shape == (videos[0].n_frames, 4 * (6 + 1)) == (videos[0].n_frames, len(model.feature_names()))
    np.testing.assert_allclose(design[:, :6], np.where(present[:, None], (x - pca.mean_) @ comps, 0), atol=1e-4)
    wide = ridge(scales=(5, 21), max_dim=20, inner_folds=3).fit(videos)
    assert wide.components_["visual"] is None and wide.design(videos[0]).shape[1] == 4 * 21


# --------------------------------------------------------------------------- frames without a face
def test_finite_predictions_without_faces(tmp_path):
    videos = make_videos(tmp_path, {"visual": 12})
    n = 1200  # a no-face stretch longer than the widest window, and a video with no face at all
    long = np.random.default_rng(1).standard_normal((n, 12)).astype(np.float32)
    long[100:900] = np.nan
    np.save(tmp_path / "long.npy", long)
    np.save(tmp_path / "blind.npy", np.full((300, 12), np.nan, np.float32))
    labels = np.random.default_rng(2).uniform(-1, 1, (300, 2)).astype(np.float32)
    blind_train = VideoRecord("blind_train", "s9", "train", 300, labels, {"visual": tmp_path / "blind.npy"})
    blind_test = VideoRecord("blind_test", "s10", "test", 300, None, {"visual": tmp_path / "blind.npy"})
    long_test = VideoRecord("long", "s11", "test", n, None, {"visual": tmp_path / "long.npy"})
    for max_dim in (32, 4):  # without and with the PCA
        model = ridge(max_dim=max_dim, inner_folds=3).fit(videos + [blind_train])
        for video in (blind_test, long_test, videos[0]):
            pred = model.predict(video)
            assert pred.shape == (video.n_frames, 2) and np.isfinite(pred).all()
        blind = model.predict(blind_test)
        assert np.ptp(blind, axis=0).max() == 0  # nothing to see: one value for every frame


# --------------------------------------------------------------------------- folds
def test_alpha_and_weights_never_see_the_fold_videos(small_root, tmp_path):
    """Relabel the fold's videos: identical model. Relabel a training video: another model."""
    folds, _ = load_or_make_folds(open_dataset(small_root), 3, "grouped", 0, tmp_path / "folds")
    config = RunConfig(arch=["context_ridge"], folds=3, out=str(tmp_path / "run"))

    def fit(relabel: set[str], name: str, stop_split: float = 0.0) -> tuple[dict, FoldTrainer]:
        dataset = open_dataset(small_root)
        rng = np.random.default_rng(7)
        for video in relabel:
            v = dataset.videos[video]
            v.labels = np.where(v.labels == -5, -5, rng.uniform(-1, 1, v.labels.shape)).astype(np.float32)
        trainer = FoldTrainer(RunConfig(**{**vars(config), "stop_split": stop_split}), "context_ridge", 0, dataset,
                              folds, tmp_path / name / "fold0")
        result = trainer.run()
        assert result.status == "completed" and result.best_epoch == -1 and result.epochs_run == 0
        with np.load(tmp_path / name / "fold0" / "model.npz") as arrays:
            return {k: arrays[k] for k in arrays}, trainer

    fold_videos = set(folds.video[folds.fold == 0])
    train_videos = sorted(set(folds.video[folds.fold != 0]))
    base, trainer = fit(set(), "base")
    relabelled, _ = fit(fold_videos, "relabelled")
    assert base.keys() == relabelled.keys()
    for key in base:
        np.testing.assert_array_equal(base[key], relabelled[key], err_msg=key)
    other, _ = fit({train_videos[0]}, "train_relabelled")
    assert not np.array_equal(base["coef_"], other["coef_"])
    # a stop split early-stops nothing here: its videos go back into the fit
    _, split = fit(set(), "stop_split", stop_split=0.3)
    assert split.stop_videos and {v.name for v in split.fit_videos} == set(train_videos)
    assert set(ContextRidge.load(tmp_path / "stop_split" / "fold0").groups_) == set(train_videos)


def test_one_subject_has_nothing_to_hold_out(tmp_path):
    videos = make_videos(tmp_path, {"visual": 6}, lengths=(120, 90))
    for v in videos:
        v.subject = "only"
    model = ridge(scales=(5, 21)).fit(videos)
    assert np.isnan(model.cv_ccc_).all() and model.alpha_.tolist() == [model.config.alphas[7]] * 2
    np.testing.assert_array_equal(model.calibration_, [[1, 1], [0, 0]])
    assert np.isfinite(model.predict(videos[0])).all()
