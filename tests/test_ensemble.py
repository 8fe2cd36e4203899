"""Mergers: CCC centering against the reference formula, the estimator contract, learned merges, nesting."""
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from abaw import ensemble, honest
from abaw.ensemble import (CCCCentering, MeanMerge, MedianMerge, WeightedCalibratedMerge, make_merger,
                           nested_predict, score_videos, stack_members)
from abaw.metrics import EPS, ccc
from abaw.runs import MemberPredictions, Run


def reference_ccc(x, y):
    """CCC with population moments, written out; the same EPS as abaw.metrics so the two agree to 1e-12."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    vx = sum((xi - mx) ** 2 for xi in x) / n
    vy = sum((yi - my) ** 2 for yi in y) / n
    cov = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y)) / n
    return 2 * cov / (vx + vy + (mx - my) ** 2 + EPS)


def reference_centering(members):
    """The reference algorithm for one video and one dimension, as written in ABAW_REFERENCE.md."""
    members = [np.asarray(x, np.float64) for x in members]
    k, t = len(members), len(members[0])
    m = [x.mean() for x in members]
    a = [sum(reference_ccc(members[i], members[j]) for j in range(k) if j != i) / (k - 1) for i in range(k)]
    w = sum(a[i] * m[i] for i in range(k)) / sum(a)
    return np.array([sum(members[i][s] - m[i] + w for i in range(k)) / k for s in range(t)])


def fold_like_predictions(rng, k=5, t=150):
    """K predictions of one video sharing a signal, each with its own level, gain and noise."""
    signal = np.cumsum(rng.normal(0, 0.1, size=(t, 2)), axis=0)
    gains = rng.uniform(0.5, 1.2, size=(k, 1, 2))
    levels = rng.normal(0, 0.3, size=(k, 1, 2))
    return gains * signal + levels + rng.normal(0, 0.2, size=(k, t, 2))


def test_ccc_centering_equals_the_reference_formula():
    rng = np.random.default_rng(0)
    videos = {f"v{i}": fold_like_predictions(rng, k=5, t=int(rng.integers(50, 200))) for i in range(4)}
    merged = CCCCentering().predict(videos)
    for video, stack in videos.items():
        for d in range(2):
            np.testing.assert_allclose(merged[video][:, d], reference_centering(stack[:, :, d]), rtol=0, atol=1e-12)


def test_ccc_centering_is_the_plain_mean_plus_one_constant_per_video_and_dimension():
    rng = np.random.default_rng(1)
    videos = {f"v{i}": fold_like_predictions(rng) for i in range(3)}
    merged, mean = CCCCentering().predict(videos), MeanMerge().predict(videos)
    offsets = []
    for video in videos:
        offset = merged[video] - mean[video]
        assert np.ptp(offset, axis=0).max() < 1e-12
        offsets.append(offset[0])
    assert np.abs(offsets).max() > 1e-3  # and the constant is not zero: it is a different merge


def test_ccc_centering_guard_falls_back_to_the_plain_mean_when_members_disagree():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, size=(100, 2))
    # Three members at different levels with unequal, mostly negative agreement (sum of a_i < 0):
    # without the guard, w = sum a_i m_i / sum a_i lands somewhere else than the plain mean.
    stack = np.stack([x, -x + 0.5, -0.3 * x - 0.8])
    agreement = ensemble.pairwise_agreement(stack, np.ones(100, bool))
    assert (agreement.sum(axis=0) < 0).all()
    unguarded = (agreement * stack.mean(axis=1)).sum(axis=0) / agreement.sum(axis=0)
    assert np.abs(unguarded - stack.mean(axis=(0, 1))).min() > 0.1
    np.testing.assert_allclose(CCCCentering().predict(stack), stack.mean(axis=0), atol=1e-12)


def test_ccc_centering_keeps_the_level_within_the_members_levels():
    rng = np.random.default_rng(3)
    s = rng.normal(0, 1, size=(200, 2))
    # Three agreeing members at level 0 and one weakly anti-correlated at level 0.5: sum a_i > 0
    # but a_4 < 0 would put w below 0, outside every member's level; the guard clips it to 0.
    stack = np.stack([s, s + 1e-3, s - 1e-3, -0.1 * s + 0.5])
    stack -= stack[:3].mean(axis=(0, 1))
    means = stack.mean(axis=1)
    agreement = ensemble.pairwise_agreement(stack, np.ones(200, bool))
    assert (agreement.sum(0) > 0).all() and (agreement[3] < 0).all()
    merged = CCCCentering().predict(stack)
    np.testing.assert_allclose(merged - stack.mean(0), -means.mean(0) + means.min(0) + 0 * merged, atol=1e-12)


def test_ccc_centering_of_one_member_is_the_input():
    x = np.random.default_rng(4).normal(size=(30, 2))
    np.testing.assert_array_equal(CCCCentering().predict([x]), x)


def test_merges_accept_a_list_of_folds_or_a_dict_of_videos():
    rng = np.random.default_rng(5)
    stack = fold_like_predictions(rng, k=3, t=40)
    for merger in (MeanMerge(), MedianMerge(), CCCCentering()):
        one = merger.predict(list(stack))
        assert one.shape == (40, 2)
        np.testing.assert_array_equal(merger.predict({"v": stack})["v"], one)
    with pytest.raises(ValueError, match="shape"):
        MeanMerge().predict(np.zeros((3, 40, 3)))


def synthetic_members(rng, n_videos=12, t=200, shrink=0.4, noise=0.25):
    """Labels and three members that shrink the labels (as averaged, CCC-trained models do), one of them useless."""
    labels, members = {}, {}
    for i in range(n_videos):
        y = np.tanh(np.cumsum(rng.normal(0, 0.15, size=(t, 2)), axis=0) * 0.5)
        y[:10] = -5  # unlabelled frames must not count
        clean = np.where(y == -5, 0.0, y)
        good = shrink * clean + rng.normal(0, noise, size=(t, 2))
        fair = shrink * clean + 0.1 + rng.normal(0, 2 * noise, size=(t, 2))
        useless = rng.normal(0, noise, size=(t, 2))
        labels[f"v{i:02d}"], members[f"v{i:02d}"] = y, np.stack([good, fair, useless])
    return members, labels


@pytest.mark.parametrize("name", list(ensemble.MERGERS))
def test_merger_contract(name):
    rng = np.random.default_rng(6)
    members, labels = synthetic_members(rng, n_videos=3)
    merger = make_merger(name)
    assert vars(merger) == merger.get_params()  # __init__ only stores parameters
    if name in ensemble.LEARNED_MERGES:
        with pytest.raises(NotFittedError):
            merger.predict(members)
    assert merger.fit(members, labels) is merger
    learned = set(vars(merger)) - set(merger.get_params())
    assert all(attr.endswith("_") for attr in learned)
    assert bool(learned) == (name in ensemble.LEARNED_MERGES)
    out = merger.predict(members)
    assert set(out) == set(members) and all(out[v].shape == (200, 2) for v in out)
    assert type(clone(merger)) is type(merger) and clone(merger).get_params() == merger.get_params()


def test_unknown_merge_names_the_choices():
    with pytest.raises(ValueError, match="ccc_centering"):
        make_merger("geometric")


def test_learned_merge_beats_the_plain_mean_on_shrunken_predictions():
    rng = np.random.default_rng(7)
    fit_members, fit_labels = synthetic_members(rng)
    new_members, new_labels = synthetic_members(rng)  # scored on videos it was not fitted on
    merger = WeightedCalibratedMerge().fit(fit_members, fit_labels)
    learned = score_videos(merger.predict(new_members), new_labels)["mean"]
    plain = score_videos(MeanMerge().predict(new_members), new_labels)["mean"]
    calibrated_mean = score_videos(make_merger("calibrated_mean").fit(fit_members, fit_labels).predict(new_members),
                                   new_labels)["mean"]
    assert learned > calibrated_mean > plain + 0.05
    assert (merger.weights_[:, 2] < 0.1).all() and (merger.weights_[:, 0] > merger.weights_[:, 1]).all()
    np.testing.assert_allclose(merger.weights_.sum(axis=1), 1.0)


def test_learned_merge_maximises_ccc_on_its_fitting_frames():
    rng = np.random.default_rng(8)
    members, labels = synthetic_members(rng, n_videos=4)
    merger = WeightedCalibratedMerge().fit(members, labels)
    stack, target = ensemble.frames_for_fit(members, labels)
    best = ccc(merger.predict(stack), target)

    def perturbed(attr, d, index, step):
        other = clone(merger).fit(members, labels)
        getattr(other, attr)[(d, index) if attr == "weights_" else d] += step
        return ccc(other.predict(stack), target)[d]

    for d in range(2):
        for step in (-0.02, 0.02):
            assert perturbed("scale_", d, None, step) <= best[d] + 1e-12
            assert perturbed("shift_", d, None, step) <= best[d] + 1e-12
            for index in range(3):
                if merger.weights_[d, index] + step >= 0:
                    assert perturbed("weights_", d, index, step) <= best[d] + 1e-12


def members_of_fold_models(rng, folds=(5, 3), n_videos=12, t=400, noise=0.5):
    """Labels and, per member, video -> (K_m, T, 2) fold models that disagree.

    A member's fold models share its signal (the labels shrunk, plus the member's own error) and
    each adds its own noise, so a fold mean varies less than one fold model.
    """
    labels, stacks = {}, [{} for _ in folds]
    for i in range(n_videos):
        y = np.tanh(np.cumsum(rng.normal(0, 0.15, size=(t, 2)), axis=0) * 0.5)
        labels[f"v{i:02d}"] = y
        for stack, k in zip(stacks, folds):
            signal = 0.7 * y + rng.normal(0, 0.1, size=(t, 2))
            stack[f"v{i:02d}"] = signal + rng.normal(0, noise, size=(k, t, 2))
    return labels, stacks


def fitted_on_single_fold_models(name, rng):
    """``name`` fitted as on OOF: one fold model's prediction per frame and member."""
    labels, stacks = members_of_fold_models(rng)
    return make_merger(name).fit(stack_members([{v: s[v][0] for v in s} for s in stacks]), labels)


