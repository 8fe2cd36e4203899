"""Do the defaults beat a textbook context ridge? On the demo and on a second, different dataset.

    python benchmarks/bench_accuracy.py                  # both datasets (about 10 min on 2 cores)
    python benchmarks/bench_accuracy.py --datasets short

For each dataset (``abaw.demo.SPECS``: ``demo``, the built-in demo; ``short``, few short videos with
20-d features and a valence that is mostly a per-video level, like the small real dataset on which
a ridge beat the toolkit's old default), in one run:

1. ``run_cv.py --data-root ROOT`` with no other flag (the defaults), then ``make_submission.py
   --runs RUN`` with no other flag: the default submission, scored on the dataset's test labels.
2. The textbook baseline, computed here: ridge regression on the frame features, their mean over
   a centred context window and the video's mean (plus the presence flag), fitted on every
   train+val frame; its window and penalty chosen by the mean per-fold CCC of subject-grouped
   5-fold CV on train+val (never on test labels), scored on the same test labels.

It prints both, per dimension, and the gap. Both are scored on the test labels only; neither
saw them. The honest report of the default run (nested OOF rows included) is saved beside it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from abaw import demo  # noqa: E402
from abaw.data import open_dataset  # noqa: E402
from abaw.metrics import score  # noqa: E402

WINDOWS = (15, 31, 61, 121)      # centred context windows the baseline chooses from (frames)
ALPHAS = np.logspace(-5, 2, 15)  # ridge penalties it chooses from (times the frame count)


def centred_mean(x: np.ndarray, present: np.ndarray, window: int) -> np.ndarray:
    """(T, D) mean of the present frames within ``window`` frames centred on each frame."""
    weights = present.astype(np.float64)
    padded = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(x * weights[:, None], axis=0)])
    counts = np.concatenate([[0.0], np.cumsum(weights)])
    t = np.arange(len(x))
    lo, hi = np.clip(t - window // 2, 0, len(x)), np.clip(t + window // 2 + 1, 0, len(x))
    return (padded[hi] - padded[lo]) / np.maximum(counts[hi] - counts[lo], 1.0)[:, None]


def design(video, modality: str, window: int) -> np.ndarray:
    """The baseline's features of one video: frame, centred context mean, video mean, presence."""
    x, present = video.features(modality)
    x = x.astype(np.float64)
    video_mean = x[present].mean(axis=0) if present.any() else np.zeros(x.shape[1])
    return np.hstack([x, centred_mean(x, present, window), np.broadcast_to(video_mean, x.shape),
                      present[:, None].astype(np.float64)])


def fold_statistics(designs, videos, fold_of: dict, folds: int):
    """Per fold: Gram of the standardised design with an intercept column, Z'y, and label sums.

    Standardised with train+val's own column means and stds (no labels involved), so each fold's
    ridge and its held-out CCC follow from these sums (no second pass): Σp = w'Σz, Σp² = w'Gw, Σpy = w'Z'y.
    """
    stacked = np.vstack([d[v.label_mask] for d, v in zip(designs, videos)])
    mean, scale = stacked.mean(axis=0), stacked.std(axis=0) + 1e-8
    del stacked
    width = len(mean) + 1
    gram, zy = np.zeros((folds, width, width)), np.zeros((folds, width, 2))
    sy, syy, n = np.zeros((folds, 2)), np.zeros((folds, 2)), np.zeros(folds)
    for d, v in zip(designs, videos):
        k = fold_of[v.subject]
        z = np.hstack([(d[v.label_mask] - mean) / scale, np.ones((int(v.label_mask.sum()), 1))])
        y = v.labels[v.label_mask].astype(np.float64)
        gram[k] += z.T @ z
        zy[k] += z.T @ y
        sy[k], syy[k], n[k] = sy[k] + y.sum(axis=0), syy[k] + (y ** 2).sum(axis=0), n[k] + len(y)
    return (mean, scale), gram, zy, sy, syy, n


def ridge_solve(gram: np.ndarray, zy: np.ndarray, n: float, alpha: float) -> np.ndarray:
    """(P + 1, 2) weights; the intercept (last column) unpenalised."""
    penalty = np.full(len(gram), alpha * n)
    penalty[-1] = 0.0
    return np.linalg.solve(gram + np.diag(penalty), zy)


