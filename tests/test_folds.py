"""The fold manager: subject-grouped, balanced, deterministic, reused, and refused when stale."""
import pandas as pd
import pytest

from abaw.data import open_dataset
from abaw.folds import FoldError, load_or_make_folds, make_folds, read_fold_table


@pytest.fixture(scope="module")
def dataset(demo_root):
    return open_dataset(demo_root)


@pytest.mark.parametrize("mode", ["grouped", "val_fold", "holdout_val"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folds_never_split_a_subject(dataset, mode, seed):
    table = make_folds(dataset, 5, mode, seed)
    assert (table.groupby("subject")["fold"].nunique() == 1).all()
    pairs = table[table.video.str.endswith(("_left", "_right"))]
    assert len(pairs) >= 6 and (pairs.groupby("subject")["fold"].nunique() == 1).all()
    parts = table[table.video.str.match(r"^(video\d+_\d+|\d+-\d+-\d+x\d+-\d+)$")]  # numbered parts
    assert len(parts) >= 6 and (parts.groupby("subject")["fold"].nunique() == 1).all()


def test_folds_cover_train_and_val_and_are_balanced(dataset):
    table = make_folds(dataset, 5, "grouped", 0)
    assert set(table.video) == {v.name for v in dataset.split("train", "val")}
    labelled = {v.name: v.label_mask.sum() for v in dataset.videos.values()}
    per_fold = table.assign(n=table.video.map(labelled)).groupby("fold")["n"].sum()
    assert sorted(per_fold.index) == [0, 1, 2, 3, 4]
    assert per_fold.max() / per_fold.min() < 1.15


def test_folds_are_deterministic_per_seed(dataset):
    assert make_folds(dataset, 5, "grouped", 3).equals(make_folds(dataset, 5, "grouped", 3))
    assert not make_folds(dataset, 5, "grouped", 3).equals(make_folds(dataset, 5, "grouped", 4))


def test_val_fold_and_holdout_modes(dataset):
    val = {v.name for v in dataset.split("val")}
    as_fold = make_folds(dataset, 6, "val_fold", 0)
    assert set(as_fold[as_fold.fold == 0].video) == val and sorted(as_fold.fold.unique()) == list(range(6))
    held = make_folds(dataset, 5, "holdout_val", 0)
    assert set(held[held.fold == -1].video) == val and sorted(held.fold.unique()) == [-1, 0, 1, 2, 3, 4]


def test_fold_file_is_saved_reused_and_refused_when_it_does_not_match(dataset, tmp_path):
    table, path = load_or_make_folds(dataset, 5, "grouped", 0, tmp_path)
    assert path.parent == tmp_path and "grouped_k5_seed0_" in path.name
    subject = table.subject.iloc[0]
    hand_edited = table.copy()
    hand_edited.loc[hand_edited.subject == subject, "fold"] += 1  # a user's own assignment is kept...
    hand_edited.to_csv(path, index=False)
    again, _ = load_or_make_folds(dataset, 5, "grouped", 0, tmp_path)
    assert again.equals(read_fold_table(path))
    table.iloc[2:].to_csv(path, index=False)  # ...but not one that misses videos
    with pytest.raises(FoldError, match="does not match"):
        load_or_make_folds(dataset, 5, "grouped", 0, tmp_path)


def test_too_few_subjects_is_a_clear_error(tiny_root):
    with pytest.raises(FoldError, match="subjects"):
        make_folds(open_dataset(tiny_root), 5)
