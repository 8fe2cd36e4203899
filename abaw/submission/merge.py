"""Merging the runs' test predictions into the one set of values a submission writes."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..ensemble import is_learned, stack_members
from ..predictor import Predictor, resolve_merges
from ..runs import MemberPredictions, RunError, stack_folds

SPREAD_RESTORED = ("the merge of the fold merges, stretched about its mean by factor (valence, arousal) "
                   "to the spread the same merge has on single fold models, over all test frames; no labels used")


def merge_test_predictions(members: Sequence[MemberPredictions], merge: str, labels: Mapping[str, np.ndarray],
                           fold_merge: str | None = None, post: str = "auto") -> tuple[dict[str, np.ndarray], dict]:
    """Test predictions merged within each member across folds, then across members, then post-processed.

    The member merge (learned or the plain mean) and the post-processing are fitted on the members'
    OOF predictions (frames no model trained on), grouped by the first member's folds, by
    :class:`abaw.predictor.Predictor`, and applied to the fold predictions by its ``predict_folds``:
    the chain the honest report scores. Returns the predictions per video and a description of the
    chain for the manifest.
    """
    fold_name, member_name = resolve_merges(merge, fold_merge)
    if is_learned(fold_name):
        raise ValueError(f"a learned merge ({fold_name}) cannot merge folds: OOF has one fold model per frame")
    stacks = [stack_folds(m.test, f"{m.label} test predictions") for m in members]
    oof = stack_members([m.oof for m in members])
    predictor = Predictor(member_name, post).fit(oof, labels, groups=members[0].oof_fold)
    merged, factor = predictor.predict_folds(stacks, fold_name)
    described = predictor.describe([m.label for m in members])
    description: dict = {"fold_merge": fold_name, "member_merge": member_name, "post": described["post"]}
    if is_learned(member_name):
        description["learned"] = {k: v for k, v in described["merge"].items() if k != "name"}
    if factor is not None:
        description["spread_restored"] = {"factor": factor.round(6).tolist(), "how": SPREAD_RESTORED}
    missing = sorted(set().union(*stacks) - set(merged))
    if missing:
        raise RunError(f"test videos not predicted by every member: {missing[:5]}")
    return merged, description
