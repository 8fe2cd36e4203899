"""Context ridge: a classical member of the zoo. Ridge regression on multi-scale context features.

On a small real dataset (160 sequences, ~8,500 labelled frames, 20-d features) a ridge regression on
the frame features, their mean over a centred window and the sequence mean scored mean CCC 0.58,
above our neural default (0.52). This is that model, grown a little and made to scale.

    from abaw.models import create_model
    model = create_model("context_ridge", size="demo", input_dims={"visual": 768})
    model.fit(train_videos)          # list[VideoRecord] -> self; labelled frames (label_mask) are the targets
    pred = model.predict(video)      # (T, 2) float32 valence, arousal; finite for every frame
    model.save(folder); ContextRidge.load(folder)   # model.npz (arrays) + model.json (config); no pickle

Design matrix, per modality m and frame t (``context_features``)::

    z_t        (k,)  the frame's feature, centred by the training mean, PCA-projected to k = max_dim
                     components when wider than max_dim (else k = D_m); 0 where the frame has no face
    p_t        (1,)  presence: 1 where the frame has its feature              (with presence=True)
    ctx_w(z)_t (k,)  mean of z over the present frames of the centred window [t - w//2, t + w//2],
                     cut at the video's edges (the mean renormalises: it divides by the frames it has);
                     0 when the window has no present frame                   (one block per scale w)
    ctx_w(p)_t (1,)  share of the window's frames that have the feature        (with presence=True)
    mean(z)    (k,)  the video's mean of z over its present frames, broadcast  (with video_mean=True)
    mean(p)    (1,)  the video's face share                                    (with video_mean, presence)

so each modality gives (1 + len(scales) + video_mean) * (k + presence) columns (390 for 64 components,
4 scales, video mean, presence), and several modalities are concatenated. A linear map of box means
of several widths is a multi-scale smoother of the features: the temporal model a per-frame ridge
lacks. A video with no face at all gets zeros and presence 0: a finite prediction (the intercept
plus the presence terms).

Fit, streaming (the training set never sits in RAM; only one video's design matrix, float32):

1. Projection pass: per modality, the mean of the present frames and, when D_m > max_dim, their
   covariance, both from every ``pca_stride``-th frame (neighbouring frames at 25-60 fps are near
   duplicates; only those rows are read), accumulated in float64 over float32 chunks of the
   memory-mapped files. PCA = the top eigenvectors of that covariance. Label-free; its frames are
   the training videos' only.
2. Statistics pass: the training videos are split into ``inner_folds`` groups by subject (balanced
   by labelled frames; the parts and sides of a recording stay together). Each video's design
   matrix is built in float32 and its labelled rows added, in float64, to its group's sufficient
   statistics: n, sum x, X'X, X'y, sum y, sum y^2.
3. Alpha: for each group g, the ridge path fitted on the other groups' statistics (all groups minus
   g) predicts g, and the CCC-relevant sums of those predictions follow exactly from g's statistics
   (sum p = w'sum_x + n b, sum p^2 = w'X'Xw + 2b w'sum_x + n b^2, sum py = w'X'y + b sum_y): the
   leave-one-group-out CCC of every alpha without a second pass over the data. Alpha is chosen per
   target (valence, arousal) by the CCC of the calibrated out-of-group predictions (step 4).
4. Calibration: ridge shrinks its predictions towards the mean and CCC punishes shrinkage, so the
   predictions are mapped affinely to match the labels' mean and standard deviation, as measured on
   the pooled out-of-group predictions (scaled only where their correlation with the labels is
   positive; else only shifted). With a positive correlation this gives the largest CCC an affine
   map can: the correlation itself.
5. The final weights: the ridge fitted on all groups with the chosen alpha, then calibrated.

Penalty: on standardised columns (each column's training mean and standard deviation, exact from
the statistics), the intercept unpenalised. ``alpha`` is per frame: the solution minimises
mean squared error + alpha * |beta|^2 over standardised columns, i.e. scikit-learn's
``Ridge(alpha * n)`` on the standardised design (equivalently a penalty alpha * sum_j var_j w_j^2 on
the raw columns), so one grid fits datasets of any size. Constant columns get weight 0.

Cost. Time: one pass reading the features for the projection and one for the statistics, O(frames
x D x k) for the projection, O(labelled frames x P^2) for the statistics (P = design width), and
O(groups x P^3) for the solves. Memory: O(groups x P^2) float64 for the statistics (5 x 390^2 x 8
bytes = 6 MB), O(D^2) for the covariance, plus one video's design (frames x P float32: 78 MB for the
longest Aff-Wild2 video, 50k frames). Why ``max_dim`` = 64: the statistics grow with P^2 and their
accumulation with P^2 per frame, so 1024-d features with 4 scales would give P = 6150 (300 MB per
group, ~100x the time); and ~10^4 labelled frames of a small dataset cannot fit thousands of
weights anyway. ``benchmarks/bench_context_ridge.py`` measures it.

Not causal: the centred windows and the video mean see the future. The projection (step 1) is fit
on all training videos, the held-out inner group's included: it uses no labels.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from abaw.io import atomic_path, atomic_write_json
from abaw.metrics import EPS
from abaw.models import register_model, resolve_config

CHUNK = 16384  # frames read from a memory-mapped file at a time (16k x 1024 float32 = 64 MB)
FORMAT = "abaw.context_ridge/1"  # model.json's format tag


@dataclass
class ContextRidgeConfig:
    modalities: tuple[str, ...] = ("visual",)  # feature streams; several are concatenated
    dims: dict[str, int] = field(default_factory=dict)  # modality -> width (set by input_dims); empty:
                                                         # read from the data. A mismatch is an error.
    scales: tuple[int, ...] = (9, 33, 129, 513)  # centred context windows in frames, odd: at 30 fps
                                                 # 0.3 s, 1.1 s, 4.3 s, 17 s, x4 apart (see README)
    video_mean: bool = True   # the video's mean feature over its present frames, broadcast to every frame
    presence: bool = True     # the presence channel (1 = frame has its feature) and its context means
    alphas: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(-8, 7))  # 1e-4 .. 1e3, half decades
    max_dim: int = 64         # features wider than this are PCA-projected to this many components
    pca_stride: int = 4       # covariance for the PCA from every 4th frame (neighbours are near duplicates)
    inner_folds: int = 5      # subject-grouped inner CV on the training videos that chooses alpha
    calibrate: bool = True    # match the labels' mean and std on the out-of-group predictions

    # demo: fewer components (the demo's features show a 2-d latent; a 2.5x smaller design)
    SIZES: ClassVar[dict] = {"abaw": {}, "demo": {"max_dim": 32}}

    def __post_init__(self):
        self.modalities = tuple(self.modalities)
        self.dims = {str(m): int(d) for m, d in dict(self.dims).items()}
        self.scales = tuple(int(w) for w in self.scales)
        self.alphas = tuple(sorted(float(a) for a in self.alphas))
        problems = []
        if not self.modalities:
            problems.append("modalities is empty")
        if any(w < 3 or w % 2 == 0 for w in self.scales):
            problems.append(f"scales must be odd window lengths of at least 3 frames (centred), got {self.scales}")
        if not self.alphas or any(not np.isfinite(a) or a <= 0 for a in self.alphas):
            problems.append(f"alphas must be positive and finite, got {self.alphas}")
        for name in ("max_dim", "pca_stride"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.inner_folds < 2:
            problems.append(f"inner_folds must be at least 2, got {self.inner_folds}")
        if problems:
            raise ValueError("invalid ContextRidgeConfig: " + "; ".join(problems))

    def with_input_dims(self, input_dims):
        used = {m: int(d) for m, d in input_dims.items() if m in self.modalities}
        return dataclasses.replace(self, dims={**self.dims, **used})


# --------------------------------------------------------------------------- features
def context_features(z: np.ndarray, present: np.ndarray, scales: Sequence[int], video_mean: bool = True,
                     presence: bool = True) -> np.ndarray:
    """One modality's design block: (T, k) features, zero where absent, + (T,) bool -> (T, P_m) float32.

    Columns: [z, p], then [ctx_w(z), ctx_w(p)] per scale w, then [mean(z), mean(p)] (see the module
    docstring; the p columns only with ``presence``, the mean block only with ``video_mean``).
    """
    T, k = z.shape
    present = present.astype(bool)
    z = np.where(present[:, None], z, 0).astype(np.float32)
    p = present.astype(np.float32)
    # Cumulative sums with a leading 0 in float64: a window's sum is a difference of two, exact
    # enough over the longest videos (float32 would lose ~1e-3 over 50k frames).
    cz = np.zeros((T + 1, k), np.float64)
    np.cumsum(z, axis=0, dtype=np.float64, out=cz[1:])
    cn = np.concatenate([[0], np.cumsum(p, dtype=np.float64)])  # (T+1,) present frames so far
    blocks = [z, p[:, None]] if presence else [z]
    t = np.arange(T)
    for w in scales:
        lo, hi = np.maximum(t - w // 2, 0), np.minimum(t + w // 2 + 1, T)  # the window, cut at the edges
        count = cn[hi] - cn[lo]                                              # (T,) present frames in it
        blocks.append(((cz[hi] - cz[lo]) / np.maximum(count, 1)[:, None]).astype(np.float32))
        if presence:
            blocks.append((count / (hi - lo)).astype(np.float32)[:, None])
    if video_mean:
        n = cn[-1]
        blocks.append(np.broadcast_to((cz[-1] / max(n, 1)).astype(np.float32), (T, k)))
        if presence:
            blocks.append(np.full((T, 1), n / max(T, 1), np.float32))
    return np.concatenate(blocks, axis=1)


def context_feature_names(prefix: str, k: int, scales: Sequence[int], video_mean: bool, presence: bool) -> list[str]:
    """Column names of :func:`context_features`, e.g. ``visual:3@129`` = component 3's 129-frame mean."""
    def block(tag: str) -> list[str]:
        return [f"{prefix}:{j}{tag}" for j in range(k)] + ([f"{prefix}:presence{tag}"] if presence else [])
    return block("") + [n for w in scales for n in block(f"@{w}")] + (block("@video") if video_mean else [])


