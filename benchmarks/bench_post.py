"""Speed of abaw.post: the smoothing primitives on one long series, and choosing ``post="auto"``
on Aff-Wild2-sized synthetic OOF predictions.

    python benchmarks/bench_post.py                      # 500 videos x 3200 frames (1.6M), 5 groups
    python benchmarks/bench_post.py --videos 50 --frames 3200 --nested

Synthetic OOF: per video a smooth label signal (Gaussian-filtered noise, std 0.4), predictions =
the signal 8 frames early plus white noise, ~3% unlabelled frames in stretches (NaN in the
predictions, -5 in the labels, as in oof.csv). Times are the best of ``--repeats`` (primitives)
or one run (fit, nested), wall clock.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.ndimage import gaussian_filter1d

from abaw.post import PostProcessor, nested_post, shift, smooth


def synthetic_oof(n_videos: int, n_frames: int, n_groups: int, lag: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    predictions, labels, groups = {}, {}, {}
    for i in range(n_videos):
        signal = gaussian_filter1d(rng.normal(size=(n_frames + lag, 2)), 15, axis=0)
        signal = np.clip(signal / signal.std() * 0.4, -1, 1)
        label = signal[:n_frames].copy()
        prediction = signal[lag:] + rng.normal(0, 0.3, (n_frames, 2))
        for _ in range(2):  # two unlabelled stretches of ~50 frames
            start = int(rng.integers(0, n_frames - 50))
            label[start:start + 50] = -5.0
            prediction[start:start + 50] = np.nan
        name = f"video{i:04d}"
        predictions[name], labels[name], groups[name] = prediction, label, i % n_groups
    return predictions, labels, groups


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=500)
    parser.add_argument("--frames", type=int, default=3200)
    parser.add_argument("--groups", type=int, default=5)
    parser.add_argument("--series", type=int, default=2_000_000, help="length of the series for the primitives")
    parser.add_argument("--window", type=int, default=151)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nested", action="store_true", help="also time nested_post")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(1)
    clean = rng.normal(size=args.series)
    gappy = clean.copy()
    gappy[rng.random(args.series) < 0.01] = np.nan  # 1% isolated NaN frames: the gap-aware paths
    print(f"primitives on {args.series:,} frames, window {args.window}:")
    for kind in ("mean", "gaussian", "median"):
        for label, x in (("no NaN", clean), ("1% NaN", gappy)):
            seconds = best_of(args.repeats, lambda: smooth(x, kind, args.window))
            print(f"  smooth {kind:<8} {label:<7} {seconds:6.3f} s")
    print(f"  shift lag 8     1% NaN  {best_of(args.repeats, lambda: shift(gappy, 8)):6.3f} s")

    predictions, labels, groups = synthetic_oof(args.videos, args.frames, args.groups)
    frames = sum(int((l != -5).all(axis=1).sum()) for l in labels.values())
    post = PostProcessor()
    start = time.perf_counter()
    post.fit(predictions, labels)
    fit_s = time.perf_counter() - start
    print(f"fit auto: {args.videos} videos x {args.frames} frames ({frames:,} labelled), "
          f"{post.n_candidates_} candidates per dimension: {fit_s:.2f} s")
    print(f"  chose {post.spec_!r}: " + "; ".join(str(d) for d in post.dims_))
    start = time.perf_counter()
    post.transform(predictions)
    print(f"transform: {time.perf_counter() - start:.2f} s")
    if args.nested:
        start = time.perf_counter()
        nested_post(PostProcessor(), predictions, labels, groups)
        print(f"nested_post ({args.groups} groups): {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
