"""One training epoch of mamba_va (demo size) on data shaped like Aff-Wild2, split into its parts.

    python benchmarks/bench_epoch.py                      # this checkout, one whole epoch + validation
    python benchmarks/bench_epoch.py --ref c2df995        # and the same epoch on another git ref, in one run
    python benchmarks/bench_epoch.py --steps 60           # time 60 batches, extrapolate to the epoch

The dataset (generated once into --cache): 445 labelled videos of 1,000-8,000 frames (mean about
4,200), so that fold 0 of the default 5-fold split trains on about 356 videos and 1.4 M labelled
frames, as on Aff-Wild2; one small 2-d visual feature per frame (a new user's first try with a
cheap feature); no-face stretches and -5 label stretches like the demo's.

For each code version (this checkout, and ``--ref`` checked out into a temporary worktree) a fresh
process builds fold 0's trainer, then times, per batch: reading the windows (the DataLoader),
forward, backward (loss included), and the optimizer step; then the validation of the fold's
videos (whole-video prediction, as the early stopping does). Both versions see the same batches.
Prints a table and the speed-up of this checkout over the ref.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEC = dict(n_train=440, n_val=5, n_test=2, min_frames=1000, max_frames=8000, mean_extra_frames=3400, seed=3,
            dims=(("visual", 2),))

# Runs inside the measured process, against whichever abaw is first on sys.path.
MEASURE = r'''
import json, sys, time
import torch
from abaw.config import RunConfig
from abaw.data import open_dataset
from abaw.folds import load_or_make_folds
from abaw.metrics import ccc_loss
from abaw.train import FoldTrainer, build_model, _param_groups, evaluate
from abaw.windows import WindowDataset

root, folds_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
cfg = RunConfig(arch=["mamba_va"], size="demo", folds=5, seed=0)
dataset = open_dataset(root)
folds, _ = load_or_make_folds(dataset, cfg.folds, cfg.fold_mode, cfg.seed, folds_dir)
trainer = FoldTrainer(cfg, "mamba_va", 0, dataset, folds, folds_dir + "/unused", device=torch.device("cpu"))
model = build_model(cfg, "mamba_va", dataset)
windows = WindowDataset(trainer.train_videos, model.modalities, cfg.window, cfg.hop, cfg.presence)
windows.index = [(i, s) for i, s in windows.index if windows.videos[i].label_mask[s:s + cfg.window].any()]
loader = trainer._loader(windows, 0)
try:  # the trainer's own optimizer; older code built it inline
    from abaw.train import make_optimizer
    optimizer = make_optimizer(model, cfg)
except ImportError:
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
parts = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
n = 0
warmup = None
model.train()
tic = time.perf_counter()
for batch in loader:
    t0 = time.perf_counter()
    out = model({"visual": batch["visual"]}, batch["mask"])
    t1 = time.perf_counter()
    loss = ccc_loss(out.float(), batch["labels"], batch["mask"] & batch["label_mask"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    t3 = time.perf_counter()
    if warmup is None:  # the first batch: one-off costs (loading compiled kernels), kept apart
        warmup = t3 - tic
    else:
        parts["data"] += t0 - tic
        parts["forward"] += t1 - t0
        parts["backward"] += t2 - t1
        parts["optimizer"] += t3 - t2
        n += 1
    tic = time.perf_counter()
    if n == steps:
        break
scale = (len(loader) - 1) / n
parts = {k: v * scale for k, v in parts.items()}
parts["first batch"] = warmup
t0 = time.perf_counter()
val, _ = evaluate(model, trainer.stop_videos, cfg, torch.device("cpu"))
parts["validation"] = time.perf_counter() - t0
frames = sum(int(v.label_mask.sum()) for v in trainer.train_videos)
print(json.dumps({"parts": parts, "batches": len(loader), "timed_batches": n, "train_videos": len(trainer.train_videos),
                  "labelled_frames": frames, "val_videos": len(trainer.stop_videos), "val_ccc": val["mean"],
                  "threads": torch.get_num_threads()}))
'''


def measure(code_root: Path, data_root: Path, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_root), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as folds_dir:
        out = subprocess.run([sys.executable, "-c", MEASURE, str(data_root), folds_dir, str(steps)], env=env,
                             capture_output=True, text=True, cwd=folds_dir)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {code_root} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ensure_dataset(cache: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from abaw import demo

    root = cache / "epoch-bench-v1"
    if not root.exists():
        tic = time.perf_counter()
        demo.generate(root, demo.DemoSpec(**SPEC))
        print(f"generated {root} in {time.perf_counter() - tic:.0f} s")
    return root


def worktree(ref: str, folder: Path) -> Path:
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(folder), ref], check=True,
                   capture_output=True)
    return folder


def report(name: str, r: dict) -> float:
    total = sum(r["parts"].values())
    parts = "  ".join(f"{k} {v:6.1f} s" for k, v in r["parts"].items())
    print(f"{name:>12}: epoch {total:6.1f} s = {parts}   (val CCC {r['val_ccc']:.3f}, {r['threads']} threads)")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", help="a git ref to time against, in the same run (e.g. c2df995, the code before "
                                      "the speed-ups)")
    parser.add_argument("--steps", type=int, default=0, help="time this many batches and extrapolate (0: all)")
    parser.add_argument("--cache", default=os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")) + "/abaw")
    args = parser.parse_args()
    root = ensure_dataset(Path(args.cache))
    now = measure(REPO, root, args.steps)
    print(f"fold 0: {now['train_videos']} training videos, {now['labelled_frames']:,} labelled frames, "
          f"{now['batches']} batches of 16 x 300 (timed {now['timed_batches']}); {now['val_videos']} validation videos")
    t_now = report("this checkout", now)
    if args.ref:
        folder = Path(tempfile.mkdtemp(prefix="bench-epoch-ref-")) / "tree"
        try:
            old = measure(worktree(args.ref, folder), root, args.steps)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder)], capture_output=True)
            shutil.rmtree(folder.parent, ignore_errors=True)
        t_old = report(args.ref, old)
        speedups = "  ".join(f"{k} {old['parts'][k] / max(now['parts'][k], 1e-9):.2f}x" for k in now["parts"])
        print(f"speed-up: epoch {t_old / t_now:.2f}x   ({speedups})")


if __name__ == "__main__":
    main()