# --------------------------------------------------------------------------- ridge from statistics
@dataclass
class Stats:
    """Sufficient statistics of labelled rows, float64, one slice per inner group (leading axis G)."""

    n: np.ndarray     # (G,)        labelled frames
    sx: np.ndarray    # (G, P)      sum x
    xx: np.ndarray    # (G, P, P)   X'X
    xy: np.ndarray    # (G, P, 2)   X'y
    sy: np.ndarray    # (G, 2)      sum y
    syy: np.ndarray   # (G, 2)      sum y^2

    @classmethod
    def zeros(cls, groups: int, width: int) -> "Stats":
        return cls(np.zeros(groups), np.zeros((groups, width)), np.zeros((groups, width, width)),
                   np.zeros((groups, width, 2)), np.zeros((groups, 2)), np.zeros((groups, 2)))

    def add(self, g: int, x: np.ndarray, y: np.ndarray) -> None:
        """Add rows x (L, P) float32, y (L, 2) to group g, in float64."""
        x, y = x.astype(np.float64), y.astype(np.float64)
        self.n[g] += len(x)
        self.sx[g] += x.sum(0)
        self.xx[g] += x.T @ x
        self.xy[g] += x.T @ y
        self.sy[g] += y.sum(0)
        self.syy[g] += (y * y).sum(0)

    def total(self) -> tuple:
        return tuple(a.sum(0) for a in (self.n, self.sx, self.xx, self.xy, self.sy, self.syy))

    def group(self, g: int) -> tuple:
        return tuple(a[g] for a in (self.n, self.sx, self.xx, self.xy, self.sy, self.syy))