def pooled_std(predictions):
    return np.concatenate(list(predictions.values())).std(axis=0)


@pytest.mark.parametrize("name", ensemble.LEARNED_MERGES)
def test_a_learned_merge_of_fold_means_has_the_spread_of_the_merge_of_single_fold_models(name):
    rng = np.random.default_rng(11)
    merger = fitted_on_single_fold_models(name, rng)
    _, stacks = members_of_fold_models(rng)  # new videos, as test videos are
    # The predictor it was fitted as: single fold models, paired across members (K differ: 5 and 3).
    single = pooled_std({(v, k): merger.predict(np.stack([s[v][k] for s in stacks])) for v in stacks[0] for k in range(3)})
    merged, factor = ensemble.learned_merge_of_folds(merger, stacks)
    np.testing.assert_allclose(pooled_std(merged), single, rtol=0.02)
    fold_means = merger.predict(stack_members([MeanMerge().predict(s) for s in stacks]))
    assert (pooled_std(fold_means) < 0.9 * single).all()  # what the merge of fold means alone gives
    # Stretching each member to a single fold model's spread would also inflate their covariance:
    each = []
    for stack in stacks:
        mean = MeanMerge().predict(stack)
        ratio = np.concatenate([stack[v] for v in stack], axis=1).std(axis=(0, 1)) / pooled_std(mean)
        centre = np.concatenate(list(mean.values())).mean(axis=0)
        each.append({v: centre + (m - centre) * ratio for v, m in mean.items()})
    assert (pooled_std(merger.predict(stack_members(each))) > 1.05 * single).all()
    # The centre stays: only the spread changes.
    np.testing.assert_allclose(np.concatenate(list(merged.values())).mean(axis=0),
                               np.concatenate(list(fold_means.values())).mean(axis=0), atol=1e-12)
    assert (factor > 1).all()


