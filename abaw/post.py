"""Post-processing of merged predictions: smoothing, a lag shift and an affine calibration, per
dimension, chosen on out-of-fold (OOF) predictions.

Why: a frame-wise model is noisier than the slowly varying labels (HSEmotion's ~100-frame moving
average raised validation CCC 0.51 -> 0.57), valence and arousal vary at different speeds (the
ABAW10 winner smooths them with different kernels), and annotators react late, so the labels lag
the face and delaying the predictions can help.

One dimension's post-processing (:class:`DimensionPost`) is, in this order::

    smooth (kind, window)  ->  lag shift (lag frames)  ->  calibrate (scale * x + shift)

Missing predictions (NaN) never change place: every step returns NaN exactly where its input is
NaN, so all candidates are scored on the same frames and a submission never gains or loses frames.
Smoothing is a normalised convolution: the kernel is renormalised over the finite frames it covers,
so a video's first and last frames are not pulled toward 0 (no zero padding) and a NaN frame
neither spreads nor gets filled. Each video is processed on its own.

:class:`PostProcessor` follows scikit-learn's estimator contract and picks, per dimension, the
candidate with the best CCC on OOF predictions (``post="auto"``), or applies a fixed choice (a SPEC
string, see :func:`parse_spec`). :func:`nested_post` gives the honest estimate of the automatic
choice: each fold's videos are post-processed by a choice fitted on the other folds only.

Selection is cheap because CCC needs only six sums: n, Σx, Σy, Σx², Σy², Σxy over the scored
frames. They are accumulated per fold for every (smoothing, lag) candidate; CCC with or without
calibration (closed form from the same sums) over any union of folds follows in O(1).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import NotFittedError

from .metrics import EPS, INVALID_LABEL, valid_label_mask

KINDS = ("mean", "gaussian", "median")
DIMENSIONS = ("valence", "arousal")
SPREAD_FLOOR = 1e-12  # below this prediction std the calibration keeps scale 1 (as WeightedCalibratedMerge)
TIE_TOLERANCE = 1e-9  # a candidate must beat a simpler one (earlier in the grid) by more than this CCC

# ---------------------------------------------------------------------------------------------
# Operations on one (T,) series


def _check_window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd integer >= 1 (a centred window), got {window!r}")
    return int(window)


def _series(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected a (T,) series, got shape {x.shape}")
    return x


def smooth(x, kind: str, window: int) -> np.ndarray:
    """``x`` smoothed over a centred ``window`` of frames (odd; 1 returns a copy).

    ``kind``: "mean" (moving average), "gaussian" (Gaussian weights, std = window / 6, cut at the
    window) or "median" (running median). Only the finite frames inside the series count, each
    output frame being the (weighted) mean or median of those its window covers: windows are
    truncated at the ends (no padding pulls the edges toward 0) and skip NaN frames. The output is
    NaN exactly where ``x`` is not finite.
    """
    x = _series(x)
    window = _check_window(window)
    if kind not in KINDS + ("none",):
        raise ValueError(f"unknown smoothing {kind!r}; choose one of {', '.join(KINDS)}")
    if window == 1 or kind == "none" or len(x) == 0:
        return x.copy()
    finite = np.isfinite(x)
    if kind == "median":
        out = _running_median(x, finite, window)
    elif kind == "mean":
        out = _moving_mean(x, finite, window)
    else:
        out = _gaussian(x, finite, window)
    out[~finite] = np.nan
    return out


def _moving_mean(x: np.ndarray, finite: np.ndarray, window: int) -> np.ndarray:
    """Window sums of values and of finite-frame counts from cumulative sums: O(T) in any window."""
    half = window // 2
    level = x[finite].mean() if finite.any() else 0.0
    # Centring first keeps the running sum small, so the difference of two sums loses no precision.
    values = np.concatenate([[0.0], np.cumsum(np.where(finite, x - level, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    # Edge padding of the cumulative sums = a window truncated at the ends.
    values, counts = np.pad(values, half, mode="edge"), np.pad(counts, half, mode="edge")
    n = len(x)
    total = values[window:window + n] - values[:n]
    count = counts[window:window + n] - counts[:n]
    return level + total / np.maximum(count, 1)


def gaussian_kernel(window: int) -> np.ndarray:
    """The (unnormalised) Gaussian weights of ``window`` frames, std = window / 6: the window is ±3 std."""
    half = _check_window(window) // 2
    offsets = np.arange(-half, half + 1)
    return np.exp(-0.5 * (offsets / (window / 6.0)) ** 2)


def _gaussian(x: np.ndarray, finite: np.ndarray, window: int) -> np.ndarray:
    """Normalised convolution: Σ w x / Σ w over the finite frames the kernel covers."""
    kernel, half, n = gaussian_kernel(window), window // 2, len(x)
    # The full convolution, sliced, zero-pads outside the series (for any T, unlike mode="same");
    # np.convolve is a direct sum, exact to rounding, and faster than an FFT for these windows.
    total = np.convolve(np.where(finite, x, 0.0), kernel)[half:half + n]
    weight = np.convolve(finite.astype(np.float64), kernel)[half:half + n]
    return total / np.where(weight > 0, weight, 1.0)  # a finite frame weighs itself: weight >= 1 there


def _window_counts(flags: np.ndarray, window: int) -> np.ndarray:
    """How many flagged frames each centred, truncated window holds (cumulative sums, O(T))."""
    counts = np.pad(np.concatenate([[0], np.cumsum(flags)]), window // 2, mode="edge")
    return counts[window:window + len(flags)] - counts[:len(flags)]


def _running_median(x: np.ndarray, finite: np.ndarray, window: int) -> np.ndarray:
    """Frames whose whole window is inside the series and finite take scipy's plain running median;
    the others (near an end or a gap) the gap-aware one, computed only on the pieces they need."""
    half, n = window // 2, len(x)
    plain = (_window_counts(~finite, window) == 0) & (_window_counts(np.ones(n, bool), window) == window)
    need = finite & ~plain
    covered = _window_counts(need, window) > 0  # the frames the needy frames' windows reach
    if covered.mean() > 0.5:  # mostly needy: one gap-aware pass is cheaper than both
        return _gap_median(x, finite, window)
    out = ndimage.median_filter(np.where(finite, x, 0.0), size=window, mode="nearest")
    if need.any():
        # The covered runs laid end to end, ``half`` non-frames apart, so no window crosses from
        # one run into the next; a needy frame's whole window lies inside its own run.
        positions = np.flatnonzero(covered)
        run = np.cumsum(np.diff(positions, prepend=-2) > 1) - 1
        placed = np.arange(len(positions)) + half * run
        pieces = np.full(placed[-1] + 1, np.nan)
        pieces[placed] = x[positions]
        median = _gap_median(pieces, np.isfinite(pieces), window)
        needed = need[positions]
        out[positions[needed]] = median[placed[needed]]
    return out


def _gap_median(x: np.ndarray, finite: np.ndarray, window: int) -> np.ndarray:
    """Median of the finite frames in each truncated window, with two running rank filters.

    Each frame becomes two entries: (x, x) when finite, (-inf, +inf) when not, and the series is
    padded with ``half`` such non-frames at both ends. Doubling a set keeps its median, and adding
    as many -inf as +inf keeps it too, so the median of a frame's 2 * window entries (the mean of
    the two middle ones) is the median of its finite frames. O(T log window) like the plain filter.
    """
    half, n = window // 2, len(x)
    padded_finite = np.pad(finite, half, constant_values=False)
    padded = np.pad(np.where(finite, x, 0.0), half)
    entries = np.empty(2 * len(padded))
    entries[0::2] = np.where(padded_finite, padded, -np.inf)
    entries[1::2] = np.where(padded_finite, padded, np.inf)
    # With an even size s, ndimage's window at index i covers i - s/2 .. i + s/2 - 1; frame t's
    # 2 * window entries start at 2t, so its result sits at index 2t + window.
    size = 2 * window
    low = ndimage.rank_filter(entries, rank=window - 1, size=size, mode="nearest")
    high = ndimage.rank_filter(entries, rank=window, size=size, mode="nearest")
    at = slice(window, window + 2 * n, 2)
    with np.errstate(invalid="ignore"):  # -inf + inf where a window holds no finite frame (output NaN anyway)
        return (low[at] + high[at]) / 2


def _hold_indices(finite: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every position, the last finite position at or before it (-1: none) and the first at or after (n: none)."""
    n = len(finite)
    positions = np.arange(n)
    before = np.maximum.accumulate(np.where(finite, positions, -1))
    after = np.minimum.accumulate(np.where(finite, positions, n)[::-1])[::-1]
    return before, after


