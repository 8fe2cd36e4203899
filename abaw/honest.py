"""The honest report: what each model, merge and post-processing step scores on data it never saw.

Every row is a :class:`ReportRow`, a typed record: the printed table, ``report.csv``, the report's
figures and the notebooks all read its fields (``kind``, ``source``, ``member``, ``fold``, ...),
never its display strings.

Rules: a learned merge or a post-processing choice is fitted only on out-of-fold (OOF) predictions,
i.e. on frames the merged models never trained on, and is scored only on frames it was not fitted
on: nested across folds, or on held-out validation videos, or (on the demo) on the test labels. In
OOF every frame has exactly one fold model's prediction, so fold merges can only be scored on
held-out or test videos. Rows scored on different data (``source``) are not comparable.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum

import numpy as np

from .ensemble import (FOLD_MERGES, LEARNED_FOLD_MERGE, LEARNED_MERGES, MeanMerge, make_merger, nested_predict,
                       score_videos, stack_members)
from .predictor import POST_STEPS, Predictor, resolve_merges
from .runs import MemberPredictions, stack_folds


class Source(str, Enum):
    """The labels a row was scored on."""

    OOF = "oof"                # every OOF frame, each predicted by the fold model that never trained on it
    OOF_FOLD = "oof_fold"      # one fold's OOF frames, predicted by that fold's model
    OOF_FOLDS = "oof_folds"    # the average of each fold model's score on its own fold
    OOF_NESTED = "oof_nested"  # OOF, each fold predicted by a merge/post-processing fitted on the other folds
    HOLDOUT = "holdout"        # validation videos held out of the CV (fold_mode holdout_val)
    TEST = "test"              # the demo's test labels (real test labels are never available)
    NOT_SCORABLE = "none"      # fold merges on OOF: each OOF frame has one fold model's prediction


class Kind(str, Enum):
    """What a row scores."""

    FOLD_MODEL = "fold_model"      # one fold model
    FOLD_AVERAGE = "fold_average"  # the average of a member's fold models' scores: the bar merges must clear
    FOLD_MERGE = "fold_merge"      # one member's fold models merged
    MEMBER_MEAN = "member_mean"    # the plain mean across members
    MERGE = "merge"                # a learned merge across members
    PREDICTOR = "predictor"        # a merge plus post-processing
    SUBMISSION = "submission"      # the values written to the submission file


SOURCE_TEXT = {
    Source.OOF: "OOF, all folds",
    Source.OOF_FOLD: "OOF fold {fold}",
    Source.OOF_FOLDS: "OOF, each fold model on its own fold",
    Source.OOF_NESTED: "OOF, nested: fitted on the other folds' OOF",
    Source.HOLDOUT: "holdout validation",
    Source.TEST: "test ground truth (demo)",
    Source.NOT_SCORABLE: "not scorable on OOF: each OOF frame has one fold model's prediction",
}


@dataclass(frozen=True)
class ReportRow:
    kind: Kind
    model: str                   # the row's name, for people
    source: Source
    ccc_v: float | None = None
    ccc_a: float | None = None
    mean: float | None = None    # (ccc_v + ccc_a) / 2, the ABAW score
    frames: int | None = None    # labelled frames scored (None for averages of scores)
    videos: int | None = None
    member: str | None = None    # <run>/<arch> for rows of one member
    fold: int | None = None      # for a fold model's row
    merge: str | None = None     # the fold merge or member merge
    post: str | None = None      # the post-processing steps, for predictor rows
    fitted_on: str | None = None  # what a learned step was fitted on, where it was fitted

    @property
    def scored_on(self) -> str:
        text = SOURCE_TEXT[self.source].format(fold=self.fold)
        if self.fitted_on:
            text += f"; fitted on {self.fitted_on}"
        if self.videos is not None:
            text += f", {self.videos} videos"
        return text

    def as_dict(self) -> dict:
        """The CSV and DataFrame columns (:data:`REPORT_COLUMNS`), enums as their values."""
        values = {**asdict(self), "scored_on": self.scored_on, "kind": self.kind.value, "source": self.source.value}
        return {column: values[column] for column in REPORT_COLUMNS}


REPORT_COLUMNS = ["model", "ccc_v", "ccc_a", "mean", "frames", "scored_on", "kind", "source", "videos", "member",
                  "fold", "merge", "post", "fitted_on"]
assert set(REPORT_COLUMNS) == {f.name for f in fields(ReportRow)} | {"scored_on"}


def scored(kind: Kind, model: str, source: Source, predictions: Mapping[str, np.ndarray], labels: Mapping,
           **fields_) -> ReportRow:
    """A row: ``predictions`` scored against ``labels`` over the videos' labelled frames concatenated."""
    if not predictions:
        return ReportRow(kind, model, source, videos=0, **fields_)
    result = score_videos(predictions, labels)
    return ReportRow(kind, model, source, result["valence"], result["arousal"], result["mean"], result["frames"],
                     len(predictions), **fields_)


