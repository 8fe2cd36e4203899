"""Merging several models' predictions of a video: fixed merges, learned merges and ``auto``.

Mergers follow scikit-learn's estimator contract: ``__init__`` only stores parameters, ``fit``
returns ``self``, learned attributes end with ``_``, ``predict`` applies them (a learned merger
raises ``NotFittedError`` before ``fit``; the fixed ones need no fit, like sklearn's stateless
transformers). Inputs to ``predict``:

* one video: K member predictions, a sequence of (T, 2) arrays or a (K, T, 2) array -> (T, 2);
* many videos: a dict video -> (K, T, 2) -> a dict video -> (T, 2).

Members are fold models of one architecture (fold merges) or architectures (learned merges).

Honesty rules (the report that applies them: :func:`abaw.honest.honest_report`): a learned merge is fitted only on out-of-fold (OOF)
predictions, i.e. on frames the merged models never trained on, and is scored only on frames it
was not fitted on (nested across folds, or on a held-out validation set). In OOF every frame has
exactly one fold model's prediction, so fold merges can only be scored on held-out validation
videos or, on the demo dataset, on the test ground truth.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.optimize import nnls
from sklearn.base import BaseEstimator, clone
from sklearn.utils.validation import check_is_fitted

from .metrics import ccc, score, valid_label_mask

AGREEMENT_FLOOR = 1e-6  # CCC centering: below this summed agreement, the weighted level is meaningless


def as_stack(predictions) -> np.ndarray:
    """K member predictions of one video as a float64 (K, T, 2) array."""
    stack = np.asarray(predictions, dtype=np.float64)
    if stack.ndim != 3 or stack.shape[0] == 0 or stack.shape[2] != 2:
        raise ValueError(f"expected K >= 1 member predictions of shape (T, 2), got an array of shape {stack.shape}")
    return stack


class Merger(BaseEstimator):
    """Merges K member predictions (K, T, 2) of a video into one (T, 2)."""

    def fit(self, X=None, y=None, mask=None, groups=None) -> "Merger":
        return self

    def predict(self, X):
        if isinstance(X, Mapping):
            return {video: self._merge(as_stack(members)) for video, members in X.items()}
        return self._merge(as_stack(X))

    def _merge(self, stack: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class MeanMerge(Merger):
    """The plain mean over members, frame by frame."""

    def _merge(self, stack):
        return stack.mean(axis=0)


class MedianMerge(Merger):
    """The median over members, frame by frame: robust to one member going astray."""

    def _merge(self, stack):
        return np.median(stack, axis=0)


def pairwise_agreement(stack: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(K, 2): a_i = mean over j != i of CCC(x_i, x_j) on the valid frames, per dimension."""
    k = len(stack)
    total = np.zeros((k, 2))
    for i in range(k):
        for j in range(i + 1, k):
            c = ccc(stack[i], stack[j], valid)
            total[i] += c
            total[j] += c
    return total / (k - 1)


def centering_level(means: np.ndarray, agreement: np.ndarray) -> np.ndarray:
    """w = sum_i a_i m_i / sum_i a_i per dimension, with the guard of :class:`CCCCentering`."""
    total = agreement.sum(axis=0)
    trusted = total > AGREEMENT_FLOOR
    weighted = (agreement * means).sum(axis=0) / np.where(trusted, total, 1.0)
    level = np.where(trusted, weighted, means.mean(axis=0))
    # With every a_i >= 0, w is a convex combination and the clip does nothing; a negative a_i can
    # push w outside every member's level, which no member supports.
    return np.clip(level, means.min(axis=0), means.max(axis=0))


