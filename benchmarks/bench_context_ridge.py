"""Streaming fit of context_ridge on synthetic memory-mapped features: frames/s and peak memory.

    python benchmarks/bench_context_ridge.py                        # 300k frames x 1024-d float16, size abaw
    python benchmarks/bench_context_ridge.py --frames 1000000 --dim 768 --size demo

Writes videos of 1,000-5,000 frames (mean ~3,000, like Aff-Wild2's) as float16 .npy files with
NaN stretches (no face, ~5% of frames) and -5 label stretches (~15%), then fits and predicts in a
fresh process, so that its peak resident memory (``ru_maxrss``) is the fit's, and prints the
throughput, the peak, and both extrapolated to 3M frames (time grows linearly in frames; memory
does not: the statistics are O(groups x P^2), one video's design matrix is the largest array).

The files are read through the page cache: just written, they are in RAM, so this measures the
computation, not the disk (a cold 3M x 1024 float16 read is 6 GB per pass, two passes per fit).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

AFFWILD2_FRAMES = 3_000_000


def generate(folder: Path, frames: int, dim: int, seed: int = 0) -> None:
    """Videos of synthetic features (float16 memmaps, written in chunks) and their labels (labels.npz)."""
    rng = np.random.default_rng(seed)
    (folder / "visual").mkdir(parents=True, exist_ok=True)
    mixing = rng.standard_normal((2, dim)).astype(np.float32)
    labels, total, i = {}, 0, 0
    while total < frames:
        n = int(min(rng.integers(1000, 5001), frames - total))
        latent = np.cumsum(rng.standard_normal((n, 2)), axis=0) / np.sqrt(n)
        out = np.lib.format.open_memmap(folder / "visual" / f"v{i:04d}.npy", "w+", np.float16, (n, dim))
        for start in range(0, n, 4096):
            stop = min(start + 4096, n)
            noise = rng.standard_normal((stop - start, dim), dtype=np.float32)
            out[start:stop] = latent[start:stop].astype(np.float32) @ mixing + noise
        gap = int(rng.integers(0, n - n // 20))
        out[gap:gap + n // 20] = np.nan  # a no-face stretch
        out.flush()
        del out
        y = np.tanh(latent).astype(np.float32)
        cut = int(rng.integers(0, n - n // 7))
        y[cut:cut + n // 7] = -5  # an unlabelled stretch
        labels[f"v{i:04d}"] = y
        total, i = total + n, i + 1
    np.savez(folder / "labels.npz", **labels)


def worker(folder: Path, size: str) -> dict:
    from abaw.data import VideoRecord
    from abaw.models import create_model

    with np.load(folder / "labels.npz") as saved:
        labels = {name: saved[name] for name in saved}
    videos = [VideoRecord(name, name, "train", len(y), y, {"visual": folder / "visual" / f"{name}.npy"})
              for name, y in sorted(labels.items())]
    dim = int(np.load(videos[0].feature_paths["visual"], mmap_mode="r").shape[1])
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model = create_model("context_ridge", size=size, input_dims={"visual": dim})
    tic = time.perf_counter()
    model.fit(videos)
    fit_s = time.perf_counter() - tic
    tic = time.perf_counter()
    finite = all(np.isfinite(model.predict(v)).all() for v in videos)
    predict_s = time.perf_counter() - tic
    width = model.coef_.shape[0]
    groups = len(set(model.groups_.values()))
    return {"videos": len(videos), "frames": sum(v.n_frames for v in videos), "labelled": model.n_frames_,
            "dim": dim, "design_width": width, "groups": groups, "max_dim": model.config.max_dim,
            "fit_s": fit_s, "predict_s": predict_s, "finite": bool(finite),
            "stats_mb": (groups + 1) * width * width * 8 / 2**20, "baseline_mb": baseline,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "alpha": model.alpha_.tolist()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=300_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--size", default="abaw", choices=["abaw", "demo"])
    p.add_argument("--dir", help="where to write the synthetic features (default: a temporary folder, removed)")
    p.add_argument("--threads", type=int, default=2, help="BLAS threads (default 2)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(Path(args.worker), args.size)))
        return

    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_context_ridge_"))
    try:
        tic = time.perf_counter()
        generate(folder, args.frames, args.dim)
        print(f"wrote {args.frames:,} frames x {args.dim} float16 to {folder} in {time.perf_counter() - tic:.1f} s",
              file=sys.stderr)
        env = {**os.environ, **{k: str(args.threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
        done = subprocess.run([sys.executable, __file__, "--worker", str(folder), "--size", args.size], env=env,
                              capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)

    scale = AFFWILD2_FRAMES / r["frames"]
    print(f"context_ridge (size {args.size!r}, max_dim {r['max_dim']}): {r['videos']} videos, {r['frames']:,} frames "
          f"({r['labelled']:,} labelled) x {r['dim']}-d float16 -> design width {r['design_width']}, "
          f"{r['groups']} inner groups, {args.threads} BLAS threads")
    print(f"  fit      {r['fit_s']:7.1f} s   {r['frames'] / r['fit_s']:>9,.0f} frames/s   "
          f"(3M frames: ~{r['fit_s'] * scale / 60:.1f} min)")
    print(f"  predict  {r['predict_s']:7.1f} s   {r['frames'] / r['predict_s']:>9,.0f} frames/s   "
          f"(3M frames: ~{r['predict_s'] * scale / 60:.1f} min); all finite: {r['finite']}")
    print(f"  peak RSS {r['peak_mb']:7.0f} MB (after imports: {r['baseline_mb']:.0f} MB; statistics "
          f"{r['stats_mb']:.1f} MB); at 3M frames the same but for the longest video's design matrix")
    print(f"  chosen alpha (valence, arousal): {r['alpha']}")


if __name__ == "__main__":
    main()