def average_row(rows: Sequence[ReportRow], model: str, source: Source | None = None) -> ReportRow:
    """The average of single models' scores: the bar a merge of those models has to clear."""
    average = {key: float(np.mean([getattr(r, key) for r in rows])) for key in ("ccc_v", "ccc_a", "mean")}
    return replace(rows[0], kind=Kind.FOLD_AVERAGE, model=model, source=source or rows[0].source, frames=None,
                   fold=None, **average)


def _members(count: int) -> str:
    return f"{count} member" + ("s" if count > 1 else "")


def fold_merged(member: MemberPredictions, name: str, which: str = "test") -> dict[str, np.ndarray]:
    """One member's fold predictions (``test`` or ``holdout``) merged across folds by ``name``."""
    return make_merger(name).predict(fold_stack(member, which))


def fold_stack(member: MemberPredictions, which: str) -> dict[str, np.ndarray]:
    """video -> (K, T, 2): the member's fold models' ``test`` or ``holdout`` predictions."""
    return stack_folds(member.test if which == "test" else member.holdout, f"{member.label} {which} predictions")


def single_fold_rows(member: MemberPredictions, labels: Mapping, truth: Mapping | None) -> list[ReportRow]:
    """Each fold model on data it never saw: held-out validation videos, else its own OOF fold."""
    rows = []
    for k in member.folds:
        name = f"{member.label} fold {k}"
        if member.holdout:
            rows.append(scored(Kind.FOLD_MODEL, name, Source.HOLDOUT, member.holdout[k], labels,
                               member=member.label, fold=k))
        else:
            own = {v: member.oof[v] for v, fold in member.oof_fold.items() if fold == k}
            rows.append(scored(Kind.FOLD_MODEL, name, Source.OOF_FOLD, own, labels, member=member.label, fold=k))
    if all(r.mean is not None for r in rows):
        rows.append(average_row(rows, f"{member.label} fold models: average score",
                                None if member.holdout else Source.OOF_FOLDS))
    if truth is not None:
        test_rows = [scored(Kind.FOLD_MODEL, f"{member.label} fold {k}", Source.TEST, member.test[k], truth,
                            member=member.label, fold=k) for k in member.folds]
        rows += test_rows + [average_row(test_rows, f"{member.label} fold models: average score")]
    return rows


def fold_merge_rows(member: MemberPredictions, labels: Mapping, truth: Mapping | None,
                    names: Sequence[str] = FOLD_MERGES) -> list[ReportRow]:
    """Each fold merge (the plain mean always beside CCC centering) on held-out or demo test data."""
    rows = []
    common = {"member": member.label}
    if member.holdout:
        rows += [scored(Kind.FOLD_MERGE, f"{member.label} folds merged: {name}", Source.HOLDOUT,
                        fold_merged(member, name, "holdout"), labels, merge=name, **common) for name in names]
    else:
        rows.append(ReportRow(Kind.FOLD_MERGE, f"{member.label} folds merged: {', '.join(names)}",
                              Source.NOT_SCORABLE, merge=", ".join(names), **common))
    if truth is not None:
        rows += [scored(Kind.FOLD_MERGE, f"{member.label} folds merged: {name}", Source.TEST,
                        fold_merged(member, name), truth, merge=name, **common) for name in names]
    return rows


def member_mean_rows(members: Sequence[MemberPredictions], labels: Mapping, truth: Mapping | None,
                     fold_merges: Sequence[str] = FOLD_MERGES) -> list[ReportRow]:
    """The plain mean across members (of their fold merges, or of their OOF)."""
    if len(members) < 2:
        return []
    size = _members(len(members))

    def across(per_member):
        return MeanMerge().predict(stack_members(per_member))

    rows = []
    if all(m.holdout for m in members):
        rows += [scored(Kind.MEMBER_MEAN, f"mean over {size} of fold {name}", Source.HOLDOUT,
                        across([fold_merged(m, name, "holdout") for m in members]), labels, merge=name)
                 for name in fold_merges]
    else:
        rows.append(scored(Kind.MEMBER_MEAN, f"mean over {size} (OOF predictions)", Source.OOF,
                           across([m.oof for m in members]), labels))
    if truth is not None:
        rows += [scored(Kind.MEMBER_MEAN, f"mean over {size} of fold {name}", Source.TEST,
                        across([fold_merged(m, name) for m in members]), truth, merge=name) for name in fold_merges]
    return rows


