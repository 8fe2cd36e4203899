"""Scoring a written submission against known test labels (the demo dataset's)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..data import IMAGE_LOCATION_PATTERN, SampleFile
from ..honest import Kind, ReportRow, Source
from ..metrics import score, valid_label_mask


def read_submission(path: str | Path) -> dict[str, np.ndarray]:
    """A single-file submission as video -> (T, 2), NaN at frames it does not list."""
    import pandas as pd

    table = pd.read_csv(path, dtype={"image_location": str}, keep_default_na=False, na_values=[""])
    parts = table["image_location"].str.extract(IMAGE_LOCATION_PATTERN)
    table["video"], table["frame"] = parts["video"], parts["frame"].astype(int)
    out = {}
    for video, group in table.groupby("video", sort=False):
        array = np.full((int(group["frame"].max()), 2), np.nan)
        array[group["frame"].to_numpy() - 1] = group[["valence", "arousal"]].to_numpy(np.float64)
        out[video] = array
    return out


def submission_score_row(values: np.ndarray, sample: SampleFile, truth: Mapping[str, np.ndarray],
                         merge: str, post: str | None = None) -> ReportRow:
    """The written values (clipped, frames carried) scored row by row against the demo's test labels."""
    target = np.array([truth[v][f - 1] for v, f in zip(sample.videos.tolist(), sample.frames.tolist())])
    labelled = valid_label_mask(target)
    result = score(values, target, labelled)
    name = f"submission ({merge}" + (f", post {post})" if post and post != "none" else ")")
    return ReportRow(Kind.SUBMISSION, name, Source.TEST, result["valence"], result["arousal"], result["mean"],
                     int(labelled.sum()), len(set(sample.videos.tolist())), merge=merge, post=post,
                     fitted_on="OOF; the submission file's values")
