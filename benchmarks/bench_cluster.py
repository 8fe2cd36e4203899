"""A 2-fold, 2-architecture CV on a 2-node Ray cluster on loopback, against one process; then a kill.

    python benchmarks/bench_cluster.py                 # the demo dataset, mamba_va + tcn, 3 epochs
    python benchmarks/bench_cluster.py --epochs 6 --spec small

Measures, in one run:
1. one process with one torch thread (the reference: a cluster fold also trains on one thread),
   and one process with every core's threads (what ``run_cv.py`` does on this machine by default);
2. the cluster (``abaw/loopback.py``: a head node and node2, one CPU each): its start-up, its
   memory idle (Ray's own processes) and at its peak during the CV (Ray's processes and the workers
   training), and the CV's wall time; and whether its files equal the one-thread reference's;
3. the same CV again, with node2's worker killed (SIGKILL) after its fold's first epoch: how long
   until Ray placed the fold again, until it resumed from last.pt, and until it finished.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from abaw import demo  # noqa: E402
from abaw.loopback import LoopbackCluster, cluster_env  # noqa: E402

MB = 1024 * 1024


def cv_args(root: Path, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "run_cv.py"), "--data-root", str(root), "--out", "run", "--arch", "mamba_va",
            "tcn", "--folds", "2", "--epochs", str(epochs), "--patience", "99", *extra]


def timed(args: list[str], cwd: Path, env: dict) -> float:
    cwd.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stdout[-3000:] + out.stderr[-3000:])
    return time.perf_counter() - tic


class PeakMemory:
    """Samples the cluster's resident memory every half second while the block runs."""

    def __init__(self, cluster: LoopbackCluster):
        self.cluster, self.peak, self._stop = cluster, 0, threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, self.cluster.rss_bytes())

    def __enter__(self) -> "PeakMemory":
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()


def same_predictions(a: Path, b: Path) -> bool:
    """Every prediction file (oof, test) and the summary equal, byte for byte."""
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*.csv") if p.name != "history.csv")
    return names == sorted(str(p.relative_to(b)) for p in b.rglob("*.csv") if p.name != "history.csv") and \
        all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def killed_run(root: Path, cwd: Path, epochs: int, cluster: LoopbackCluster, env: dict) -> dict[str, float]:
    """The CV with node2's worker killed after its fold's first epoch; seconds from the kill to each event."""
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cv_args(root, epochs, "--cluster", cluster.address), cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    placed, times, killed, log = {}, {}, None, []
    for line in proc.stdout:
        now = time.perf_counter()
        log.append(line)
        if m := re.match(r"(\w+ fold \d): running on node (\w+) \(pid (\d+)\)", line):
            if killed and "first placement" not in times:  # the slot the kill freed: which fold took it
                times["first placement"], times["first fold"] = now - times["kill"], m[1]
            if m[1] == killed:
                times.setdefault("placed again", now - times["kill"])
            placed[m[1]] = (m[2], int(m[3]))
        elif m := re.match(r"(\w+ fold \d): epoch 1/", line):
            if killed is None and placed.get(m[1], ("",))[0] == "node2":
                killed = m[1]
                signal_sent = time.perf_counter()
                os.kill(placed[killed][1], signal.SIGKILL)
                times["kill"] = signal_sent
        elif killed and line.startswith(f"{killed}: resumed"):
            times.setdefault("resumed", now - times["kill"])
        elif killed and line.startswith(f"{killed}: done"):
            times.setdefault("done", now - times["kill"])
    if proc.wait() != 0 or killed is None:
        raise RuntimeError("".join(log[-50:]))
    times.pop("kill")
    return {"fold": killed, **times}  # seconds after the kill, and the killed fold's name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", choices=["demo", "small"], default="demo")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    spec = demo.DemoSpec() if args.spec == "demo" else demo.DemoSpec(n_train=12, n_val=4, n_test=3, max_frames=900,
                                                                       mean_extra_frames=300)
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    try:
        root = demo.generate(work / "root", spec)
        one = cluster_env(threads=1)
        t_one = timed(cv_args(root, args.epochs), work / "one-thread", one)
        peak_one = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        t_all = timed(cv_args(root, args.epochs), work / "all-threads", {**one, "OMP_NUM_THREADS": ""})
        tic = time.perf_counter()
        with LoopbackCluster(work / "ray", one, nodes=2) as cluster:
            t_start = time.perf_counter() - tic
            idle = cluster.rss_bytes()
            with PeakMemory(cluster) as memory:
                t_cluster = timed(cv_args(root, args.epochs, "--cluster", cluster.address), work / "cluster", one)
            same = same_predictions(work / "cluster" / "run", work / "one-thread" / "run")
            kill = killed_run(root, work / "killed", args.epochs, cluster, one)
            same_killed = same_predictions(work / "killed" / "run", work / "one-thread" / "run")
        print(f"dataset: {args.spec} ({len(list((root / 'features').rglob('*.npy')))} feature files), "
              f"mamba_va + tcn, 2 folds, {args.epochs} epochs")
        print(f"one process, 1 thread:          {t_one:6.1f} s   (peak RSS of the process {peak_one / MB:.0f} MB)")
        print(f"one process, all threads:       {t_all:6.1f} s")
        print(f"cluster start (2 nodes):        {t_start:6.1f} s")
        print(f"2-node cluster, 1 CPU per fold: {t_cluster:6.1f} s   ({t_one / t_cluster:.2f}x the 1-thread process, "
              f"{t_all / t_cluster:.2f}x the all-threads one); predictions equal the 1-thread run's: {same}")
        print(f"Ray's processes idle:           {idle / MB:6.0f} MB RSS (2 nodes: GCS, raylets, agents, idle workers)")
        print(f"cluster at its peak:            {memory.peak / MB:6.0f} MB RSS (the same, plus the workers training)")
        print(f"killed {kill['fold']} on node2 after epoch 1: placed again after {kill.get('placed again', float('nan')):.1f} s, "
              f"resumed after {kill.get('resumed', float('nan')):.1f} s, done {kill.get('done', float('nan')):.1f} s "
              f"after the kill; predictions equal an unbroken run's: {same_killed}")
        print(f"  the first fold placed after the kill: {kill['first fold']}, {kill['first placement']:.1f} s after it "
              f"(a queued fold takes the freed CPU first when the cluster is full)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