def eigh(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.linalg.eigh`` on one BLAS thread. With torch loaded (its OpenMP pool beside OpenBLAS's
    threads), a threaded eigendecomposition of a few hundred columns was measured 10-50x slower
    on 2 cores (2.2 s instead of 0.04 s for 390 columns); single-threaded it never is."""
    with threadpool_limits(1, user_api="blas"):
        return np.linalg.eigh(a)


def ridge_path(n, sx, xx, xy, sy, alphas: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Ridge on standardised columns for every alpha, from statistics -> W (A, P, 2), b (A, 2) on raw columns.

    Minimises mean((y - Xw - b)^2) + alpha |s * w|^2 with s the columns' standard deviations
    (= scikit-learn's Ridge(alpha * n) on the standardised design). One eigendecomposition serves
    every alpha. Constant columns (zero variance) get weight 0.
    """
    n = max(float(n), 1.0)
    mu, my = sx / n, sy / n                                             # (P,), (2,)
    cov = (xx - n * np.outer(mu, mu)) / n                               # (P, P) population covariance
    var = np.diag(cov).copy()
    const = var <= 1e-10 * mu * mu                                      # exact zeros, up to rounding
    scale = np.where(const, 1.0, np.sqrt(np.clip(var, 1e-300, None)))
    corr = cov / np.outer(scale, scale)                                 # standardised X'X / n
    corr[const, :] = corr[:, const] = 0.0
    r = (xy - n * np.outer(mu, my)) / n / scale[:, None]                # (P, 2) standardised X'y / n
    r[const] = 0.0
    lam, q = eigh(corr)
    lam = np.clip(lam, 0.0, None)
    qr = q.T @ r                                                        # (P, 2)
    alphas = np.asarray(alphas, np.float64)
    beta = np.einsum("pj,ajk->apk", q, qr[None] / (lam[None, :, None] + alphas[:, None, None]))  # (A, P, 2)
    w = beta / scale[None, :, None]
    return w, my[None] - np.einsum("p,apk->ak", mu, w)


def prediction_sums(w: np.ndarray, b: np.ndarray, n, sx, xx, xy, sy) -> tuple[np.ndarray, ...]:
    """Sums of the predictions p = Xw + b over a group's rows, from its statistics -> (sum p, sum p^2, sum py), each (A, 2)."""
    wsx = np.einsum("apk,p->ak", w, sx)
    sp = wsx + n * b
    spp = np.einsum("apk,pq,aqk->ak", w, xx, w) + 2 * b * wsx + n * b * b
    spy = np.einsum("apk,pk->ak", w, xy) + b * sy
    return sp, spp, spy


def ccc_from_sums(n, sp, spp, spy, sy, syy, calibrated: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CCC of predictions from their sums (population moments, as abaw.metrics.ccc) -> (ccc, scale, shift).

    ``calibrated``: the CCC after the affine map p -> scale * p + shift that matches the labels' mean
    and, where the correlation is positive, their standard deviation (else scale = 1).
    """
    mp, my = sp / n, sy / n
    vp, vy = np.clip(spp / n - mp * mp, 0, None), np.clip(syy / n - my * my, 0, None)
    cov = spy / n - mp * my
    if not calibrated:
        return 2 * cov / (vp + vy + (mp - my) ** 2 + EPS), np.ones_like(mp), np.zeros_like(mp)
    scale = np.where((cov > 0) & (vp > 1e-12 * vy), np.sqrt(vy / np.maximum(vp, 1e-300)), 1.0)
    return 2 * scale * cov / (scale * scale * vp + vy + EPS), scale, my - scale * mp


def subject_groups(subjects: Sequence[str], frames: Sequence[int], k: int) -> list[int]:
    """Each video's inner group: whole subjects, about equal labelled frames, deterministic.

    Subjects in decreasing order of labelled frames (ties by name) each go to the group with the
    fewest frames so far (the longest-processing-time rule)."""
    per_subject: dict[str, int] = {}
    for s, f in zip(subjects, frames):
        per_subject[s] = per_subject.get(s, 0) + int(f)
    k = min(k, len(per_subject))
    totals, group_of = [0] * k, {}
    for s in sorted(per_subject, key=lambda s: (-per_subject[s], s)):
        g = totals.index(min(totals))
        group_of[s] = g
        totals[g] += per_subject[s]
    return [group_of[s] for s in subjects]


# --------------------------------------------------------------------------- the estimator
class ContextRidge:
    """Ridge on multi-scale context features of the memory-mapped features; see the module docstring.

    Learned attributes (after :meth:`fit`): ``mean_`` {modality: (D_m,)}, ``components_`` {modality:
    (D_m, k) or None}, ``coef_`` (P, 2), ``intercept_`` (2,), ``alpha_`` (2,) per target,
    ``cv_ccc_`` (A, 2) calibrated and ``cv_ccc_raw_`` (A, 2) uncalibrated leave-one-group-out CCC per
    alpha, ``calibration_`` (2, 2) rows scale, shift; ``input_dims_``, ``n_frames_`` (labelled frames),
    ``groups_`` {video: inner group}.
    """

    config_class = ContextRidgeConfig
    kind = "classical"  # fit on videos, not trained by epochs: FoldTrainer fits it once per fold
    causal = False      # centred windows and the video mean see the future
    out_dim = 2

    def __init__(self, cfg: ContextRidgeConfig):
        self.config, self.modalities = cfg, cfg.modalities

    # ---------------------------------------------------------------- fit
    def fit(self, videos: Sequence) -> "ContextRidge":
        """Fit on the labelled frames of ``videos`` (list of VideoRecord); returns self."""
        cfg = self.config
        videos = [v for v in videos if v.labels is not None]
        if not videos or not any(v.label_mask.any() for v in videos):
            raise ValueError("context_ridge needs at least one labelled frame to fit")
        self._fit_projection(videos)
        group_of = subject_groups([v.subject for v in videos], [int(v.label_mask.sum()) for v in videos],
                                  cfg.inner_folds)
        self.groups_ = {v.name: g for v, g in zip(videos, group_of)}
        stats = self._accumulate(videos, group_of)
        self.n_frames_ = int(stats.n.sum())
        best = self._choose_alpha(stats)                                # (2,) index into alphas per target
        w_all, b_all = ridge_path(*stats.total()[:5], cfg.alphas)      # (A, P, 2), (A, 2): every group
        cols = np.arange(2)
        w, b = w_all[best, :, cols].T, b_all[best, cols]                # (P, 2), (2,)
        scale, shift = self.calibration_
        self.coef_ = w * scale
        self.intercept_ = b * scale + shift
        self.alpha_ = np.asarray(cfg.alphas)[best]
        return self

    def _fit_projection(self, videos) -> None:
        """Pass 1: per modality the mean of the present frames, and the PCA when wider than max_dim."""
        cfg = self.config
        self.mean_, self.components_, self.input_dims_ = {}, {}, {}
        for m in cfg.modalities:
            width = self._width(videos[0], m)
            if cfg.dims.get(m, width) != width:
                raise ValueError(f"{videos[0].name!r}: {m} features are {width}-d, but the config says "
                                 f"{cfg.dims[m]}-d (input_dims)")
            pca = width > cfg.max_dim
            n, s = 0.0, np.zeros(width)
            xx = np.zeros((width, width)) if pca else None
            for video in videos:
                for x, present in self._chunks(video, m, cfg.pca_stride):
                    x = x[present]
                    n += len(x)
                    s += x.sum(0, dtype=np.float64)
                    if pca:
                        xx += (x.T @ x).astype(np.float64)  # float32 product of a chunk, float64 sum
            mean = s / max(n, 1.0)
            self.mean_[m] = mean.astype(np.float32)
            self.components_[m] = None
            if pca:
                cov = xx / max(n, 1.0) - np.outer(mean, mean)
                lam, vec = eigh(cov)
                top = vec[:, ::-1][:, : cfg.max_dim]
                signs = np.sign(top[np.abs(top).argmax(0), np.arange(top.shape[1])])  # deterministic signs
                self.components_[m] = (top * np.where(signs == 0, 1, signs)).astype(np.float32)
            self.input_dims_[m] = width

    def _accumulate(self, videos, group_of: Sequence[int]) -> Stats:
        """Pass 2: each video's design matrix (float32), its labelled rows added to its group's statistics."""
        stats = None
        for video, g in zip(videos, group_of):
            mask = video.label_mask
            if not mask.any():
                continue
            x, y = self.design(video)[mask], video.labels[mask]
            if stats is None:
                stats = Stats.zeros(max(group_of) + 1, x.shape[1])
            for start in range(0, len(x), CHUNK):
                stats.add(g, x[start:start + CHUNK], y[start:start + CHUNK])
        return stats

    def _choose_alpha(self, stats: Stats) -> np.ndarray:
        """Leave-one-group-out CCC of every alpha from the statistics (``cv_ccc_``, ``cv_ccc_raw_``) and
        the calibration (``calibration_``); returns the chosen alpha's index per target."""
        alphas = self.config.alphas
        self.calibration_ = np.array([[1.0, 1.0], [0.0, 0.0]])  # rows: scale, shift per target
        if len(stats.n) < 2:  # one subject: nothing to hold out; the middle of the grid, uncalibrated
            self.cv_ccc_ = self.cv_ccc_raw_ = np.full((len(alphas), 2), np.nan)
            return np.full(2, len(alphas) // 2)
        total = stats.total()
        pooled = np.zeros((3, len(alphas), 2))  # sum p, sum p^2, sum py over every group's held-out rows
        for g in range(len(stats.n)):
            held = stats.group(g)
            if held[0] == 0:
                continue
            rest = [t - h for t, h in zip(total, held)]
            w, b = ridge_path(*rest[:5], alphas)
            pooled += np.stack(prediction_sums(w, b, *held[:5]))
        n, sy, syy = total[0], total[4], total[5]
        self.cv_ccc_raw_ = ccc_from_sums(n, *pooled, sy, syy)[0]
        calibrated, scale, shift = ccc_from_sums(n, *pooled, sy, syy, calibrated=True)
        self.cv_ccc_ = calibrated if self.config.calibrate else self.cv_ccc_raw_
        best = np.nan_to_num(self.cv_ccc_, nan=-np.inf).argmax(0)  # the first best; NaN counts as worst
        if self.config.calibrate:
            cols = np.arange(2)
            self.calibration_ = np.stack([scale[best, cols], shift[best, cols]])
        return best

    # ---------------------------------------------------------------- features and prediction
    @staticmethod
    def _chunks(video, modality: str, step: int = 1):
        """(L, D) float32 zero-filled features and (L,) presence of ``video`` (every ``step``-th frame),
        CHUNK frames at a time."""
        for start in range(0, video.n_frames, CHUNK * step):
            yield video.features(modality, start, min(start + CHUNK * step, video.n_frames), step)

    @staticmethod
    def _width(video, modality: str) -> int:
        if modality not in video.feature_paths:
            raise ValueError(f"context_ridge needs modality {modality!r}, but video {video.name!r} has only "
                             f"{sorted(video.feature_paths)}")
        return int(video.features(modality, 0, 1)[0].shape[1])

    def _project(self, video, modality: str) -> tuple[np.ndarray, np.ndarray]:
        """(T, k) centred (and projected) features, 0 where absent, and (T,) presence."""
        mean, comps = self.mean_[modality], self.components_[modality]
        width = self._width(video, modality)
        if width != self.input_dims_[modality]:
            raise ValueError(f"{video.name!r}: {modality} features are {width}-d, the model was fitted on "
                             f"{self.input_dims_[modality]}-d")
        parts, presents = [], []
        for x, present in self._chunks(video, modality):
            x = x - mean
            parts.append(x @ comps if comps is not None else x)
            presents.append(present)
        k = len(mean) if comps is None else comps.shape[1]
        z = np.concatenate(parts) if parts else np.zeros((0, k), np.float32)
        present = np.concatenate(presents) if presents else np.zeros(0, bool)
        z[~present] = 0.0
        return z, present

    def design(self, video) -> np.ndarray:
        """The video's design matrix (T, P) float32: every modality's :func:`context_features` block."""
        cfg = self.config
        return np.concatenate([context_features(*self._project(video, m), cfg.scales, cfg.video_mean, cfg.presence)
                               for m in cfg.modalities], axis=1)

    def feature_names(self) -> list[str]:
        cfg = self.config
        return [name for m in cfg.modalities
                for name in context_feature_names(m, self._k(m), cfg.scales, cfg.video_mean, cfg.presence)]

    def _k(self, modality: str) -> int:
        comps = self.components_[modality]
        return len(self.mean_[modality]) if comps is None else comps.shape[1]

    def predict(self, video) -> np.ndarray:
        """(T, 2) float32 valence, arousal for every frame of ``video`` (unclipped, finite)."""
        if not hasattr(self, "coef_"):
            raise RuntimeError("context_ridge is not fitted: call fit(videos) first")
        x = self.design(video)
        return (x.astype(np.float64) @ self.coef_ + self.intercept_).astype(np.float32)

    # ---------------------------------------------------------------- save / load (no pickle)
    ARRAYS: ClassVar[tuple[str, ...]] = ("coef_", "intercept_", "alpha_", "cv_ccc_", "cv_ccc_raw_", "calibration_")

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> None:
        """``folder/model.npz`` (arrays) and ``folder/model.json`` (config, fitted scalars, ``extra``)."""
        folder = Path(folder)
        arrays = {name: getattr(self, name) for name in self.ARRAYS}
        for m in self.config.modalities:
            arrays[f"mean/{m}"] = self.mean_[m]
            if self.components_[m] is not None:
                arrays[f"components/{m}"] = self.components_[m]
        with atomic_path(folder / "model.npz") as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        atomic_write_json(folder / "model.json", {
            **(extra or {}), "format": FORMAT, "model_config": dataclasses.asdict(self.config),
            "input_dims": self.input_dims_, "n_frames": self.n_frames_, "groups": self.groups_,
            "feature_names": self.feature_names()})

    @classmethod
    def load(cls, folder: str | Path) -> "ContextRidge":
        folder = Path(folder)
        meta = json.loads((folder / "model.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{folder / 'model.json'}: not a context_ridge model (format {meta.get('format')!r})")
        model = cls(ContextRidgeConfig(**meta["model_config"]))
        with np.load(folder / "model.npz", allow_pickle=False) as arrays:
            for name in cls.ARRAYS:
                setattr(model, name, arrays[name])
            model.mean_ = {m: arrays[f"mean/{m}"] for m in model.modalities}
            model.components_ = {m: arrays[f"components/{m}"] if f"components/{m}" in arrays else None
                                 for m in model.modalities}
        model.input_dims_ = {m: int(d) for m, d in meta["input_dims"].items()}
        model.n_frames_, model.groups_ = meta["n_frames"], meta["groups"]
        return model


@register_model(ContextRidge)
def context_ridge(size: str = "abaw", input_dims=None, **overrides) -> ContextRidge:
    """Ridge on frame + multi-scale centred context means + video mean (classical; alpha by inner CV)."""
    return ContextRidge(resolve_config(ContextRidgeConfig, size, input_dims, overrides))
