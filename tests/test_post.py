"""Post-processing: smoothing, lag shift and calibration against independent computations; the
estimator contract; the automatic choice on synthetic data; honesty of the nested estimate; SPECs."""
import json
import statistics

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter1d
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from abaw.ensemble import score_videos
from abaw.metrics import ccc
from abaw.post import (DimensionPost, PostProcessor, SpecError, calibrate, fit_calibration, format_spec,
                       nested_post, parse_spec, shift, smooth)

# ---------------------------------------------------------------------------------------------
# Independent references: plain loops over frames


def reference_smooth(x, kind, window):
    """Per frame: the finite frames of its window, truncated at the ends; their mean, weighted mean or median."""
    half, n = window // 2, len(x)
    out = np.full(n, np.nan)
    for t in range(n):
        if not np.isfinite(x[t]):
            continue
        frames = [j for j in range(max(0, t - half), min(n, t + half + 1)) if np.isfinite(x[j])]
        values = [float(x[j]) for j in frames]
        if kind == "mean":
            out[t] = sum(values) / len(values)
        elif kind == "median":
            out[t] = statistics.median(values)
        else:
            sigma = window / 6
            weights = [np.exp(-0.5 * ((j - t) / sigma) ** 2) for j in frames]
            out[t] = sum(w * v for w, v in zip(weights, values)) / sum(weights)
    return out


def series_with_gaps(rng, n):
    x = rng.normal(size=n)
    if n > 12:
        x[0] = np.nan                # a gap at the very start
        x[4:9] = np.nan              # a stretch
        x[n - 2] = np.nan            # near the end
    if n > 300:
        x[150:190] = np.nan          # a stretch longer than small windows
        x[rng.integers(200, n, 6)] = np.nan
    return x


@pytest.mark.parametrize("kind", ["mean", "gaussian", "median"])
def test_smoothing_matches_a_loop_over_frames_with_gaps_and_edges(kind):
    rng = np.random.default_rng(0)
    cases = [(n, w) for n in (1, 2, 7, 40) for w in (1, 3, 5, 9, 31)] + [(600, 151), (600, 41)]
    for n, window in cases:
        for x in (rng.normal(size=n), series_with_gaps(rng, n)):
            got, want = smooth(x, kind, window), reference_smooth(x, kind, window)
            assert got.shape == x.shape
            np.testing.assert_array_equal(np.isnan(got), ~np.isfinite(x))
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg=f"{kind} n={n} w={window}")


def test_gaussian_interior_matches_scipy_gaussian_filter1d():
    x = np.random.default_rng(1).normal(size=500)
    for window in (5, 15, 31, 61):
        half, sigma = window // 2, window / 6
        expected = gaussian_filter1d(x, sigma, truncate=half / sigma, mode="constant")  # radius = half
        interior = slice(half, len(x) - half)
        np.testing.assert_allclose(smooth(x, "gaussian", window)[interior], expected[interior], rtol=0, atol=1e-12)
        # and the edges really differ from zero padding: they are renormalised, not pulled toward 0
        assert not np.allclose(smooth(x, "gaussian", window)[:half], expected[:half])


@pytest.mark.parametrize("kind", ["mean", "gaussian", "median"])
def test_a_constant_series_stays_constant_up_to_its_edges_and_around_gaps(kind):
    x = np.full(100, 0.7)
    x[40:45] = np.nan
    out = smooth(x, kind, 31)
    np.testing.assert_allclose(out[np.isfinite(x)], 0.7, rtol=0, atol=1e-12)
    assert np.isnan(out[40:45]).all()


def test_smooth_rejects_bad_windows_and_kinds():
    for window in (0, 2, 4.0, -3, True):
        with pytest.raises(ValueError, match="odd integer"):
            smooth(np.zeros(10), "mean", window)
    with pytest.raises(ValueError, match="unknown smoothing"):
        smooth(np.zeros(10), "boxcar", 3)


def reference_shift(x, lag):
    n = len(x)
    return np.array([x[min(max(t - lag, 0), n - 1)] for t in range(n)])


def test_shift_matches_an_index_computation_for_both_signs():
    x = np.random.default_rng(2).normal(size=50)
    for lag in (0, 1, 3, 8, 49, 50, 120, -1, -3, -8, -49, -120):
        np.testing.assert_array_equal(shift(x, lag), reference_shift(x, lag), err_msg=f"lag {lag}")
    np.testing.assert_array_equal(shift(x, 3)[:4], [x[0]] * 3 + [x[0]])  # the start holds x[0]
    np.testing.assert_array_equal(shift(x, -3)[-4:], [x[-1]] * 3 + [x[-1]])