def _source_index(at: np.ndarray, lag: int, start: np.ndarray, end: np.ndarray,
                  before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Where frame ``at`` (in a video occupying ``start:end``) takes its lag-shifted value from.

    The source is ``at - lag`` held inside the video; when it has no prediction, the nearest
    finite frame on the side the values come from (earlier for lag >= 0, later for lag < 0), else
    the nearest on the other side: the same holding rule as at the video's ends.
    """
    source = np.clip(at - lag, start, end - 1)
    if lag >= 0:
        near, far = before[source], after[source]
        held = np.where(near >= start, near, far)
    else:
        near, far = after[source], before[source]
        held = np.where(near < end, near, far)
    return np.where((held >= start) & (held < end), held, source)  # a video without any prediction


def shift(x, lag: int) -> np.ndarray:
    """out[t] = x[t - lag]: a positive lag delays the predictions (annotators react late).

    Frames before the start hold x[0]; a negative lag advances and the last frames hold x[-1].
    NaN frames stay NaN; a frame whose source is NaN holds the nearest finite value on the source
    side (the edge rule applied to gaps), so the set of predicted frames never changes.
    """
    x = _series(x)
    lag = int(lag)
    n = len(x)
    if lag == 0 or n == 0:
        return x.copy()
    finite = np.isfinite(x)
    before, after = _hold_indices(finite)
    out = x[_source_index(np.arange(n), lag, np.zeros(n, int), np.full(n, n), before, after)]
    out[~finite] = np.nan
    return out


def _moments(n, sum_x, sum_y, sum_xx, sum_yy, sum_xy):
    """Population means, variances and covariance from the six sums (arrays broadcast)."""
    n = np.maximum(n, 1)
    mean_x, mean_y = sum_x / n, sum_y / n
    var_x = np.maximum(sum_xx / n - mean_x ** 2, 0.0)
    var_y = np.maximum(sum_yy / n - mean_y ** 2, 0.0)
    return mean_x, mean_y, var_x, var_y, sum_xy / n - mean_x * mean_y


def _calibrated_ccc(stats: np.ndarray, calibrate):
    """CCC of (scale * x + shift, y) from sums (..., 6) = n, Σx, Σy, Σx², Σy², Σxy, and (scale, shift).

    ``calibrate`` (bool or bool array): fit the affine map, else scale 1 and shift 0. The house rule
    of :class:`abaw.ensemble.WeightedCalibratedMerge`: when x correlates positively with y, match
    the labels' mean and std, which maximises CCC and makes it Pearson's r; otherwise keep scale 1
    (stretching an anti-correlated or constant prediction only lowers CCC) and match the mean.
    """
    mean_x, mean_y, var_x, var_y, cov = _moments(*np.moveaxis(stats, -1, 0))
    calibrate = np.asarray(calibrate, dtype=bool)
    stretch = calibrate & (np.sqrt(var_x) > SPREAD_FLOOR) & (cov > 0)
    scale = np.where(stretch, np.sqrt(var_y / np.where(var_x > 0, var_x, 1.0)), 1.0)
    offset = np.where(calibrate, mean_y - scale * mean_x, 0.0)
    mean_z = scale * mean_x + offset
    value = 2 * scale * cov / (scale ** 2 * var_x + var_y + (mean_z - mean_y) ** 2 + EPS)
    return value, scale, offset


def _sums(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.array([len(x), x.sum(), y.sum(), x @ x, y @ y, x @ y], dtype=np.float64)


def fit_calibration(x, y) -> tuple[float, float]:
    """(scale, shift) making ``scale * x + shift`` CCC-optimal for ``y`` on the frames where both are finite.

    The rule of :func:`_calibrated_ccc`: match y's mean and std if x correlates positively with y
    (CCC then equals Pearson's r), else keep scale 1 and match the mean.
    """
    x, y = _series(x), _series(y)
    keep = np.isfinite(x) & np.isfinite(y)
    _, scale, offset = _calibrated_ccc(_sums(x[keep], y[keep]), True)
    return float(scale), float(offset)


def calibrate(x, scale: float, shift: float) -> np.ndarray:
    """``scale * x + shift``, the affine calibration :func:`fit_calibration` fits (NaN stays NaN)."""
    return scale * _series(x) + shift


# ---------------------------------------------------------------------------------------------
# One dimension's choice and the SPEC grammar

SPEC_GRAMMAR = (
    "SPEC = STEPS (both dimensions) | 'valence=' STEPS ';' 'arousal=' STEPS (either order; "
    "a dimension left out is 'none'); STEPS = 'none' | STEP[,STEP...], each step at most once; "
    "STEP = KIND ':' WINDOW (KIND: mean | gaussian | median, WINDOW: odd integer >= 1) "
    "| 'lag:' INT (frames; > 0 delays) | 'cal' (affine calibration fitted in fit). "
    "Examples: 'gaussian:31,lag:8,cal', 'valence=gaussian:61,lag:8;arousal=mean:15'. "
    "PostProcessor also takes 'auto'."
)


@dataclass(frozen=True)
class DimensionPost:
    """One dimension's post-processing: ``kind`` smoothing over ``window`` frames, then a ``lag``
    shift, then (if ``calibrate``) ``scale * x + shift``. ``scale``/``shift`` are None until fitted.

    ``kind="none"`` (window 1) does not smooth; any kind with window 1 is stored as "none".
    """

    kind: str = "none"
    window: int = 1
    lag: int = 0
    calibrate: bool = False
    scale: float | None = None
    shift: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS + ("none",):
            raise ValueError(f"unknown smoothing {self.kind!r}; choose one of none, {', '.join(KINDS)}")
        window = _check_window(self.window)
        if self.kind == "none" and window != 1:
            raise ValueError(f"kind 'none' takes window 1, got {window}")
        object.__setattr__(self, "window", window)
        if window == 1:
            object.__setattr__(self, "kind", "none")
        object.__setattr__(self, "lag", int(self.lag))
        if not self.calibrate and (self.scale is not None or self.shift is not None):
            raise ValueError("scale and shift belong to a calibrated DimensionPost")
        if (self.scale is None) != (self.shift is None):
            raise ValueError("give both scale and shift, or neither")

    @property
    def fitted(self) -> bool:
        """Whether it can be applied: no calibration, or a fitted one."""
        return not self.calibrate or self.scale is not None

    def apply(self, x) -> np.ndarray:
        """The (T,) series post-processed: smooth -> shift -> calibrate."""
        if not self.fitted:
            raise NotFittedError(f"{self.text()}: the calibration is not fitted yet")
        out = smooth(x, self.kind, self.window)
        out = shift(out, self.lag)
        return calibrate(out, self.scale, self.shift) if self.calibrate else out

    def spec(self) -> str:
        """The SPEC steps of this choice (fitted calibration values are not part of a SPEC)."""
        steps = [] if self.kind == "none" else [f"{self.kind}:{self.window}"]
        steps += [f"lag:{self.lag}"] if self.lag else []
        steps += ["cal"] if self.calibrate else []
        return ",".join(steps) or "none"

    def text(self) -> str:
        """A short human description, e.g. "gaussian 31, lag 8, calibrated x1.12 +0.03"."""
        parts = [] if self.kind == "none" else [f"{self.kind} {self.window}"]
        parts += [f"lag {self.lag}"] if self.lag else []
        if self.calibrate:
            parts.append(f"calibrated x{self.scale:.2f} {self.shift:+.2f}" if self.fitted else "calibrated (to fit)")
        return ", ".join(parts) or "none"

    __str__ = text

    def describe(self) -> dict:
        """Plain values for manifest.json."""
        return {"kind": self.kind, "window": self.window, "lag": self.lag, "calibrate": self.calibrate,
                "scale": None if self.scale is None else round(float(self.scale), 6),
                "shift": None if self.shift is None else round(float(self.shift), 6), "text": self.text()}


IDENTITY = DimensionPost()


class SpecError(ValueError):
    """A post-processing SPEC string that does not parse."""


def _spec_error(spec: str, part: str, why: str) -> SpecError:
    return SpecError(f"bad post-processing SPEC {spec!r}: {part!r} {why}. Grammar: {SPEC_GRAMMAR}")


def _parse_steps(steps: str, spec: str) -> DimensionPost:
    if steps == "none":
        return IDENTITY
    fields: dict[str, object] = {}
    for step in steps.split(","):
        if step == "cal":
            key, value = "calibrate", True
        elif step.count(":") == 1 and step.split(":")[0] in KINDS + ("lag",):
            name, number = step.split(":")
            if not re.fullmatch(r"[+-]?\d+", number):
                raise _spec_error(spec, step, "needs an integer after ':'")
            if name == "lag":
                key, value = "lag", int(number)
            elif int(number) < 1 or int(number) % 2 == 0:
                raise _spec_error(spec, step, "needs an odd window >= 1 (a centred window)")
            else:
                key, value = "smoothing", (name, int(number))
        else:
            raise _spec_error(spec, step, "is not a step" if step else "is an empty step")
        if key in fields:
            raise _spec_error(spec, step, f"repeats a {key} step")
        fields[key] = value
    kind, window = fields.pop("smoothing", ("none", 1))
    return DimensionPost(kind, window, **fields)


def parse_spec(spec: str) -> tuple[DimensionPost, DimensionPost]:
    """A SPEC string (see ``SPEC_GRAMMAR``) as (valence, arousal) choices; calibrations unfitted."""
    if not isinstance(spec, str):
        raise SpecError(f"a post-processing SPEC is a string, got {spec!r}. Grammar: {SPEC_GRAMMAR}")
    text = re.sub(r"\s+", "", spec)
    if not text:
        raise _spec_error(spec, spec, "is empty")
    if "=" not in text:
        if ";" in text:
            raise _spec_error(spec, text, "has ';' but no 'valence=' / 'arousal='")
        both = _parse_steps(text, spec)
        return both, both
    chosen: dict[str, DimensionPost] = {}
    for part in text.split(";"):
        name, _, steps = part.partition("=")
        if name not in DIMENSIONS or not steps:
            raise _spec_error(spec, part, "is not 'valence=STEPS' or 'arousal=STEPS'")
        if name in chosen:
            raise _spec_error(spec, part, f"gives {name} twice")
        chosen[name] = _parse_steps(steps, spec)
    return chosen.get("valence", IDENTITY), chosen.get("arousal", IDENTITY)


def format_spec(dims: Sequence[DimensionPost]) -> str:
    """The SPEC of (valence, arousal) choices; the short form when both are the same."""
    valence, arousal = (d.spec() for d in dims)
    return valence if valence == arousal else f"valence={valence};arousal={arousal}"


# ---------------------------------------------------------------------------------------------
# Candidate statistics


@dataclass(frozen=True)
class _Grid:
    """One dimension's candidates: every smoothing x lag x calibration; the identity comes first
    and simpler candidates precede (ties go to them)."""

    smoothings: tuple[tuple[str, int], ...]
    lags: tuple[int, ...]
    calibrations: tuple[bool, ...]

    @classmethod
    def single(cls, post: DimensionPost) -> "_Grid":
        return cls(((post.kind, post.window),), (post.lag,), (post.calibrate,))

    def size(self) -> int:
        return len(self.smoothings) * len(self.lags) * len(self.calibrations)

    def candidate(self, i: int, j: int, k: int) -> DimensionPost:
        kind, window = self.smoothings[i]
        return DimensionPost(kind, window, self.lags[j], self.calibrations[k])


@dataclass
class _Layout:
    """The videos laid end to end, grouped by fold, with NaN gaps wider than any half window, so
    one smoothing pass over the whole layout equals smoothing every video on its own."""

    values: np.ndarray     # (N, 2) predictions, NaN in the gaps
    at: np.ndarray         # (M,) positions of the scored frames: labelled, both predictions finite
    start: np.ndarray      # (M,) their video's first position
    end: np.ndarray        # (M,) one past their video's last position
    target: np.ndarray     # (M, 2) their labels
    offsets: np.ndarray    # (G,) index into ``at`` where each group's frames begin
    counts: np.ndarray     # (G,) scored frames per group
    groups: list           # (G,) the group keys

    def group_sums(self, x: np.ndarray) -> np.ndarray:
        """(G,) sums of x over each group's scored frames (frames are sorted by group)."""
        out = np.zeros(len(self.groups))
        filled = self.counts > 0
        if filled.any():
            out[filled] = np.add.reduceat(x, self.offsets[filled])
        return out


def _aligned_labels(labels: np.ndarray, length: int) -> np.ndarray:
    """Labels trimmed, or padded with unlabelled frames, to the prediction length (as score_videos scores)."""
    if len(labels) >= length:
        return labels[:length]
    return np.concatenate([labels, np.full((length - len(labels), 2), INVALID_LABEL)])


def _check_predictions(predictions: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(predictions, Mapping):
        raise TypeError(f"predictions must be a dict video -> (T, 2) array, got {type(predictions).__name__}")
    out = {}
    for video, array in predictions.items():
        array = np.asarray(array, dtype=np.float64)
        if array.ndim != 2 or array.shape[1] != 2:
            raise ValueError(f"{video!r}: expected predictions of shape (T, 2), got {array.shape}")
        out[video] = array
    return out


def _layout(predictions: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
            group_of: Mapping[str, object], gap: int) -> _Layout:
    predictions = _check_predictions(predictions)
    missing = [v for v in predictions if v not in labels]
    if missing:
        raise ValueError(f"no labels for {len(missing)} video(s), e.g. {missing[:3]}")
    groups = list(dict.fromkeys(group_of[v] for v in predictions))
    videos = sorted(predictions, key=lambda v: groups.index(group_of[v]))  # stable: groups contiguous
    total = gap + sum(len(predictions[v]) + gap for v in videos)
    values = np.full((total, 2), np.nan)
    target = np.full((total, 2), INVALID_LABEL)
    start, end, group = np.zeros(total, int), np.zeros(total, int), np.zeros(total, int)
    position = gap
    for video in videos:
        n = len(predictions[video])
        frames = slice(position, position + n)
        values[frames] = predictions[video]
        target[frames] = _aligned_labels(np.asarray(labels[video], np.float64).reshape(-1, 2), n)
        start[frames], end[frames], group[frames] = position, position + n, groups.index(group_of[video])
        position += n + gap
    at = np.flatnonzero(valid_label_mask(target) & np.isfinite(values).all(axis=1))
    counts = np.bincount(group[at], minlength=len(groups))
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return _Layout(values, at, start[at], end[at], target[at], offsets, counts, groups)


def _dimension_statistics(layout: _Layout, d: int, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Per-group sums for every candidate of dimension ``d``.

    Returns ``base`` (G, 6): n, Σy, Σy², and Σx, Σx², Σxy of the unprocessed predictions x; and
    ``moving`` (smoothings, lags, G, 3): Σz, Σz², Σzy of each smoothed, shifted series z. Each
    smoothing is computed once (over the whole layout); each lag is then a gather.
    """
    x, y = layout.values[:, d], layout.target[:, d]
    sums = layout.group_sums

    def moments(z):
        return np.stack([sums(z), sums(z * z), sums(z * y)], axis=-1)

    before, after = _hold_indices(np.isfinite(x))
    sources = [_source_index(layout.at, lag, layout.start, layout.end, before, after) for lag in grid.lags]
    base = np.concatenate([np.stack([layout.counts.astype(np.float64), sums(y), sums(y * y)], axis=-1),
                           moments(x[layout.at])], axis=-1)
    moving = np.empty((len(grid.smoothings), len(grid.lags), len(layout.groups), 3))
    for i, (kind, window) in enumerate(grid.smoothings):
        smoothed = smooth(x, kind, window)
        for j, source in enumerate(sources):
            moving[i, j] = moments(np.take(smoothed, source))  # np.take: ~4x faster than smoothed[source]
    return base, moving


def _six(base: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """(..., 6) sums n, Σz, Σy, Σz², Σy², Σzy from ``base`` (n, Σy, Σy², ...) and ``moving`` (..., 3)."""
    n, sum_y, sum_yy = (np.broadcast_to(base[k], moving.shape[:-1]) for k in range(3))
    return np.stack([n, moving[..., 0], sum_y, moving[..., 1], sum_yy, moving[..., 2]], axis=-1)


@dataclass
class _Choice:
    post: DimensionPost
    ccc: float       # the chosen candidate's CCC on the frames it was chosen on
    identity: float  # the unprocessed predictions' CCC on the same frames
    frames: int


def _choose(grid: _Grid, base: np.ndarray, moving: np.ndarray, keep: np.ndarray) -> _Choice:
    """The best candidate over the groups in ``keep`` (bool (G,)), its calibration fitted on them."""
    b, m = base[keep].sum(axis=0), moving[:, :, keep].sum(axis=2)  # (6,), (S, L, 3)
    if b[0] < 2:
        raise ValueError(f"need at least 2 labelled frames with predictions to fit, got {int(b[0])}")
    value, scale, offset = _calibrated_ccc(_six(b, m)[:, :, None, :], np.array(grid.calibrations))  # (S, L, C)
    flat = value.ravel()
    best = int(np.flatnonzero(flat >= flat.max() - TIE_TOLERANCE)[0])  # the simplest of the near-best
    i, j, k = np.unravel_index(best, value.shape)
    post = grid.candidate(i, j, k)
    if post.calibrate:
        post = DimensionPost(post.kind, post.window, post.lag, True, float(scale[i, j, k]), float(offset[i, j, k]))
    identity, _, _ = _calibrated_ccc(_six(b, b[3:]), False)
    return _Choice(post, float(value[i, j, k]), float(identity), int(b[0]))


# ---------------------------------------------------------------------------------------------
# The estimator


class PostProcessor(BaseEstimator):
    """Smoothing, lag shift and calibration of merged predictions, per dimension.

    Parameters (stored as given; checked in ``fit``/``transform``):

    * ``post``: "auto" (choose on the fitted videos), "none", or a SPEC string (see
      ``SPEC_GRAMMAR``) fixing the choice; "cal" in a SPEC is fitted in ``fit``. A SPEC without
      "cal" ("none" included) learns nothing and needs no ``fit``.
    * ``kinds``, ``windows``, ``lags``, ``calibrate``: the "auto" grid. Windows are odd frame
      counts spaced about x1.6 (CCC changes smoothly in log-window), 5 frames to 241 (~8 s at
      Aff-Wild2's 30 fps; HSEmotion's gain came from ~100 frames, and on the demo arousal chose
      151, the end of a grid that stopped there). Lags 0-32 frames (0 to ~1 s)
      cover the annotators' reaction delay; add negative lags to allow advancing. The identity
      (no smoothing, lag 0, no calibration) is always a candidate, and so are lag 0, no smoothing
      and no calibration, whatever the grid.

    Learned attributes: ``dims_`` (valence, arousal) :class:`DimensionPost`, ``spec_`` (their
    SPEC), ``fit_ccc_`` and ``identity_ccc_`` ((2,) CCC of the choice and of the unprocessed
    predictions on the fitted frames: optimistic for "auto", see :func:`nested_post`),
    ``n_fit_frames_``, ``n_candidates_`` (per dimension).
    """

    def __init__(self, post: str = "auto", kinds: Sequence[str] = KINDS,
                 windows: Sequence[int] = (5, 9, 15, 25, 41, 61, 101, 151, 241),
                 lags: Sequence[int] = (0, 4, 8, 12, 16, 24, 32), calibrate: Sequence[bool] = (False, True)):
        self.post = post
        self.kinds = kinds
        self.windows = windows
        self.lags = lags
        self.calibrate = calibrate

    # -- the plan ---------------------------------------------------------------------------

    def _grids(self) -> tuple[_Grid, _Grid]:
        if self.post != "auto":
            return tuple(_Grid.single(d) for d in parse_spec(self.post))
        for kind in self.kinds:
            if kind not in KINDS:
                raise ValueError(f"unknown smoothing {kind!r} in kinds; choose from {', '.join(KINDS)}")
        windows = [_check_window(w) for w in self.windows]
        smoothings = [("none", 1)] + [(kind, window) for kind in dict.fromkeys(self.kinds)
                                      for window in dict.fromkeys(windows) if window > 1]
        lags = [0] + [int(lag) for lag in dict.fromkeys(self.lags) if int(lag) != 0]
        calibrations = (False, True) if np.atleast_1d(self.calibrate).any() else (False,)
        grid = _Grid(tuple(smoothings), tuple(lags), calibrations)
        return grid, grid

    def _needs_fit(self) -> bool:
        return self.post == "auto" or any(d.calibrate for d in parse_spec(self.post))

    def _max_window(self) -> int:
        return max(w for grid in self._grids() for _, w in grid.smoothings)

    def _statistics(self, predictions, labels, group_of) -> tuple[_Layout, list]:
        grids = self._grids()
        layout = _layout(predictions, labels, group_of, gap=self._max_window() // 2 + 1)
        return layout, [_dimension_statistics(layout, d, grids[d]) for d in range(2)]

    def _fit_statistics(self, layout: _Layout, statistics: list, keep: np.ndarray) -> "PostProcessor":
        choices = [_choose(grid, *stats, keep) for grid, stats in zip(self._grids(), statistics)]
        self.dims_ = tuple(c.post for c in choices)
        self.spec_ = format_spec(self.dims_)
        self.fit_ccc_ = np.array([c.ccc for c in choices])
        self.identity_ccc_ = np.array([c.identity for c in choices])
        self.n_fit_frames_ = choices[0].frames
        self.n_candidates_ = self._grids()[0].size()
        return self

    # -- the estimator ----------------------------------------------------------------------

    def fit(self, predictions: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
            groups: Mapping[str, int] | None = None) -> "PostProcessor":
        """Choose (and calibrate) on all given videos' labelled frames concatenated.

        ``predictions``: video -> (T, 2), NaN = no prediction; ``labels``: video -> (T, 2), -5 =
        unlabelled (trimmed or padded to the prediction length). ``groups`` (video -> fold) is
        accepted for a uniform call with :func:`nested_post` and not used: fit on OOF predictions,
        and score the choice with :func:`nested_post`.
        """
        layout, statistics = self._statistics(predictions, labels, {v: 0 for v in predictions})
        return self._fit_statistics(layout, statistics, np.ones(len(layout.groups), bool))

    def _dims(self) -> tuple[DimensionPost, DimensionPost]:
        if hasattr(self, "dims_"):
            return self.dims_
        if self._needs_fit():
            raise NotFittedError(f"This PostProcessor (post={self.post!r}) learns its choice or calibration: "
                                 "call fit before transform")
        return parse_spec(self.post)

    def transform(self, predictions: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """video -> (T, 2) post-processed, same lengths, NaN exactly where the input is NaN."""
        dims = self._dims()
        return {video: np.stack([dims[d].apply(array[:, d]) for d in range(2)], axis=1)
                for video, array in _check_predictions(predictions).items()}

    def fit_transform(self, predictions, labels, groups=None) -> dict[str, np.ndarray]:
        return self.fit(predictions, labels, groups).transform(predictions)

    def describe(self) -> dict:
        """The choice as plain values for manifest.json."""
        dims = self._dims()
        out = {"post": self.post, "spec": format_spec(dims),
               **{name: d.describe() for name, d in zip(DIMENSIONS, dims)}}
        if hasattr(self, "dims_"):
            out.update(fit_ccc=self.fit_ccc_.round(6).tolist(), identity_ccc=self.identity_ccc_.round(6).tolist(),
                       fit_frames=int(self.n_fit_frames_), candidates=int(self.n_candidates_))
        return out


def nested_post(post: PostProcessor, predictions: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                groups: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Every video post-processed by a clone of ``post`` fitted on the other groups' videos only.

    The honest out-of-fold estimate of ``post``'s choice: no video is post-processed by a choice
    (or calibration) that saw its labels. The per-group sums of every candidate are computed once;
    each clone's fit then sums them over the other groups, which equals fitting it on those videos.
    """
    predictions = _check_predictions(predictions)
    missing = [v for v in predictions if v not in groups]
    if missing:
        raise ValueError(f"no group for {len(missing)} video(s), e.g. {missing[:3]}")
    group_of = {v: groups[v] for v in predictions}
    distinct = list(dict.fromkeys(group_of.values()))
    if len(distinct) < 2:
        raise ValueError(f"nested post-processing needs videos from at least 2 groups (folds), got {len(distinct)}")
    if not post._needs_fit():
        return clone(post).transform(predictions)
    layout, statistics = clone(post)._statistics(predictions, labels, group_of)
    out: dict[str, np.ndarray] = {}
    for group in distinct:
        keep = np.array([g != group for g in layout.groups])
        fitted = clone(post)._fit_statistics(layout, statistics, keep)
        out.update(fitted.transform({v: p for v, p in predictions.items() if group_of[v] == group}))
    return {v: out[v] for v in predictions}
