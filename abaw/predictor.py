"""The submitted predictor: a merge across members, then post-processing, both fitted on OOF.

    members' fold predictions ─ fold merge ─▶ (M, T, 2) ─ member merge ─▶ (T, 2) ─ post ─▶ (T, 2)

:class:`Predictor` follows the merger contract of :mod:`abaw.ensemble` (``fit`` on the members' OOF
predictions, a dict video -> (M, T, 2), with the labels and each video's fold; ``predict`` on the
same kind of dict), so :func:`abaw.ensemble.nested_predict` scores the whole chain honestly: each
fold is predicted by a chain whose merge weights, merge choice and post-processing were all chosen
without that fold's labels. On test (or held-out) videos, :meth:`Predictor.predict_folds` applies
the fitted chain to the members' fold predictions, which is what the submission writes.

Inside ``fit`` the post-processing is chosen on the *nested* OOF predictions of the merge (each fold
merged by a merge fitted on the other folds), not on the merge's in-sample output: a calibrated merge
fitted on the very frames the smoothing is then chosen on would look better there than anywhere else.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.base import clone
from sklearn.utils.validation import check_is_fitted

from .ensemble import (LEARNED_FOLD_MERGE, MeanMerge, Merger, SelectedMerge, WeightedCalibratedMerge, _groups_of, is_learned,
                       learned_merge_of_folds, make_merger, nested_predict, stack_members)
from .post import PostProcessor

# The plain mean as a linear merge (uniform weights, nothing calibrated), so that the fold merges'
# spread can be restored like a learned merge's.
PLAIN_MEAN = WeightedCalibratedMerge(learn_weights=False, calibrate=False)

# The honest report's post-processing rows: each adds one step to the one before (all chosen by
# ``auto`` on OOF), so each row says what that step buys.
POST_STEPS = {
    "smoothing": {"lags": (0,), "calibrate": (False,)},
    "smoothing + lag": {"calibrate": (False,)},
    "smoothing + lag + calibration": {},
}


class Predictor(Merger):
    """``merge`` across members (``mean`` or a learned merge of :data:`abaw.ensemble.MERGERS`),
    then ``post`` (``auto``, ``none`` or a SPEC of :mod:`abaw.post`; ``post_options`` restrict
    its grid).

    With the plain ``mean`` and post-processing, the fold merges' mean is stretched to the spread
    the same mean has on single fold models before the post-processing is applied (as every learned
    merge is, :func:`abaw.ensemble.learned_merge_of_folds`): the post-processing, and the scale of
    its calibration, were fitted on OOF, where one fold model predicts each frame. Without
    post-processing the mean of fold merges is left as it is (the published recipe)."""

    def __init__(self, merge: str = "auto", post: str = "auto", post_options: Mapping | None = None):
        self.merge = merge
        self.post = post
        self.post_options = post_options

    def fit(self, X, y, mask=None, groups=None) -> "Predictor":
        if not is_learned(self.merge) and self.merge != "mean":
            raise ValueError(f"merge across members is 'mean' or a learned merge, got {self.merge!r} "
                             f"(a fold merge: pass it to predict_folds)")
        merger = make_merger(self.merge) if is_learned(self.merge) else PLAIN_MEAN
        fit_groups = _groups_of(X, groups)
        self.merger_ = clone(merger).fit(X, y, groups=fit_groups)
        if self.post == "none":
            self.post_ = None
            return self
        if is_learned(self.merge) and fit_groups is not None:
            merged = nested_predict(merger, X, y, fit_groups)
        else:
            merged = self.merger_.predict(X)
        self.post_ = PostProcessor(self.post, **dict(self.post_options or {})).fit(merged, y, fit_groups)
        return self

    def _post(self, merged: dict) -> dict:
        return merged if self.post_ is None else self.post_.transform(merged)

    def predict(self, X):
        check_is_fitted(self, "merger_")
        if not isinstance(X, Mapping):
            raise TypeError("Predictor.predict needs a dict video -> (M, T, 2): post-processing works on whole videos")
        return self._post(self.merger_.predict(X))

    def predict_folds(self, fold_stacks: Sequence[Mapping[str, np.ndarray]],
                      fold_merge: str = "mean") -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """The chain on members' fold predictions (per member, video -> (K_m, T, 2)): each member's
        folds merged by ``fold_merge``, then the fitted merge (a learned one through
        :func:`abaw.ensemble.learned_merge_of_folds`, which restores the single-model spread it was
        fitted on), then the post-processing. Returns the predictions and the spread factor (None
        for the plain mean without post-processing, which stretches nothing)."""
        check_is_fitted(self, "merger_")
        if is_learned(self.merge) or self.post_ is not None:
            merged, factor = learned_merge_of_folds(self.merger_, fold_stacks, fold_merge)
        else:
            merged = MeanMerge().predict(stack_members([make_merger(fold_merge).predict(s) for s in fold_stacks]))
            factor = None
        return self._post(merged), factor

    def describe(self, member_names: Sequence[str] | None = None) -> dict:
        """What was fitted, as plain values for manifest.json."""
        check_is_fitted(self, "merger_")
        if isinstance(self.merger_, SelectedMerge):
            merge = self.merger_.describe(member_names)
        else:
            merge = self.merger_.describe() if hasattr(self.merger_, "describe") else {}
        return {"merge": {"name": self.merge, **merge},
                "post": {"name": self.post, **({} if self.post_ is None else self.post_.describe())}}


def resolve_merges(merge: str, fold_merge: str | None) -> tuple[str, str]:
    """(fold merge, member merge) of ``make_submission.py --merge``: a learned merge combines the
    members' fold merges (``LEARNED_FOLD_MERGE`` unless ``--fold-merge``); any other merge works
    across folds and the members are averaged."""
    if is_learned(merge):
        return fold_merge or LEARNED_FOLD_MERGE, merge
    return fold_merge or merge, "mean"