class CCCCentering(Merger):
    """CCC centering (AVEC 2016 rater fusion), per video and dimension, over K members x_1..x_K:

    m_i = temporal mean of x_i; a_i = mean over j != i of CCC(x_i, x_j);
    w = sum_i a_i m_i / sum_i a_i; merged(t) = (1/K) sum_i (x_i(t) - m_i + w).

    This is the plain mean plus one constant per video and dimension (w - mean_i m_i).

    Guard: when sum_i a_i <= ``AGREEMENT_FLOOR`` (the members do not agree, or disagree), w is the
    plain mean of the m_i, so the merge is the plain mean; and w is clipped to
    [min_i m_i, max_i m_i], which changes nothing unless some a_i < 0. K = 1 returns the input.
    Frames where a member is NaN are left out of m_i and a_i and stay NaN in the output. CCC is
    :func:`abaw.metrics.ccc` (population moments).
    """

    def _merge(self, stack):
        if len(stack) == 1:
            return stack[0].copy()
        valid = np.isfinite(stack).all(axis=(0, 2))
        if not valid.any():
            return stack.mean(axis=0)
        filled = np.where(np.isfinite(stack), stack, 0.0)  # masked frames must not turn CCC into NaN
        means = filled[:, valid].mean(axis=1)
        level = centering_level(means, pairwise_agreement(filled, valid))
        return stack.mean(axis=0) - means.mean(axis=0) + level