def held_out_ccc(w, gram, zy, sy, syy, n) -> np.ndarray:
    """(2,) CCC of predictions z'w on one fold, from its sums."""
    sp = gram[-1] @ w                       # Σz is the intercept row of the Gram
    spp = np.einsum("id,ij,jd->d", w, gram, w)
    spy = np.einsum("id,id->d", w, zy)
    mp, my = sp / n, sy / n
    vp, vy, cov = spp / n - mp ** 2, syy / n - my ** 2, spy / n - mp * my
    return 2 * cov / (vp + vy + (mp - my) ** 2 + 1e-12)


def context_ridge_baseline(root: Path, modality: str = "visual") -> dict:
    """Choose window and penalty by subject-grouped CV on train+val; fit on all of it; score on test."""
    dataset = open_dataset(root)
    videos = dataset.split("train", "val")
    subjects = sorted({v.subject for v in videos})
    fold_of = {s: i % 5 for i, s in enumerate(np.random.default_rng(0).permutation(subjects))}
    best = (-np.inf, None, None, None)
    for window in WINDOWS:
        standard, gram, zy, sy, syy, n = fold_statistics([design(v, modality, window) for v in videos], videos,
                                                         fold_of, 5)
        for alpha in ALPHAS:
            cv = np.mean([held_out_ccc(ridge_solve(gram.sum(0) - gram[k], zy.sum(0) - zy[k], n.sum() - n[k], alpha),
                                       gram[k], zy[k], sy[k], syy[k], n[k]) for k in range(5)], axis=0).mean()
            if cv > best[0]:
                best = (cv, window, alpha, (standard, ridge_solve(gram.sum(0), zy.sum(0), n.sum(), alpha)))
    cv, window, alpha, ((mean, scale), weights) = best
    truth = demo.load_ground_truth(root)
    test = dataset.split("test")
    pred = np.vstack([np.clip(np.hstack([(design(v, modality, window) - mean) / scale, np.ones((v.n_frames, 1))])
                              @ weights, -1, 1) for v in test])
    target = np.vstack([truth[v.name][: v.n_frames] for v in test])
    result = score(pred, target, (target != -5).all(axis=1))
    return {**result, "window": window, "alpha": float(alpha), "cv": float(cv)}


def default_submission(root: Path, name: str, runs_dir: Path) -> tuple[dict, float]:
    """run_cv.py and make_submission.py with no flag but the data root and the output folders."""
    from abaw.cli import run_cv_main
    from abaw.submission import main as make_submission
    from abaw.submission.scoring import read_submission
    from abaw.ensemble import score_videos

    run = runs_dir / name
    tic = time.time()
    if run_cv_main(["--data-root", str(root), "--out", str(run)]) != 0:
        raise SystemExit(f"run_cv.py failed on {root}")
    out = runs_dir / f"{name}-submission"
    if make_submission(["--runs", str(run), "--out", str(out), "--overwrite", "--report"]) != 0:
        raise SystemExit(f"make_submission.py failed on {run}")
    written = read_submission(out / "predictions.txt")
    return score_videos(written, demo.load_ground_truth(root)), time.time() - tic


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(demo.SPECS), choices=list(demo.SPECS))
    p.add_argument("--runs-dir", default="runs/bench-accuracy", help="where the default runs go")
    p.add_argument("--data-dir", help="where the datasets are generated (default: the demo cache folder)")
    args = p.parse_args(argv)
    runs_dir = Path(args.runs_dir)
    rows = []
    for name in args.datasets:
        spec = demo.SPECS[name]
        root = demo.default_root() if name == "demo" and not args.data_dir else \
            Path(args.data_dir or demo.default_root().parent) / f"{name}-v{demo.VERSION}"
        demo.ensure_demo(root, spec)
        tic = time.time()
        ridge = context_ridge_baseline(root)
        ridge_s = time.time() - tic
        ours, ours_s = default_submission(root, name, runs_dir)
        rows.append((name, ours, ridge, ours_s, ridge_s))
    print("\nscored on each dataset's test labels (never seen by either)")
    print(f"{'dataset':8} {'defaults v / a / mean':>26} {'context ridge v / a / mean':>30} {'gap':>7}  time (defaults, ridge)")
    for name, ours, ridge, ours_s, ridge_s in rows:
        print(f"{name:8} {ours['valence']:8.3f} {ours['arousal']:7.3f} {ours['mean']:7.3f}"
              f"   {ridge['valence']:10.3f} {ridge['arousal']:7.3f} {ridge['mean']:7.3f}"
              f" {ours['mean'] - ridge['mean']:+7.3f}  {ours_s:.0f} s, {ridge_s:.0f} s"
              f"  (ridge window {ridge['window']}, alpha {ridge['alpha']:.3g}, its grouped CV {ridge['cv']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