def test_with_one_fold_model_per_member_nothing_is_stretched():
    rng = np.random.default_rng(12)
    merger = fitted_on_single_fold_models("weighted_calibrated", rng)
    _, stacks = members_of_fold_models(rng, folds=(1, 1))
    merged, factor = ensemble.learned_merge_of_folds(merger, stacks)
    np.testing.assert_allclose(factor, 1.0, atol=1e-12)
    expected = merger.predict(stack_members([{v: s[v][0] for v in s} for s in stacks]))
    for video in expected:
        np.testing.assert_allclose(merged[video], expected[video], atol=1e-12)


def test_a_learned_merge_of_folds_must_be_fitted():
    _, stacks = members_of_fold_models(np.random.default_rng(13), n_videos=1, t=20)
    with pytest.raises(NotFittedError):
        ensemble.learned_merge_of_folds(WeightedCalibratedMerge(), stacks)


class SpyMerge(WeightedCalibratedMerge):
    """Records, per fitted instance, the videos it was fitted on and the videos it predicted."""

    log: list = []

    def fit(self, X, y, mask=None, groups=None):
        self.fitted_on_ = set(X)
        return super().fit(X, y, mask, groups)

    def predict(self, X):
        SpyMerge.log.append((self.fitted_on_, set(X)))
        return super().predict(X)


def test_nested_scoring_never_predicts_a_video_it_was_fitted_on():
    rng = np.random.default_rng(9)
    members, labels = synthetic_members(rng, n_videos=10)
    groups = {video: i % 4 for i, video in enumerate(members)}
    SpyMerge.log = []
    out = nested_predict(SpyMerge(), members, labels, groups)
    assert set(out) == set(members)
    assert len(SpyMerge.log) == 4
    predicted = [v for _, videos in SpyMerge.log for v in videos]
    assert sorted(predicted) == sorted(members)  # every video exactly once
    for fitted_on, videos in SpyMerge.log:
        assert not fitted_on & videos
        assert {groups[v] for v in fitted_on}.isdisjoint({groups[v] for v in videos})  # whole folds held out


