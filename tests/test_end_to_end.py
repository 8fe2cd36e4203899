"""From a real CV run on the demo data to a scored submission: the merge must not lose to its parts."""
import numpy as np
import pandas as pd
import pytest

from abaw import demo
from abaw.config import RunConfig
from abaw.cv import run_cv
from abaw.data import open_dataset
from abaw.metrics import score
from abaw.submission import main as make_submission


def _scored(values_by_location: pd.DataFrame, truth: pd.DataFrame) -> float:
    joined = truth.merge(values_by_location, on="image_location", suffixes=("_true", ""))
    return score(joined[["valence", "arousal"]].to_numpy(), joined[["valence_true", "arousal_true"]].to_numpy())["mean"]


@pytest.mark.slow
def test_merged_submission_scores_at_least_the_mean_single_fold_model(small_root, tmp_path):
    dataset = open_dataset(small_root)
    run = tmp_path / "runs" / "tcn"
    config = RunConfig(data_root=str(small_root), arch=["tcn"], folds=4, epochs=3, window=200, hop=100,
                       batch_size=8, out=str(run))
    assert run_cv(config, dataset, folds_dir=tmp_path / "folds") == 0

    out = tmp_path / "submissions" / "s"
    assert make_submission(["--runs", str(run), "--merge", "ccc_centering", "--out", str(out)]) == 0
    submission = pd.read_csv(out / "predictions.txt")
    sample = dataset.sample
    assert submission.image_location.tolist() == sample.image_locations
    assert make_submission(["--check", str(out / "predictions.txt"), "--sample", str(sample.path)]) == 0

    truth = pd.read_csv(small_root / demo.GROUND_TRUTH_NAME)
    truth = truth[(truth[["valence", "arousal"]] != -5).all(axis=1)]
    merged = _scored(submission, truth)
    singles = []
    for k in range(4):
        fold = pd.read_csv(run / "tcn" / "test" / f"fold{k}.csv")
        fold["image_location"] = fold.video + "/" + fold.frame.map("{:05d}.jpg".format)
        singles.append(_scored(fold[["image_location", "valence", "arousal"]].assign(
            valence=lambda t: t.valence.clip(-1, 1), arousal=lambda t: t.arousal.clip(-1, 1)), truth))
    assert merged >= np.mean(singles), (merged, singles)
    assert merged > 0.3  # a trained temporal model, not noise