def frames_for_fit(X, y, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Members (M, N, 2) and labels (N, 2) of the frames usable for fitting: labelled, all members finite.

    ``X``: dict video -> (M, T, 2) with ``y`` dict video -> (T, 2) (and ``mask`` dict video -> (T,)),
    or arrays (M, N, 2), (N, 2), (N,).
    """
    if isinstance(X, Mapping):
        videos = list(X)
        for video in videos:
            if len(y[video]) != np.shape(X[video])[1]:
                raise ValueError(f"{video!r}: {np.shape(X[video])[1]} predicted frames but {len(y[video])} labels")
        members = np.concatenate([as_stack(X[v]) for v in videos], axis=1)
        labels = np.concatenate([np.asarray(y[v], np.float64) for v in videos])
        mask = None if mask is None else np.concatenate([np.asarray(mask[v], bool) for v in videos])
    else:
        members, labels = as_stack(X), np.asarray(y, np.float64)
    valid = valid_label_mask(labels) & np.isfinite(members).all(axis=(0, 2))
    if mask is not None:
        valid &= np.asarray(mask, bool)
    if valid.sum() < 2:
        raise ValueError(f"need at least 2 labelled frames predicted by every member to fit, got {int(valid.sum())}")
    return members[:, valid], labels[valid]


class WeightedCalibratedMerge(Merger):
    """A learned merge: non-negative member weights, then an affine calibration, per dimension.

    merged(t) = scale_d * sum_m weights_[d, m] x_m(t) + shift_d, weights summing to 1.

    Averaging shrinks variance and CCC punishes that. For a fixed combination c, CCC(s c + b, y)
    is maximised by matching the labels' mean and standard deviation, where it equals Pearson's
    r(c, y); so the weights that maximise CCC after calibration are those that maximise r, which
    non-negative least squares on centred data finds exactly. Both steps are closed-form.

    Rules: weights are uniform when ``learn_weights`` is False, with one member, or when no
    non-negative combination correlates positively with the labels; the scale stays 1 when
    ``calibrate`` is False or the combination does not correlate positively with the labels.

    Fit it only on predictions of frames the members never trained on (OOF), and score it only
    on frames it was not fitted on (:func:`nested_predict`, or a held-out validation set). OOF has
    one fold model's prediction per frame, so apply it to members' fold predictions through
    :func:`learned_merge_of_folds`, which restores the single-model spread the scale was fitted on.
    """

    def __init__(self, learn_weights: bool = True, calibrate: bool = True, only: int | None = None):
        self.learn_weights = learn_weights
        self.calibrate = calibrate
        self.only = only  # one member alone (weight 1), the others ignored

    def fit(self, X, y, mask=None, groups=None) -> "WeightedCalibratedMerge":
        members, labels = frames_for_fit(X, y, mask)
        n_members = len(members)
        weights, scales, shifts = np.zeros((2, n_members)), np.ones(2), np.zeros(2)
        for d in range(2):
            x, target = members[:, :, d].T, labels[:, d]
            weights[d] = self._weights(x, target)
            scales[d], shifts[d] = self._calibration(x @ weights[d], target)
        self.weights_, self.scale_, self.shift_ = weights, scales, shifts
        self.n_members_ = n_members
        self.n_fit_frames_ = members.shape[1]
        return self

    def _weights(self, x: np.ndarray, target: np.ndarray) -> np.ndarray:
        uniform = np.full(x.shape[1], 1.0 / x.shape[1])
        if self.only is not None:
            if not 0 <= self.only < x.shape[1]:
                raise ValueError(f"member {self.only} asked for, but there are {x.shape[1]} members")
            return np.eye(x.shape[1])[self.only]
        if not self.learn_weights or x.shape[1] == 1:
            return uniform
        weights, _ = nnls(x - x.mean(axis=0), target - target.mean())
        return weights / weights.sum() if weights.sum() > 0 else uniform

    def _calibration(self, combined: np.ndarray, target: np.ndarray) -> tuple[float, float]:
        scale = 1.0
        spread = combined.std()
        covariance = np.mean((combined - combined.mean()) * (target - target.mean()))
        if self.calibrate and spread > 1e-12 and covariance > 0:
            scale = target.std() / spread
        shift = target.mean() - scale * combined.mean() if self.calibrate else 0.0
        return float(scale), float(shift)

    def predict(self, X):
        check_is_fitted(self)
        return super().predict(X)

    def _merge(self, stack):
        if len(stack) != self.n_members_:
            raise ValueError(f"fitted on {self.n_members_} members, got {len(stack)}")
        return np.einsum("ktd,dk->td", stack, self.weights_) * self.scale_ + self.shift_

    def describe(self) -> dict:
        """The learned parameters as plain lists (for manifest.json)."""
        check_is_fitted(self)
        return {"weights": self.weights_.round(6).tolist(), "scale": self.scale_.round(6).tolist(),
                "shift": self.shift_.round(6).tolist(), "fit_frames": int(self.n_fit_frames_)}


def candidate_merges(n_members: int) -> dict[str, WeightedCalibratedMerge]:
    """What ``auto`` chooses from, per dimension, in this order (the first wins a tie): the plain mean,
    the calibrated mean, the weighted calibrated merge, and each member alone.

    All are linear in the members, so :func:`learned_merge_of_folds` applies any of them to fold
    predictions. With one member only the first two differ."""
    candidates = {"mean": WeightedCalibratedMerge(learn_weights=False, calibrate=False),
                  "calibrated_mean": WeightedCalibratedMerge(learn_weights=False)}
    if n_members > 1:
        candidates["weighted_calibrated"] = WeightedCalibratedMerge()
        candidates.update({f"member {i}": WeightedCalibratedMerge(calibrate=False, only=i) for i in range(n_members)})
    return candidates


def _groups_of(X: Mapping, groups: Mapping | None) -> dict | None:
    """The groups of ``X``'s videos, or None when they do not make at least two groups."""
    if groups is None:
        return None
    of = {video: groups[video] for video in X}
    return of if len(set(of.values())) >= 2 else None


class SelectedMerge(WeightedCalibratedMerge):
    """``auto``: per dimension, the candidate (:func:`candidate_merges`) with the best CCC nested across
    folds on OOF, then refitted on all the OOF it is given.

    Valence and arousal often prefer different models, and a weak member must not drag the merge down
    (on the demo, ``linear`` added to ``mamba_va`` under a plain mean fell from 0.835 to 0.697 on test):
    each dimension takes whichever candidate predicted that dimension best on labels it was not fitted
    on. ``fit`` needs ``groups`` (video -> fold) with at least two folds among the videos; without them
    candidates are compared in-sample, which ``selected_by_`` records. The result is one linear merge
    (``weights_``, ``scale_``, ``shift_`` per dimension), applied like :class:`WeightedCalibratedMerge`.
    Its own honest score needs another level of nesting (:func:`nested_predict` of this merger).
    """

    def __init__(self):
        pass  # no parameters: the candidates and the rule are fixed (not WeightedCalibratedMerge's)

    def fit(self, X, y, mask=None, groups=None) -> "SelectedMerge":
        if not isinstance(X, Mapping):
            raise TypeError("SelectedMerge.fit needs a dict video -> (M, T, 2) and the videos' groups")
        n_members = len(as_stack(next(iter(X.values()))))
        candidates = candidate_merges(n_members)
        fit_groups = _groups_of(X, groups)
        scores = {}
        for name, candidate in candidates.items():
            if fit_groups is not None:
                predicted = nested_predict(candidate, X, y, fit_groups)
            else:
                predicted = clone(candidate).fit(X, y, mask).predict(X)
            result = score_videos(predicted, y)
            scores[name] = (result["valence"], result["arousal"])
        chosen = tuple(max(scores, key=lambda name: scores[name][d]) for d in range(2))  # max keeps the first tie
        weights, scale, shift = np.zeros((2, n_members)), np.ones(2), np.zeros(2)
        fitted = {name: clone(candidates[name]).fit(X, y, mask) for name in set(chosen)}
        for d, name in enumerate(chosen):
            weights[d], scale[d], shift[d] = fitted[name].weights_[d], fitted[name].scale_[d], fitted[name].shift_[d]
        self.weights_, self.scale_, self.shift_ = weights, scale, shift
        self.n_members_ = n_members
        self.n_fit_frames_ = fitted[chosen[0]].n_fit_frames_
        self.chosen_ = chosen
        self.candidate_scores_ = scores
        self.selected_by_ = "nested across folds" if fit_groups is not None else "in-sample (fewer than 2 folds)"
        return self

    def describe(self, member_names: Sequence[str] | None = None) -> dict:
        name = _member_namer(member_names)
        return {**super().describe(), "chosen": {"valence": name(self.chosen_[0]), "arousal": name(self.chosen_[1])},
                "selected_by": self.selected_by_,
                "candidates": {name(n): [round(v, 6), round(a, 6)] for n, (v, a) in self.candidate_scores_.items()}}


def _member_namer(member_names: Sequence[str] | None):
    """'member 1' -> that member's label, where labels are given."""
    def name(candidate: str) -> str:
        if member_names and candidate.startswith("member "):
            return f"{member_names[int(candidate.split()[1])]} alone"
        return candidate
    return name


MERGERS = {
    "mean": MeanMerge,
    "median": MedianMerge,
    "ccc_centering": CCCCentering,
    "calibrated_mean": lambda: WeightedCalibratedMerge(learn_weights=False),
    "weighted_calibrated": WeightedCalibratedMerge,
    "auto": SelectedMerge,
}
FOLD_MERGES = ("mean", "median", "ccc_centering")  # need no labels: usable on test predictions directly
LEARNED_MERGES = ("calibrated_mean", "weighted_calibrated", "auto")
# What a learned merge combines: each member's fold mean (the spread restoration of
# learned_merge_of_folds is exact for the mean; --fold-merge picks another).
LEARNED_FOLD_MERGE = "mean"


def make_merger(name: str) -> Merger:
    if name not in MERGERS:
        raise ValueError(f"unknown merge {name!r}; choose one of {', '.join(MERGERS)}")
    return MERGERS[name]()


def is_learned(name: str) -> bool:
    make_merger(name)  # an unknown name is an error here too
    return name in LEARNED_MERGES


# ---------------------------------------------------------------------------------------------
# Honest scoring


def nested_predict(merger: Merger, X: Mapping[str, np.ndarray], y: Mapping[str, np.ndarray],
                   groups: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Predict every video with a clone of ``merger`` fitted on the videos of the other groups (folds).

    So no prediction comes from a merge that saw its video's labels. The clone also gets the groups of
    the videos it is fitted on, so a merger that chooses by nested scores (``auto``) nests once more.
    """
    group_of = {video: groups[video] for video in X}
    if len(set(group_of.values())) < 2:
        raise ValueError("nested scoring needs videos from at least 2 folds")
    out: dict[str, np.ndarray] = {}
    for group in sorted(set(group_of.values())):
        fit_on = [v for v in X if group_of[v] != group]
        fitted = clone(merger).fit({v: X[v] for v in fit_on}, {v: y[v] for v in fit_on},
                                   groups={v: group_of[v] for v in fit_on})
        out.update(fitted.predict({v: X[v] for v in X if group_of[v] == group}))
    return out


def _to_length(array: np.ndarray, length: int) -> np.ndarray:
    """Trim, or pad with NaN (unscored) frames, to the label length."""
    if len(array) >= length:
        return array[:length]
    return np.concatenate([array, np.full((length - len(array), 2), np.nan)])


def score_videos(predictions: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray]) -> dict:
    """ABAW score over the videos' frames concatenated: labelled frames with a finite prediction."""
    videos = list(predictions)
    pred = np.concatenate([_to_length(np.asarray(predictions[v], np.float64), len(labels[v])) for v in videos])
    target = np.concatenate([np.asarray(labels[v], np.float64) for v in videos])
    valid = valid_label_mask(target) & np.isfinite(pred).all(axis=1)
    result = score(np.where(valid[:, None], pred, 0.0), target, valid)
    return {**result, "frames": int(valid.sum())}


def stack_members(per_member: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Member -> video -> (T, 2) into video -> (M, T, 2), over the videos every member predicted."""
    videos = [v for v in per_member[0] if all(v in m for m in per_member[1:])]
    return {v: np.stack([m[v] for m in per_member]) for v in videos}


def _concatenated(by_video: Mapping[str, np.ndarray], videos: Sequence[str]) -> np.ndarray:
    """video -> (..., T, 2) arrays as one float64 (..., N, 2) array, the videos' frames concatenated."""
    return np.concatenate([np.asarray(by_video[v], np.float64) for v in videos], axis=-2)


def spread_factor(weights: np.ndarray, fold_stacks: Sequence[np.ndarray], fold_merged: np.ndarray) -> np.ndarray:
    """(2,): how much to stretch a weighted combination of fold-merged members so it has the spread
    of the same combination of single fold models, per dimension.

    ``weights``: (2, M) member weights; ``fold_stacks``: per member, its K_m fold models (K_m, N, 2);
    ``fold_merged``: (M, N, 2) each member's fold merge; all over the same N finite frames.

    Var(sum_m w_m x_m) = w' C w. For fold means, C's off-diagonal (member covariances) is the
    average of the single fold models' covariances over all pairs of folds (covariance is
    bilinear), so only the diagonal shrank: it becomes each member's variance pooled over its fold
    models. Stretching each member to its single-model spread instead would also inflate the
    covariances and overshoot. The correction is approximate: in OOF one frame's members come from
    fold models that trained on the same videos, whose errors covary more than those of the average
    pair; and a median or CCC-centering fold merge is only close to the mean the argument assumes.
    """
    factor = np.ones(2)
    for d in range(2):
        merged_cov = np.atleast_2d(np.cov(fold_merged[:, :, d], bias=True))
        single_cov = merged_cov.copy()
        np.fill_diagonal(single_cov, [stack[:, :, d].var() for stack in fold_stacks])
        merged_var, single_var = weights[d] @ merged_cov @ weights[d], weights[d] @ single_cov @ weights[d]
        if merged_var > 1e-12:
            factor[d] = np.sqrt(single_var / merged_var)
    return factor


def learned_merge_of_folds(merger: WeightedCalibratedMerge, fold_stacks: Sequence[Mapping[str, np.ndarray]],
                           fold_merge: str = "mean") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A fitted learned merge applied to members' fold predictions: what is submitted and what the
    report scores on test or held-out data, so the two are one predictor.

    ``fold_stacks``: per member, video -> (K_m, T, 2) fold predictions. Each member's folds are
    merged by ``fold_merge``, the learned merge combines the members, and the result is stretched
    about its mean by :func:`spread_factor`, per dimension, over all frames of all videos
    concatenated (CCC is computed over the set concatenated). Why: the merge was fitted, and is
    scored nested, on OOF, where one fold model predicts each frame; a fold merge varies less
    (fold models disagree), so the fitted scale would shrink it, and CCC punishes shrinkage.
    The factor uses no labels. Returns the merged predictions (over the videos every member
    predicted) and the factor (2,).
    """
    check_is_fitted(merger)
    members = stack_members([make_merger(fold_merge).predict(stack) for stack in fold_stacks])
    merged = merger.predict(members)
    videos = list(members)
    singles = [_concatenated(stack, videos) for stack in fold_stacks]
    fold_merged, combined = _concatenated(members, videos), _concatenated(merged, videos)
    valid = np.isfinite(fold_merged).all(axis=(0, 2))
    for single in singles:
        valid &= np.isfinite(single).all(axis=(0, 2))
    if valid.sum() < 2:
        return merged, np.ones(2)
    factor = spread_factor(merger.weights_, [s[:, valid] for s in singles], fold_merged[:, valid])
    centre = combined[valid].mean(axis=0)
    return {v: centre + (p - centre) * factor for v, p in merged.items()}, factor