def test_the_report_scores_every_learned_merge_on_data_it_was_not_fitted_on(monkeypatch):
    rng = np.random.default_rng(10)
    members_by_video, labels = synthetic_members(rng, n_videos=9)
    truth_members, truth = synthetic_members(rng, n_videos=3)
    truth = {f"t{v}": y for v, y in truth.items()}
    oof_fold = {video: i % 3 for i, video in enumerate(members_by_video)}
    members = []
    for m in range(2):
        oof = {v: stack[m] for v, stack in members_by_video.items()}
        test = {k: {f"t{v}": stack[m] + rng.normal(0, 0.1, size=stack[m].shape) for v, stack in truth_members.items()}
                for k in range(3)}
        members.append(MemberPredictions(Run(Path(f"run{m}"), {}), "arch", oof, oof_fold, test, {}))
    monkeypatch.setitem(ensemble.MERGERS, "weighted_calibrated", SpyMerge)
    SpyMerge.log = []
    rows = honest.honest_report(members, labels, truth, post=False)
    assert len(SpyMerge.log) == 3 + 1  # nested over 3 folds, then fitted on all OOF for the test rows
    for fitted_on, videos in SpyMerge.log:
        assert fitted_on and videos and not fitted_on & videos
    where = [row.scored_on for row in rows]
    assert "OOF, nested: fitted on the other folds' OOF, 9 videos" in where
    assert any(r.source is honest.Source.NOT_SCORABLE for r in rows)
    centering = [r for r in rows if r.kind is honest.Kind.FOLD_MERGE and r.merge == "ccc_centering"]
    assert centering  # and each one beside the plain mean, scored on the same data
    for row in centering:
        assert any(o.merge == "mean" and o.member == row.member and o.source == row.source for o in rows)


def specialist_members(rng, n_videos=12, t=200):
    """Member 0 knows valence only, member 1 arousal only, member 2 is noise on both."""
    labels, members = {}, {}
    for i in range(n_videos):
        y = np.tanh(np.cumsum(rng.normal(0, 0.15, size=(t, 2)), axis=0) * 0.5)
        noise = rng.normal(0, 0.3, size=(3, t, 2))
        a = np.stack([y[:, 0], rng.normal(0, 0.3, t)], axis=1) + noise[0] * 0.3
        b = np.stack([rng.normal(0, 0.3, t), y[:, 1]], axis=1) + noise[1] * 0.3
        labels[f"v{i:02d}"], members[f"v{i:02d}"] = y, np.stack([a, b, noise[2]])
    return members, labels


def test_auto_chooses_per_dimension_and_ignores_a_useless_member():
    rng = np.random.default_rng(21)
    members, labels = specialist_members(rng)
    groups = {video: i % 4 for i, video in enumerate(members)}
    merger = make_merger("auto").fit(members, labels, groups=groups)
    assert merger.selected_by_ == "nested across folds"
    assert merger.weights_[0, 0] > 0.9 and merger.weights_[1, 1] > 0.9  # valence from member 0, arousal from 1
    assert merger.weights_[:, 2].max() < 0.05  # the noise member has (almost) no say
    auto = score_videos(nested_predict(make_merger("auto"), members, labels, groups), labels)["mean"]
    mean = score_videos(MeanMerge().predict(members), labels)["mean"]
    assert auto > mean + 0.2
    described = merger.describe(["a", "b", "noise"])
    assert set(described["candidates"]) >= {"mean", "calibrated_mean", "weighted_calibrated", "a alone", "noise alone"}


def test_auto_chooses_without_the_labels_it_is_scored_on():
    rng = np.random.default_rng(22)
    members, labels = specialist_members(rng)
    groups = {video: i % 4 for i, video in enumerate(members)}
    first = nested_predict(make_merger("auto"), members, labels, groups)
    garbage = {v: (rng.uniform(-1, 1, y.shape) if groups[v] == 0 else y) for v, y in labels.items()}
    second = nested_predict(make_merger("auto"), members, garbage, groups)
    for video in members:
        if groups[video] == 0:  # fold 0 was predicted by merges that never saw its (garbage) labels
            np.testing.assert_array_equal(first[video], second[video])
        else:  # every other fold's merge was fitted on fold 0's labels too
            assert not np.array_equal(first[video], second[video])
