"""CPU forward+backward time and peak memory of every registered neural architecture.

    python benchmarks/bench_models.py                       # ABAW-sized, batch 8, L = 300, 1200, 4800
    python benchmarks/bench_models.py --size demo
    python benchmarks/bench_models.py --archs mamba_va tcn_transformer --lengths 300

Each cell runs in a fresh subprocess (torch.set_num_threads(2)) so that its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) belongs to that cell alone: model, gradients,
inputs and activations of one training step. A cell whose attention maps alone would obviously
exceed ``--max-gb`` is skipped and marked; every other cell runs under an address-space limit of
``--max-gb`` + 4 GB so that a misjudged one fails ("OOM") instead of exhausting the machine.

Time = best of ``--repeats`` training steps (zero_grad, forward, MSE loss on real frames,
backward) after one short warm-up step, as ``timeit`` does: on a shared machine the minimum is
the least disturbed estimate. Repeats stop early once a cell has used ``--budget-s``.
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

# the published systems' widths (shared/ABAW_REFERENCE.md); "demo" uses the demo dataset's widths
ABAW_SETUP = {
    "mamba_va": ({"visual": 1024}, {}),
    "tcn_transformer": ({"visual": 768}, {}),
    "leader_follower": ({"visual": 512, "vggish": 128, "mfcc": 39}, {"followers": ("vggish", "mfcc")}),
    "maven": ({"visual": 1024, "audio": 768, "text": 768}, {}),
    "linear": ({"visual": 768}, {}),
    "tcn": ({"visual": 768}, {}),
}
DEMO_DIMS = {"visual": 768, "audio": 40, "text": 64}

# published code, batch 8 x 300 frames, 2 CPU threads (shared/ABAW_REFERENCE.md)
PUBLISHED_S_AT_300 = {"tcn_transformer": 1.60, "mamba_va": 6.0, "leader_follower": 0.055, "maven": 0.30}


def setup(arch: str, size: str):
    if size == "demo":
        return DEMO_DIMS, {}
    return ABAW_SETUP.get(arch, ({"visual": 768}, {}))


def attention_gb(model, batch: int, length: int) -> float:
    """Lower bound on what one training step keeps for its attention maps: per head, the
    float32 logits and probabilities plus the dropout mask and output (~13 bytes/entry)."""
    import torch.nn as nn
    heads = sum(m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    return batch * heads * length ** 2 * 13 / 1e9


def worker(arch: str, size: str, batch: int, length: int, repeats: int, budget_s: float,
           max_gb: float) -> dict:
    import torch
    torch.set_num_threads(2)
    torch.manual_seed(0)
    from abaw.models import create_model

    dims, overrides = setup(arch, size)
    model = create_model(arch, size=size, input_dims=dims, **overrides).train()
    need = attention_gb(model, batch, length)
    if need > max_gb:
        return {"skipped": f"attention alone ~{need:.0f} GB"}
    limit = int((max_gb + 4) * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def step(t: int) -> float:
        feats = {m: torch.randn(batch, t, dims[m]) for m in model.modalities}
        mask = torch.ones(batch, t, dtype=torch.bool)
        target = torch.rand(batch, t, model.out_dim)
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        out = model(feats, mask)
        ((out - target) ** 2)[mask].mean().backward()
        return time.perf_counter() - start

    try:
        step(min(length, 64))  # warm-up: allocator, kernels, lazy init
        times, spent = [], 0.0
        for _ in range(repeats):
            times.append(step(length))
            spent += times[-1]
            if spent > budget_s:
                break
    except (MemoryError, RuntimeError) as err:  # RLIMIT_AS turns an oversize allocation into this
        if "memory" not in str(err).lower() and not isinstance(err, MemoryError):
            raise
        return {"skipped": f"OOM above {max_gb + 4:.0f} GB"}
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    params = sum(p.numel() for p in model.parameters())
    return {"time_s": min(times), "median_s": statistics.median(times), "times_s": times,
            "peak_gb": peak_gb, "params": params}


def run_cell(args, arch: str, length: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", arch, str(length),
           "--size", args.size, "--batch", str(args.batch), "--repeats", str(args.repeats),
           "--budget-s", str(args.budget_s), "--max-gb", str(args.max_gb)]
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"skipped": f"failed (rc {proc.returncode}): {tail[:60]}"}
    cell = json.loads(proc.stdout.strip().splitlines()[-1])
    # 1-minute load average around the cell: above ~2 on a 2-core machine, others shared the CPUs
    cell["load"] = (load_before, os.getloadavg()[0])
    return cell


def fmt(cell: dict) -> str:
    if "skipped" in cell:
        return f"skip: {cell['skipped']}"
    return f"{cell['time_s']:.3g} s / {cell['peak_gb']:.2f} GB"


def main() -> None:
    from abaw.models import list_models

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="abaw", choices=["abaw", "demo"])
    neural = list_models(kind="neural")  # classical models have no forward pass (bench_context_ridge.py)
    p.add_argument("--archs", nargs="+", default=None, help=f"default: all ({', '.join(neural)})")
    p.add_argument("--lengths", nargs="+", type=int, default=[300, 1200, 4800])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=30.0, help="stop repeating a cell after this long")
    p.add_argument("--max-gb", type=float, default=20.0)
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--worker", nargs=2, metavar=("ARCH", "LENGTH"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        arch, length = args.worker[0], int(args.worker[1])
        print(json.dumps(worker(arch, args.size, args.batch, length, args.repeats, args.budget_s,
                                args.max_gb)))
        return

    archs = args.archs or neural
    unknown = sorted(set(archs) - set(neural))
    if unknown:
        p.error(f"unknown or classical archs {unknown}; neural: {', '.join(neural)}")
    results: dict[str, dict[int, dict]] = {}
    for arch in archs:
        results[arch] = {}
        for length in args.lengths:
            results[arch][length] = run_cell(args, arch, length)
            print(f"  {arch:16s} L={length:<5d} {fmt(results[arch][length])}", file=sys.stderr, flush=True)

    print(f"\nforward+backward, batch {args.batch}, size {args.size!r}, 2 threads, "
          f"time = best of {args.repeats} steps, peak = max RSS of the cell's process")
    head = ["arch", "params"] + [f"L={n}" for n in args.lengths]
    if args.size == "abaw" and 300 in args.lengths:
        head.append("published @300")
    rows = []
    for arch in archs:
        params = next((c["params"] for c in results[arch].values() if "params" in c), None)
        row = [arch, f"{params:,}" if params else "?"] + [fmt(results[arch][n]) for n in args.lengths]
        if len(head) > len(row):
            row.append(f"{PUBLISHED_S_AT_300[arch]:.3g} s" if arch in PUBLISHED_S_AT_300 else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    loads = [x for a in archs for c in results[a].values() for x in c.get("load", ())]
    if loads:
        print(f"1-min load average during the cells: {min(loads):.1f} to {max(loads):.1f} "
              f"({os.cpu_count()} CPUs; above that, other processes shared them and times are inflated)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