def test_shift_keeps_the_nan_frames_and_holds_over_a_gap_from_the_source_side():
    x = np.arange(20, dtype=float)
    x[[0, 8, 9, 10]] = np.nan
    delayed, advanced = shift(x, 2), shift(x, -2)
    for out in (delayed, advanced):
        np.testing.assert_array_equal(np.isnan(out), np.isnan(x))
    assert delayed[11] == 7 and delayed[12] == 7 and delayed[13] == 11  # sources 9, 10 held from 7 (earlier)
    assert delayed[1] == 1 and delayed[2] == 1  # source 0 (NaN, the first frame) takes the first finite value
    assert advanced[6] == 11 and advanced[7] == 11 and advanced[5] == 7  # sources 8, 9 held from 11 (later)
    assert np.isnan(shift(np.full(5, np.nan), 2)).all()


# ---------------------------------------------------------------------------------------------
# Calibration


def test_calibration_makes_ccc_equal_pearson_r_on_the_fit_data():
    rng = np.random.default_rng(3)
    y = rng.normal(0.1, 0.3, 5000)
    x = 0.4 * y - 0.2 + rng.normal(0, 0.2, 5000)
    scale, offset = fit_calibration(x, y)
    r = np.corrcoef(x, y)[0, 1]
    assert ccc(x, y) < r - 0.1  # the raw predictions are shrunk and biased
    # equal up to metrics.EPS in CCC's denominator: r * (1 - EPS / (2 var_y)), ~3e-8 here
    assert ccc(calibrate(x, scale, offset), y) == pytest.approx(r, abs=1e-7)
    assert scale == pytest.approx(y.std() / x.std())


def test_calibration_of_an_anticorrelated_prediction_only_matches_the_mean():
    rng = np.random.default_rng(4)
    y = rng.normal(0.3, 0.3, 2000)
    x = -y + rng.normal(0, 0.1, 2000)
    scale, offset = fit_calibration(x, y)
    assert scale == 1.0 and offset == pytest.approx(y.mean() - x.mean())


