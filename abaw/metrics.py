"""Concordance correlation coefficient (CCC): the ABAW valence-arousal metric and our loss.

One implementation serves numpy arrays (the metric) and torch tensors (the loss), so the number
we optimise is the number we report.

Variance convention: **population** moments (divide by N, ``ddof=0``) everywhere, as in the
ABAW organisers' evaluation script. With the sample convention (N-1) the value differs by a
factor that vanishes for the ~10^5-10^6 frames of a challenge set, but matters on short windows,
so we never mix the two.

    CCC(x, y) = 2 cov(x, y) / (var(x) + var(y) + (mean(x) - mean(y))^2)

The official score is ``P = (CCC_v + CCC_a) / 2`` with each CCC computed over all frames of the
set concatenated (not averaged per video).
"""
from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-8  # keeps CCC finite for constant inputs; far below any real variance
INVALID_LABEL = -5.0  # the annotation files' "no label" marker (either column)


def valid_label_mask(labels: np.ndarray) -> np.ndarray:
    """(..., 2) labels -> (...,) True where both values are labels, not the -5 "no label" marker."""
    return (np.asarray(labels) != INVALID_LABEL).all(axis=-1)


def ccc(pred: Any, target: Any, mask: Any = None) -> Any:
    """CCC along axis 0, per column.

    Args:
        pred, target: numpy arrays or torch tensors of shape (N,) or (N, C).
        mask: optional boolean (N,) selecting the frames that count (e.g. labels != -5).

    Returns:
        A scalar for 1-D input, else one CCC per column (C,); same library as the input.
    """
    if mask is not None:
        weight = mask.astype(pred.dtype) if isinstance(pred, np.ndarray) else mask.to(pred.dtype)
        if pred.ndim == 2:
            weight = weight[:, None]
        # A masked frame must not matter even if it holds NaN (NaN * 0 is NaN).
        where = np.where if isinstance(pred, np.ndarray) else _torch_where
        pred, target = where(weight > 0, pred, 0), where(weight > 0, target, 0)
    else:
        weight = pred * 0 + 1
    n = weight.sum(0).clip(min=1)  # an all-masked column yields CCC 0, not NaN

    mean_p = (pred * weight).sum(0) / n
    mean_t = (target * weight).sum(0) / n
    dp = (pred - mean_p) * weight
    dt = (target - mean_t) * weight
    var_p = (dp * dp).sum(0) / n
    var_t = (dt * dt).sum(0) / n
    cov = (dp * dt).sum(0) / n
    return 2 * cov / (var_p + var_t + (mean_p - mean_t) ** 2 + EPS)


def _torch_where(condition, x, fill):
    import torch

    return torch.where(condition, x, torch.zeros((), dtype=x.dtype, device=x.device))


def ccc_loss(pred: Any, target: Any, mask: Any = None) -> Any:
    """Training loss ``sum_d (1 - CCC_d)`` over the flattened batch, masked frames excluded.

    Args:
        pred, target: torch tensors (B, T, 2) or (N, 2).
        mask: boolean (B, T) or (N,): True where the label is valid and the frame is real.
    """
    c = pred.shape[-1]
    flat_mask = None if mask is None else mask.reshape(-1)
    return (1 - ccc(pred.reshape(-1, c), target.reshape(-1, c), flat_mask)).sum()


def score(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """The ABAW score of (N, 2) predictions: CCC of valence, arousal and their mean."""
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if mask is None:
        mask = valid_label_mask(target)
    v, a = ccc(pred, target, np.asarray(mask, dtype=bool))
    return {"valence": float(v), "arousal": float(a), "mean": float((v + a) / 2)}