@dataclass
class Chain:
    """One predictor the report scores: its name, the :class:`Predictor` that builds it, and the
    merge across each member's folds it is applied to on held-out and test videos."""

    kind: Kind
    model: str
    predictor: Predictor
    post: str | None = None
    fold_merge: str = LEARNED_FOLD_MERGE


def submitted_chain(merge: str, post: str, fold_merge: str | None, n_members: int) -> Chain | None:
    """The chain ``make_submission.py --merge/--post/--fold-merge`` writes, where :func:`chains`
    does not already score it (the defaults are its last row)."""
    fold_name, member_name = resolve_merges(merge, fold_merge)
    if (member_name, post, fold_name) == ("auto", "auto", LEARNED_FOLD_MERGE):
        return None
    name = f"submitted: {merge} over {_members(n_members)} (folds: {fold_name}) + post {post}"
    return Chain(Kind.PREDICTOR, name, Predictor(member_name, post), post, fold_name)


def chains(n_members: int, learned: Sequence[str] = LEARNED_MERGES, post: bool = True) -> list[Chain]:
    """The learned merges alone, then ``auto`` with each post-processing step added in turn."""
    size = _members(n_members)
    out = [Chain(Kind.MERGE, f"{name} over {size}", Predictor(name, post="none")) for name in learned]
    if post:
        out += [Chain(Kind.PREDICTOR, f"auto over {size} + {steps}", Predictor("auto", "auto", options), steps)
                for steps, options in POST_STEPS.items()]
    return out


def chain_rows(chain: Chain, members: Sequence[MemberPredictions], labels: Mapping,
               truth: Mapping | None) -> list[ReportRow]:
    """A chain fitted on OOF and scored where it was not fitted: nested across the first member's
    folds (or, where every run held validation videos out, fitted on all OOF and scored there), and
    on the demo's test labels. On held-out and test videos it is applied to the members' fold
    predictions by :meth:`Predictor.predict_folds`, the function the submission uses, so these rows
    score what is submitted."""
    oof = stack_members([m.oof for m in members])
    groups = members[0].oof_fold
    common = {"merge": chain.predictor.merge, "post": chain.post}
    which = {"fold_merge": chain.fold_merge}
    rows = []
    if all(m.holdout for m in members):
        held = fitted_on_oof(chain.predictor, members, oof, labels, groups, "holdout", **which)
        rows.append(scored(chain.kind, chain.model, Source.HOLDOUT, held, labels, fitted_on="OOF", **common))
    else:
        nested = nested_predict(chain.predictor, oof, labels, groups)
        rows.append(scored(chain.kind, chain.model, Source.OOF_NESTED, nested, labels, **common))
    if truth is not None:
        test = fitted_on_oof(chain.predictor, members, oof, labels, groups, "test", **which)
        rows.append(scored(chain.kind, chain.model, Source.TEST, test, truth, fitted_on="OOF", **common))
    return rows


def fitted_on_oof(predictor: Predictor, members: Sequence[MemberPredictions], oof: Mapping[str, np.ndarray],
                  labels: Mapping, groups: Mapping[str, int], which: str,
                  fold_merge: str = LEARNED_FOLD_MERGE) -> dict[str, np.ndarray]:
    """``predictor`` fitted on all OOF, applied to the members' ``which`` (test or holdout) fold predictions."""
    fitted = Predictor(**predictor.get_params()).fit(oof, labels, groups=groups)
    return fitted.predict_folds([fold_stack(m, which) for m in members], fold_merge)[0]


def honest_report(members: Sequence[MemberPredictions], labels: Mapping[str, np.ndarray],
                  truth: Mapping[str, np.ndarray] | None = None, post: bool = True,
                  submitted: Chain | None = None) -> list[ReportRow]:
    """One row per model, merge and post-processing step, each scored on data neither it nor its
    models were fitted on. ``labels``: train+val labels per video (-5 unlabelled); ``truth``: the
    demo's test labels, or None on real data; ``post``: add the post-processing rows;
    ``submitted``: the chain a submission writes when it is not the default (:func:`submitted_chain`)."""
    rows: list[ReportRow] = []
    for member in members:
        rows += single_fold_rows(member, labels, truth) + fold_merge_rows(member, labels, truth)
    rows += member_mean_rows(members, labels, truth)
    for chain in chains(len(members), post=post) + ([submitted] if submitted else []):
        rows += chain_rows(chain, members, labels, truth)
    return rows


def report_csv(rows: Sequence[ReportRow]) -> str:
    """The rows as CSV text with :data:`REPORT_COLUMNS`; floats with 6 decimals, missing values empty."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, REPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else "" if v is None else v)
                         for k, v in row.as_dict().items()})
    return buffer.getvalue()