def test_a_cal_spec_fits_its_calibration_through_the_estimator():
    rng = np.random.default_rng(5)
    labels = {f"v{i}": rng.normal(0, 0.3, (300, 2)) for i in range(4)}
    predictions = {v: 0.5 * y + 0.1 + rng.normal(0, 0.2, y.shape) for v, y in labels.items()}
    post = PostProcessor("cal").fit(predictions, labels)
    x, y = np.concatenate(list(predictions.values())), np.concatenate(list(labels.values()))
    result = score_videos(post.transform(predictions), labels)
    for d, name in enumerate(("valence", "arousal")):
        assert result[name] == pytest.approx(np.corrcoef(x[:, d], y[:, d])[0, 1], abs=1e-7)  # up to EPS
        assert post.dims_[d].calibrate and post.dims_[d].scale > 1
    np.testing.assert_allclose(post.fit_ccc_, [result["valence"], result["arousal"]], atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Synthetic OOF predictions


def smooth_signal(rng, n):
    signal = gaussian_filter1d(rng.normal(size=n), 10)
    return np.clip(signal / signal.std() * 0.4, -1, 1)


def synthetic(seed=0, n_videos=24, n_frames=500, lags=(8, 8), noise=0.3, gain=1.0, bias=0.0, n_groups=3):
    """Labels = a smooth signal; predictions = the signal ``lag`` frames early (the labels lag the
    face) plus white noise, per dimension; unlabelled stretches are NaN in the predictions, as in OOF."""
    rng = np.random.default_rng(seed)
    predictions, labels, groups = {}, {}, {}
    for i in range(n_videos):
        label, prediction = np.empty((n_frames, 2)), np.empty((n_frames, 2))
        for d, lag in enumerate(lags):
            signal = smooth_signal(rng, n_frames + lag)
            label[:, d] = signal[:n_frames]
            prediction[:, d] = gain * signal[lag:] + bias + rng.normal(0, noise, n_frames)
        start = int(rng.integers(0, n_frames - 30))
        label[start:start + 30] = -5.0
        prediction[start:start + 30] = np.nan
        predictions[f"v{i:02d}"], labels[f"v{i:02d}"], groups[f"v{i:02d}"] = prediction, label, i % n_groups
    return predictions, labels, groups


SMALL_GRID = {"windows": (5, 15, 25, 41), "lags": (0, 4, 8, 12, 16, 24)}


def test_auto_recovers_each_dimensions_lag_and_smooths_and_nested_beats_identity():
    predictions, labels, groups = synthetic(lags=(8, 16))
    post = PostProcessor().fit(predictions, labels)
    lags = post.get_params()["lags"]
    for d, true_lag in enumerate((8, 16)):
        chosen = post.dims_[d]
        step = lags.index(true_lag)
        assert chosen.lag in lags[max(step - 1, 0):step + 2], (d, chosen)  # within one grid step
        assert chosen.kind != "none" and chosen.window > 1
    assert (post.fit_ccc_ > post.identity_ccc_ + 0.1).all()
    nested = score_videos(nested_post(PostProcessor(), predictions, labels, groups), labels)
    raw = score_videos(predictions, labels)
    assert nested["frames"] == raw["frames"]
    assert nested["valence"] > raw["valence"] + 0.1 and nested["arousal"] > raw["arousal"] + 0.1


def test_auto_on_perfect_predictions_keeps_the_identity_or_something_as_good():
    _, labels, _ = synthetic(n_videos=6)
    predictions = {v: np.where(y == -5, np.nan, y) for v, y in labels.items()}
    post = PostProcessor(**SMALL_GRID).fit(predictions, labels)
    result = score_videos(post.transform(predictions), labels)
    identity = score_videos(predictions, labels)
    assert result["valence"] >= identity["valence"] - 1e-9 and result["arousal"] >= identity["arousal"] - 1e-9
    assert all(d.lag == 0 and d.kind == "none" for d in post.dims_)


def test_the_fit_score_from_sums_equals_scoring_the_transformed_predictions():
    predictions, labels, _ = synthetic(seed=6, n_videos=8, gain=0.6, bias=0.2)
    # predictions longer and shorter than their labels are scored as score_videos scores them
    predictions["v00"] = np.concatenate([predictions["v00"], np.full((20, 2), 0.1)])
    predictions["v01"] = predictions["v01"][:-25]
    for spec in ("auto", "median:15,lag:8,cal", "valence=gaussian:25,lag:-4;arousal=mean:9,cal", "lag:12"):
        post = PostProcessor(spec, **SMALL_GRID).fit(predictions, labels)
        result = score_videos(post.transform(predictions), labels)
        np.testing.assert_allclose(post.fit_ccc_, [result["valence"], result["arousal"]], rtol=0, atol=1e-9)
        raw = score_videos(predictions, labels)
        np.testing.assert_allclose(post.identity_ccc_, [raw["valence"], raw["arousal"]], rtol=0, atol=1e-9)
        assert post.n_fit_frames_ == result["frames"]


def test_nested_post_equals_clones_fitted_on_the_other_groups():
    predictions, labels, groups = synthetic(seed=7, n_videos=9, gain=0.7, bias=0.1)
    post = PostProcessor(**SMALL_GRID)
    nested = nested_post(post, predictions, labels, groups)
    assert list(nested) == list(predictions)
    for group in set(groups.values()):
        others = [v for v in predictions if groups[v] != group]
        fitted = clone(post).fit({v: predictions[v] for v in others}, {v: labels[v] for v in others})
        own = fitted.transform({v: predictions[v] for v in predictions if groups[v] == group})
        for video, array in own.items():
            np.testing.assert_allclose(nested[video], array, rtol=0, atol=1e-9)
    assert not hasattr(post, "dims_")  # the estimator passed in stays unfitted


def test_nested_post_never_sees_the_labels_it_is_scored_on():
    predictions, labels, groups = synthetic(seed=8, n_videos=12, gain=0.6, bias=0.2)
    rng = np.random.default_rng(9)
    before = nested_post(PostProcessor(**SMALL_GRID), predictions, labels, groups)
    for group in (0, 1):
        garbage = {v: (rng.uniform(-1, 1, y.shape) if groups[v] == group else y) for v, y in labels.items()}
        after = nested_post(PostProcessor(**SMALL_GRID), predictions, garbage, groups)
        for video in predictions:
            if groups[video] == group:
                np.testing.assert_array_equal(after[video], before[video])
            else:
                assert not np.allclose(after[video], before[video], equal_nan=True), video


def test_nested_post_needs_two_groups_and_a_group_for_every_video():
    predictions, labels, _ = synthetic(n_videos=3)
    with pytest.raises(ValueError, match="at least 2 groups"):
        nested_post(PostProcessor(), predictions, labels, {v: 0 for v in predictions})
    with pytest.raises(ValueError, match="no group"):
        nested_post(PostProcessor(), predictions, labels, {"v00": 0, "v01": 1})


# ---------------------------------------------------------------------------------------------
# The estimator contract, NaN frames, describe


def test_transform_before_fit_raises_unless_nothing_is_learned():
    predictions, _, _ = synthetic(n_videos=2)
    for post in ("auto", "gaussian:31,cal", "valence=none;arousal=cal"):
        with pytest.raises(NotFittedError):
            PostProcessor(post).transform(predictions)
    for video, array in PostProcessor("none").transform(predictions).items():
        np.testing.assert_array_equal(array, predictions[video])
    out = PostProcessor("median:9,lag:4").transform(predictions)["v00"]
    np.testing.assert_array_equal(out[:, 1], shift(smooth(predictions["v00"][:, 1], "median", 9), 4))


def test_init_only_stores_parameters_and_clone_keeps_them():
    post = PostProcessor("bogus spec", windows=(4,))  # checked in fit, not in __init__
    assert clone(post).get_params()["post"] == "bogus spec"
    with pytest.raises(ValueError):
        post.fit(*synthetic(n_videos=2)[:2])


@pytest.mark.parametrize("spec", ["auto", "none", "mean:15,lag:8,cal", "valence=gaussian:61,lag:8;arousal=median:9,cal",
                                  "lag:-4"])
def test_nan_frames_stay_nan_and_lengths_are_kept(spec):
    predictions, labels, _ = synthetic(seed=10, n_videos=4)
    predictions["v00"][:3, 0] = np.nan  # NaN in one dimension only, at the start
    post = PostProcessor(spec, **SMALL_GRID).fit(predictions, labels)
    out = post.transform(predictions)
    for video, array in predictions.items():
        assert out[video].shape == array.shape
        np.testing.assert_array_equal(np.isnan(out[video]), np.isnan(array))


def test_describe_is_plain_json_with_a_human_text():
    predictions, labels, _ = synthetic(seed=11, n_videos=4, gain=0.7)
    post = PostProcessor("valence=gaussian:31,lag:8,cal;arousal=mean:15").fit(predictions, labels)
    described = json.loads(json.dumps(post.describe()))
    assert described["valence"]["kind"] == "gaussian" and described["valence"]["lag"] == 8
    assert described["valence"]["text"].startswith("gaussian 31, lag 8, calibrated x")
    assert described["arousal"]["text"] == "mean 15" and described["arousal"]["scale"] is None
    assert described["spec"] == "valence=gaussian:31,lag:8,cal;arousal=mean:15"
    assert str(DimensionPost("gaussian", 31, 8, True, 1.1234, 0.031)) == "gaussian 31, lag 8, calibrated x1.12 +0.03"
    assert str(DimensionPost()) == "none"


# ---------------------------------------------------------------------------------------------
# SPEC strings


@pytest.mark.parametrize("spec, valence, arousal", [
    ("none", DimensionPost(), DimensionPost()),
    ("gaussian:31,lag:8,cal", DimensionPost("gaussian", 31, 8, True), DimensionPost("gaussian", 31, 8, True)),
    ("cal, lag:8 ,mean:5", DimensionPost("mean", 5, 8, True), DimensionPost("mean", 5, 8, True)),
    ("valence=gaussian:61,lag:8;arousal=mean:15", DimensionPost("gaussian", 61, 8), DimensionPost("mean", 15)),
    ("arousal=median:9,lag:-4", DimensionPost(), DimensionPost("median", 9, -4)),
    ("mean:1,lag:0", DimensionPost(), DimensionPost()),
])
def test_good_specs_parse_and_round_trip(spec, valence, arousal):
    assert parse_spec(spec) == (valence, arousal)
    assert parse_spec(format_spec(parse_spec(spec))) == (valence, arousal)


@pytest.mark.parametrize("spec, part", [
    ("gaussian:30", "gaussian:30"), ("gauss:31", "gauss:31"), ("lag:x", "lag:x"), ("lag:8.5", "lag:8.5"),
    ("mean:15,median:9", "median:9"), ("lag:4,lag:8", "lag:8"), ("cal,cal", "cal"), ("mean:15,,cal", ""),
    ("valence=mean:5;valence=mean:7", "valence=mean:7"), ("speed=mean:5", "speed=mean:5"),
    ("valence=", "valence="), ("mean:5;lag:4", "mean:5;lag:4"), ("", ""), ("cal:1.1", "cal:1.1"),
])
def test_bad_specs_name_the_bad_part_and_the_grammar(spec, part):
    with pytest.raises(SpecError) as error:
        parse_spec(spec)
    assert repr(part) in str(error.value) and "Grammar:" in str(error.value)
    with pytest.raises(ValueError, match="Grammar"):  # through the estimator too
        PostProcessor(spec).fit(*synthetic(n_videos=2)[:2])
