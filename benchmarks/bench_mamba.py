"""Benchmark: abaw.models.mamba.Mamba vs the `mambapy` package (pure-PyTorch Mamba, parallel scan).

Both sides are the same 2-layer residual stack, ``x + Mamba(RMSNorm(x))`` (mambapy's
``Mamba``/``ResidualBlock`` layout), d_model 256, d_state 16, expand 2, d_conv 4, batch 8,
float32, CPU, ``torch.set_num_threads(2)``.  One measurement = forward + ``sum().backward()``.

Every (implementation, L) measurement runs in a fresh subprocess, so that peak memory can be
read robustly as ``ru_maxrss`` (peak RSS of the process) minus the RSS high-water mark just
before the first forward (model, input and imports already resident).  Time is the median
of ``--repeats`` timed iterations after one untimed warm-up iteration (fewer when they
would exceed ``--max-seconds``).  The machine's load average is printed: on a shared
machine, other processes inflate wall-clock times (median and min are both shown).

mambapy needs ~24 GB at L=4800 (about all of a 24 GB machine), so it is skipped there unless
``--full`` is given; even then the worker limits its own address space to what the machine has
available and reports "OOM" instead of taking the machine down.

    python benchmarks/bench_mamba.py            # L = 300, 1200, 4800 (mambapy skipped at 4800)
    python benchmarks/bench_mamba.py --full     # include mambapy at L = 4800
    python benchmarks/bench_mamba.py --lengths 300 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

D_MODEL, N_LAYERS, D_STATE, EXPAND, D_CONV, BATCH = 256, 2, 16, 2, 4, 8
IMPLS = ("ours", "mambapy")
MAMBAPY_SKIP_LEN = 4800  # lengths >= this need --full for mambapy


# --------------------------------------------------------------------------------------
# worker (runs in a fresh subprocess)
# --------------------------------------------------------------------------------------
def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _limit_address_space(margin_bytes: int = 1 << 30) -> None:
    """Cap this process's address space so an oversized run fails with an allocation error
    instead of invoking the kernel OOM killer on a shared machine."""
    avail = _mem_available_bytes()
    if avail is None:
        return
    try:
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        return
    limit = vm + max(avail - margin_bytes, 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _build_model(impl: str):
    import torch
    import torch.nn as nn

    if impl == "mambapy":
        from mambapy.mamba import Mamba as MambaPy, MambaConfig

        cfg = MambaConfig(d_model=D_MODEL, n_layers=N_LAYERS, d_state=D_STATE,
                          expand_factor=EXPAND, d_conv=D_CONV)
        return MambaPy(cfg)

    from abaw.models.mamba import Mamba

    class RMSNorm(nn.Module):  # identical to mambapy's RMSNorm
        def __init__(self, d, eps=1e-5):
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = Mamba(D_MODEL, d_state=D_STATE, d_conv=D_CONV, expand=EXPAND)
            self.norm = RMSNorm(D_MODEL)

        def forward(self, x):
            return self.mixer(self.norm(x)) + x

    return nn.Sequential(*(Block() for _ in range(N_LAYERS)))


def worker(impl: str, seqlen: int, repeats: int, max_seconds: float) -> dict:
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = _build_model(impl)
    x = torch.randn(BATCH, seqlen, D_MODEL)
    n_params = sum(p.numel() for p in model.parameters())
    _limit_address_space()
    base = _rss_peak_mb()

    def step() -> float:
        t0 = time.perf_counter()
        model(x).sum().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    warmup = step()  # untimed warm-up (its memory does count for the peak)
    times = []
    # Timed runs: `repeats` of them, stopping early once `max_seconds` are spent, but at
    # least one unless the warm-up alone took longer than max_seconds (then report it).
    while len(times) < repeats and (warmup + sum(times) <= max_seconds or not times):
        if warmup > max_seconds:
            break
        times.append(step())
    if not times:
        times = [warmup]
    return {
        "impl": impl, "L": seqlen, "time_s": statistics.median(times), "min_s": min(times),
        "runs": len(times),
        "peak_mb": _rss_peak_mb() - base, "params": n_params,
    }


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------
def run_one(impl: str, seqlen: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--L", str(seqlen),
           "--repeats", str(args.repeats), "--max-seconds", str(args.max_seconds)]
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    err = proc.stderr.strip().splitlines()
    oom = proc.returncode in (-9, 137) or any(
        s in proc.stderr for s in ("can't allocate memory", "MemoryError", "out of memory"))
    reason = "OOM" if oom else f"failed (rc={proc.returncode}): {err[-1] if err else ''}"
    return {"impl": impl, "L": seqlen, "error": reason}


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def fmt_time(r):
    if r and "time_s" in r:
        return f"{r['time_s']:8.3f} s"
    return f"{(r or {}).get('error', 'not run'):>10}"


def fmt_mem(r):
    return f"{r['peak_mb'] / 1024:7.2f} GB" if r and "peak_mb" in r else f"{'-':>10}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[300, 1200, 4800])
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--repeats", type=int, default=5, help="timed iterations (median)")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="stop repeating once this much time is spent (per measurement)")
    p.add_argument("--full", action="store_true",
                   help=f"also run mambapy at L >= {MAMBAPY_SKIP_LEN} (~24 GB RAM)")
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--L", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.L, args.repeats, args.max_seconds)), flush=True)
        return 0

    print(f"Mamba fwd+bwd, {N_LAYERS} layers, d_model={D_MODEL}, d_state={D_STATE}, "
          f"expand={EXPAND}, batch={BATCH}, float32, CPU, 2 threads")
    print(f"load average at start: {_loadavg()} (other processes skew wall-clock times)")
    results = {}
    for seqlen in args.lengths:
        for impl in args.impls:
            if impl == "mambapy" and seqlen >= MAMBAPY_SKIP_LEN and not args.full:
                results[impl, seqlen] = {"error": "skipped"}
                print(f"  {impl:8s} L={seqlen:5d}: skipped (needs ~24 GB RAM; use --full)")
                continue
            r = run_one(impl, seqlen, args)
            results[impl, seqlen] = r
            line = f"  {impl:8s} L={seqlen:5d}: median {fmt_time(r).strip()}"
            if "runs" in r:
                line += (f"  peak +{fmt_mem(r).strip()}  (min {r['min_s']:.3f} s of "
                         f"{r['runs']} runs, {r['params']:,} params)")
            print(line, flush=True)

    hdr = (f"{'L':>6} | {'ours time':>10} | {'ours mem':>10} | {'mambapy time':>12} | "
           f"{'mambapy mem':>11} | {'speed-up':>8} | {'mem ratio':>9}")
    print()
    print(hdr)
    print("-" * len(hdr))
    for seqlen in args.lengths:
        o, m = results.get(("ours", seqlen)), results.get(("mambapy", seqlen))
        ok = o and m and "time_s" in o and "time_s" in m
        speed = f"{m['time_s'] / o['time_s']:7.2f}x" if ok else f"{'-':>8}"
        mem = f"{m['peak_mb'] / max(o['peak_mb'], 1e-9):8.2f}x" if ok else f"{'-':>9}"
        print(f"{seqlen:>6} | {fmt_time(o):>10} | {fmt_mem(o):>10} | {fmt_time(m):>12} | "
              f"{fmt_mem(m):>11} | {speed} | {mem}")
    print("speed-up = mambapy time / ours; mem ratio = mambapy peak / ours "
          "(peak RSS above the pre-forward baseline)")
    print(f"load average at end: {_loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
