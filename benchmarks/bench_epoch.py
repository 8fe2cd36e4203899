"""One training epoch of mamba_va (demo size) on data shaped like Aff-Wild2, split into its parts.

    python benchmarks/bench_epoch.py                      # this checkout, one whole epoch + validation
    python benchmarks/bench_epoch.py --ref cb720d7        # and the same epoch on another git ref, in one run
    python benchmarks/bench_epoch.py --steps 60           # time 60 batches, extrapolate to the epoch

The dataset (generated once into --cache): 445 labelled videos of 1,000-8,000 frames (mean about
4,200), so that fold 0 of the default 5-fold split trains on about 356 videos and 1.4 M labelled
frames, as on Aff-Wild2; one small 2-d visual feature per frame (a new user's first try with a
cheap feature); no-face stretches and -5 label stretches like the demo's.

For each code version (this checkout, and ``--ref`` checked out into a temporary worktree) a
process builds fold 0's trainer and runs the first batch (timed apart: one-off costs); then the two
processes take turns of ``--block`` batches each, so that both see the same drifts of this VM's
speed (which varies by up to 20 % within minutes). Per batch it times reading the windows (the
DataLoader), forward, backward (loss included) and the optimizer step; then the validation of the
fold's videos (whole-video prediction, as the early stopping does). Both versions see the same
batches. Prints a table and the speed-up of this checkout over the ref.

Then this checkout's first batch is taken apart (``replay_floor``): each matrix product,
convolution and call into the compiled loops is timed as it runs inside the step, and replayed
alone at its best and from a cold cache. With ``--ref``, it says how much of a 3x epoch (the ref's
epoch / 3) those calls alone would take.
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

# Runs inside a measuring process, against whichever abaw is first on sys.path. It builds fold 0's
# trainer, runs the first batch, then obeys commands on stdin: "run K" times the next K batches,
# "validate" times the validation; each answers with one JSON line. Two processes (this checkout and
# the ref) take turns, so that both see the same drifts of this VM's speed.
MEASURE = r'''
import json, sys, time
import numpy as np
import torch
from abaw.config import RunConfig
from abaw.data import open_dataset
from abaw.folds import load_or_make_folds
from abaw.metrics import ccc_loss
from abaw.train import FoldTrainer, build_model, _param_groups, evaluate
from abaw.windows import WindowDataset

root, folds_dir, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(seed)
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
batches = iter(loader)


def train_step(batch):
    out = model({"visual": batch["visual"]}, batch["mask"])
    t1 = time.perf_counter()
    loss = ccc_loss(out.float(), batch["labels"], batch["mask"] & batch["label_mask"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return t1, t2, time.perf_counter()


def reply(**message):
    print(json.dumps(message), flush=True)


model.train()
tic = time.perf_counter()
first_batch = next(batches)
train_step(first_batch)  # the first batch: one-off costs (loading compiled kernels), kept apart
frames = sum(int(v.label_mask.sum()) for v in trainer.train_videos)
reply(first=time.perf_counter() - tic, batches=len(loader), train_videos=len(trainer.train_videos),
      labelled_frames=frames, val_videos=len(trainer.stop_videos), threads=torch.get_num_threads())


def replay_floor(batch):
    # One training step taken apart: every matrix product and convolution (forward and backward)
    # and every call into the compiled loops. A first step times each call as it runs in the step; a
    # second records each with a copy of its inputs; each is then replayed alone, once right after
    # 64 MiB were written (a cold cache) and 5 times (the fastest counts): what the step's
    # arithmetic costs at best, with nothing around it.
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map
    aten = torch.ops.aten
    heavy = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.convolution.default,
             aten.convolution_backward.default}
    try:
        from abaw.models import scan_cpu
    except ImportError:
        scan_cpu = None
    compiled = scan_cpu is not None and hasattr(scan_cpu, "run_parallel")
    original = scan_cpu.run_parallel if compiled else None

    def copy(x):  # a private copy with the same strides: numba compiles per layout, oneDNN picks by it
        if isinstance(x, torch.Tensor):
            return torch.empty(0, dtype=x.dtype).set_(x.untyped_storage().clone(), x.storage_offset(),
                                                      x.shape, x.stride())
        if isinstance(x, np.ndarray) and x.ndim and not x.flags.c_contiguous:
            span = sum((n - 1) * st for n, st in zip(x.shape, x.strides)) // x.itemsize + 1
            out = np.lib.stride_tricks.as_strided(np.empty(span, x.dtype), x.shape, x.strides)
            out[...] = x
            return out
        return x.copy() if isinstance(x, np.ndarray) else x

    def take_apart(on_call):
        # One train_step with on_call(kind, func, args, kwargs) standing in for each heavy call.
        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in heavy:
                    return on_call("gemm+conv", func, args, kwargs or {})
                return func(*args, **(kwargs or {}))

        if compiled:
            def loops(kernel, *args):
                kind = "scan" if "items" in kernel.__name__ else "other loops"
                return on_call(kind, lambda *a: original(kernel, *a), args, {})
            scan_cpu.run_parallel = loops
        try:
            with Mode():
                train_step(batch)
        finally:
            if compiled:
                scan_cpu.run_parallel = original

    in_step, calls = {}, []

    def timed(kind, func, args, kwargs):
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        in_step[kind] = in_step.get(kind, 0.0) + time.perf_counter() - t0
        return out

    def recorded(kind, func, args, kwargs):
        calls.append((kind, func, tree_map(copy, args), tree_map(copy, kwargs)))
        return func(*args, **kwargs)

    take_apart(timed)
    take_apart(recorded)
    best, cold = {}, {}
    flush = torch.zeros(16 * 2**20)  # 64 MiB, twice this CPU's L3
    for kind, func, args, kwargs in calls:
        flush.add_(1.0)
        t0 = time.perf_counter()
        func(*args, **kwargs)
        cold[kind] = cold.get(kind, 0.0) + time.perf_counter() - t0
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            func(*args, **kwargs)
            times.append(time.perf_counter() - t0)
        best[kind] = best.get(kind, 0.0) + min(times)
    return best, cold, in_step, len(calls)


for command in sys.stdin:
    if command.startswith("floor"):
        model.train()  # after the epoch (the batches are used up): the first batch again
        tic = time.perf_counter()
        train_step(first_batch)
        whole = time.perf_counter() - tic
        best, cold, in_step, n = replay_floor(first_batch)
        reply(floor=best, cold=cold, in_step=in_step, calls=n, step=whole)
    elif command.startswith("run"):
        parts, n = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}, 0
        tic = time.perf_counter()
        for batch in batches:
            t0 = time.perf_counter()
            t1, t2, t3 = train_step(batch)
            for key, begin, end in (("data", tic, t0), ("forward", t0, t1), ("backward", t1, t2), ("optimizer", t2, t3)):
                parts[key] += end - begin
            n += 1
            if n == int(command.split()[1]):
                break
            tic = time.perf_counter()
        reply(parts=parts, n=n)
    elif command.startswith("validate"):
        t0 = time.perf_counter()
        val, _ = evaluate(model, trainer.stop_videos, cfg, torch.device("cpu"))
        reply(validation=time.perf_counter() - t0, val_ccc=val["mean"])
    else:
        break
'''


class Measurer:
    # One measuring process for one code version; it waits on stdin between commands.

    def __init__(self, code_root: Path, data_root: Path, folds_dir: str, seed: int):
        env = {**os.environ, "PYTHONPATH": str(code_root), "HF_HUB_OFFLINE": "1"}
        self.code_root = code_root
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would block the process
        self.proc = subprocess.Popen([sys.executable, "-c", MEASURE, str(data_root), folds_dir, str(seed)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, cwd=folds_dir)
        self.info = self._answer()
        self.parts = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        self.timed = 0

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=60)
            self.stderr.seek(0)
            raise RuntimeError(f"measuring {self.code_root} failed:\n{self.stderr.read()[-4000:]}")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def run(self, n: int) -> int:
        answer = self.ask(f"run {n}")
        for key, value in answer["parts"].items():
            self.parts[key] += value
        self.timed += answer["n"]
        return answer["n"]

    def result(self, floor: bool = False) -> dict:
        val = self.ask("validate")
        replayed = self.ask("floor") if floor else None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        scale = (self.info["batches"] - 1) / self.timed  # the first batch is timed apart
        parts = {k: v * scale for k, v in self.parts.items()}
        parts.update({"first batch": self.info["first"], "validation": val["validation"]})
        return {**self.info, "parts": parts, "timed_batches": self.timed, "val_ccc": val["val_ccc"],
                "floor": replayed}


def measure_interleaved(roots: list[Path], data_root: Path, steps: int, block: int, seed: int = 0) -> list[dict]:
    # Times the code versions in turns of ``block`` batches each, until ``steps`` (0: the epoch).
    with tempfile.TemporaryDirectory() as folds_dir:
        measurers = []
        try:
            for root in roots:  # started one after the other: each builds its trainer alone
                measurers.append(Measurer(root, data_root, folds_dir, seed))
            total = measurers[0].info["batches"] - 1
            goal = min(steps, total) if steps else total
            while measurers[0].timed < goal:
                n = min(block, goal - measurers[0].timed)
                for m in measurers:
                    m.run(n)
            return [m.result(floor=i == 0) for i, m in enumerate(measurers)]
        finally:
            for m in measurers:
                if m.proc.poll() is None:
                    m.proc.kill()


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
    parser.add_argument("--ref", help="a git ref to time against, in the same run (e.g. cb720d7, the code before "
                                      "the speed-ups)")
    parser.add_argument("--steps", type=int, default=0, help="time this many batches and extrapolate (0: all)")
    parser.add_argument("--block", type=int, default=10, help="batches per turn when two versions take turns")
    parser.add_argument("--seed", type=int, default=0, help="torch's seed (initial weights and dropout)")
    parser.add_argument("--cache", default=os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")) + "/abaw")
    args = parser.parse_args()
    root = ensure_dataset(Path(args.cache))
    folder = Path(tempfile.mkdtemp(prefix="bench-epoch-ref-")) / "tree"
    try:
        roots = [REPO] + ([worktree(args.ref, folder)] if args.ref else [])
        results = measure_interleaved(roots, root, args.steps, args.block, args.seed)
    finally:
        if args.ref:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder)], capture_output=True)
        shutil.rmtree(folder.parent, ignore_errors=True)
    now = results[0]
    print(f"fold 0: {now['train_videos']} training videos, {now['labelled_frames']:,} labelled frames, "
          f"{now['batches']} batches of 16 x 300 (timed {now['timed_batches']}"
          f"{f', in turns of {args.block}' if args.ref else ''}); {now['val_videos']} validation videos")
    t_now = report("this checkout", now)
    if args.ref:
        old = results[1]
        t_old = report(args.ref, old)
        speedups = "  ".join(f"{k} {old['parts'][k] / max(now['parts'][k], 1e-9):.2f}x" for k in now["parts"])
        print(f"speed-up: epoch {t_old / t_now:.2f}x   ({speedups})")
    floor_report(now, t_old / 3 if args.ref else None)


def floor_report(now: dict, budget: float | None) -> None:
    # Where one training step's time goes (replay_floor), and how much of a 3x epoch its products,
    # convolutions and scans alone would take.
    step, kinds = now["floor"]["step"], ("gemm+conv", "scan", "other loops")
    ms = {k: 1e3 * now["floor"]["floor"].get(k, 0.0) for k in kinds}
    cold = {k: 1e3 * now["floor"]["cold"].get(k, 0.0) for k in kinds}
    inside = {k: 1e3 * now["floor"]["in_step"].get(k, 0.0) for k in kinds}
    print(f"one step taken apart ({now['floor']['calls']} calls; the step took {1e3 * step:.1f} ms): "
          f"in the step / alone at best / alone from a cold cache")
    for kind, name in zip(kinds, ("matrix products + convolutions", "scan loops", "other compiled loops")):
        print(f"  {name:>31}: {inside[kind]:5.1f} / {ms[kind]:5.1f} / {cold[kind]:5.1f} ms")
    if budget:
        heavy = ("gemm+conv", "scan")
        spent = [now["batches"] * sum(t[k] for k in heavy) / 1e3 for t in (inside, ms, cold)]
        print(f"a 3x epoch is {budget:.1f} s; the {now['batches']} training steps' products, convolutions and "
              f"scans alone take " + ", ".join(f"{v:.1f} s ({100 * v / budget:.0f} %) {how}" for v, how in
                                             zip(spent, ("in the steps", "alone at best", "from a cold cache"))))


if __name__ == "__main__":
    main()
