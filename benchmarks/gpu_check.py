"""One-shot GPU check of the toolkit on a lent CUDA machine (run by benchmarks/gpu_check.sh).

    python benchmarks/gpu_check.py                     # on the GPU: every step, ABAW sizes, bf16
    python benchmarks/gpu_check.py --cpu --tiny        # here: the same steps on the CPU, tiny sizes, fp32
    python benchmarks/gpu_check.py --steps scan cv     # some steps only

Steps (each catches its own failure, logs it, and the next one runs; exit 1 if any failed):

  pytest  ``pytest -m cuda -q -rs`` (test modules that import a package the machine lacks are --ignore'd
          and named; the cuda tests skip without mamba_ssm, which the machine does not have)
  models  every neural architecture of the registry at its published size ("abaw"), batch 16 x 300
          frames with the input widths its config expects: forward + backward under bf16 autocast;
          time per step (median after warm-up, synchronised), frames/s, peak memory
  scan    abaw.models.mamba.selective_scan against selective_scan_sequential on the device, float32:
          outputs and gradients, max abs / rel error, fail beyond tolerance
  cv      a 2-fold, 1-epoch run_cv.py --size abaw --arch mamba_va --device cuda on generated
          Aff-Wild2-shaped features (1024-d visual), timed
  ckpt    fold 0's model.pt of that run loaded on the CPU predicts what it predicts on the device
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("pytest", "models", "scan", "cv", "ckpt")


def log(*parts) -> None:
    print(*parts, flush=True)


class Ctx:
    def __init__(self, args):
        import torch
        self.cpu = args.cpu
        self.tiny = args.tiny
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.device = torch.device("cpu" if args.cpu else "cuda")
        self.size = "demo" if args.tiny else "abaw"
        self.batch, self.frames = (2, 64) if args.tiny else (16, 300)
        self.bf16 = not args.cpu  # bf16 autocast on the GPU, plain fp32 on the CPU
        self.run_dir = self.work / "cv_run"
        self.data_root = self.work / "cv_data"

    def sync(self) -> None:
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize()


# --------------------------------------------------------------------------- step 1: pytest
def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        m = re.match(r"(?:import|from)\s+([A-Za-z_][\w]*)", line)  # column 0 only: module level
        if m:
            names.add(m.group(1))
    return names


def step_pytest(ctx: Ctx) -> str:
    ignore = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        missing = sorted(n for n in _top_level_imports(path)
                         if n not in ("conftest", "abaw") and not n.startswith("test_")
                         and importlib.util.find_spec(n) is None)
        if missing:
            ignore.append(path)
            log(f"  ignoring {path.name}: imports {', '.join(missing)} (not installed here; it holds no cuda test)"
                if "cuda" not in path.read_text() else f"  ignoring {path.name}: imports {', '.join(missing)}")
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
           *[f"--ignore={p}" for p in ignore], str(REPO / "tests")]
    log("  $", " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    out = (proc.stdout + proc.stderr).rstrip()
    for line in out.splitlines()[-40:]:
        log("  |", line)
    if proc.returncode not in (0, 5):  # 5: no test selected
        raise RuntimeError(f"pytest -m cuda exited {proc.returncode}")
    last = out.splitlines()[-1] if out else ""
    return f"pytest -m cuda: {last.strip()} ({time.perf_counter() - t0:.0f} s)"


# --------------------------------------------------------------------------- step 2: models
def config_dims(cfg) -> dict[str, int]:
    """The input widths an architecture's resolved config expects (its own presets)."""
    dims = getattr(cfg, "dims", None)
    if isinstance(dims, dict) and dims:
        return {m: int(d) for m, d in dims.items()}
    return {cfg.modality: int(cfg.input_dim)}


def step_models(ctx: Ctx) -> str:
    import torch
    from abaw.models import create_model, is_classical, list_models, model_info

    rows, failed = [], []
    skipped = [n for n in list_models() if is_classical(n)]
    log(f"  classical (no forward pass, skipped): {', '.join(skipped)}")
    log(f"  size={ctx.size} batch={ctx.batch} frames={ctx.frames} "
        f"{'bf16 autocast' if ctx.bf16 else 'fp32'} device={ctx.device}")
    for name in list_models():
        if is_classical(name):
            continue
        try:
            torch.manual_seed(0)
            info = model_info(name, size=ctx.size)
            dims = config_dims(info.config)
            model = create_model(name, size=ctx.size).to(ctx.device).train()
            params = sum(p.numel() for p in model.parameters())
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            feats = {m: torch.randn(ctx.batch, ctx.frames, dims[m], device=ctx.device) for m in model.modalities}
            mask = torch.ones(ctx.batch, ctx.frames, dtype=torch.bool, device=ctx.device)
            mask[0, ctx.frames * 3 // 4:] = False  # one padded sequence, as in training batches
            target = torch.rand(ctx.batch, ctx.frames, 2, device=ctx.device) * 2 - 1

            def step():
                opt.zero_grad(set_to_none=True)
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.bf16):
                    out = model(feats, mask)
                loss = ((out.float() - target) ** 2)[mask].mean()
                loss.backward()
                opt.step()
                return loss

            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            for _ in range(3):  # warm-up: allocator, cuDNN autotuning, lazy init
                step()
            ctx.sync()
            times = []
            for _ in range(3 if ctx.tiny else 10):
                t0 = time.perf_counter()
                loss = step()
                ctx.sync()
                times.append(time.perf_counter() - t0)
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss {loss.item()}")
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if ctx.device.type == "cuda" else float("nan")
            med = statistics.median(times)
            row = {"arch": name, "params_M": round(params / 1e6, 2), "dims": dims, "step_ms": round(med * 1e3, 2),
                   "min_ms": round(min(times) * 1e3, 2), "frames_per_s": round(ctx.batch * ctx.frames / med),
                   "peak_GiB": None if peak != peak else round(peak, 3)}
            rows.append(row)
            log(f"  {name:16s} {row['params_M']:7.2f}M params  {row['step_ms']:9.2f} ms/step (min {row['min_ms']:.2f})"
                f"  {row['frames_per_s']:>10,} frames/s  peak {peak:.3f} GiB  dims {dims}")
        except Exception as exc:  # noqa: BLE001 - one architecture's failure must not hide the others
            failed.append(name)
            log(f"  {name}: FAILED {type(exc).__name__}: {exc}")
            log(traceback.format_exc())
        finally:
            model = opt = feats = mask = target = None  # noqa: F841
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    log("  JSON " + json.dumps(rows))
    if failed:
        raise RuntimeError(f"architectures failed: {', '.join(failed)}")
    return f"{len(rows)} architectures timed"


# --------------------------------------------------------------------------- step 3: scan
SCAN_TOL = 1e-4  # max |err| <= tol * max(1, max |ref|), as tests/test_mamba.py


def scan_inputs(batch, dim, nstate, seqlen, device, seed=0):
    """Like tests/test_mamba.py's make_scan_inputs (large and tiny dt included)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, seqlen, generator=g)
    delta = torch.randn(batch, dim, seqlen, generator=g) * 3.0
    delta.view(-1)[::7] = 20.0
    delta.view(-1)[3::11] = -20.0
    A = -torch.exp(torch.randn(dim, nstate, generator=g))
    A[0, 0] = -8.0
    B = torch.randn(batch, nstate, seqlen, generator=g)
    C = torch.randn(batch, nstate, seqlen, generator=g)
    D = torch.randn(dim, generator=g)
    z = torch.randn(batch, dim, seqlen, generator=g)
    delta_bias = torch.randn(dim, generator=g) * 0.5
    return [t.to(device).requires_grad_() for t in (u, delta, A, B, C, D, z, delta_bias)]


def step_scan(ctx: Ctx) -> str:
    import torch
    from abaw.models.mamba import selective_scan, selective_scan_sequential

    # (batch, d_inner, d_state, L, chunk_size, segment_len); None = the module's defaults
    shapes = [(2, 6, 4, 45, 8, 16), (2, 16, 8, 300, None, None), (4, 64, 16, 513, None, None),
              (2, 32, 8, 1000, 64, 256)]
    if ctx.tiny:
        shapes = [(2, 6, 4, 45, 8, 16), (2, 8, 4, 130, None, None)]
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # true fp32
    worst, bad = 0.0, []
    try:
        for b, d, n, L, chunk, seg in shapes:
            inputs = scan_inputs(b, d, n, L, ctx.device)
            u, delta, A, B, C, D, z, bias = inputs
            kw = dict(D=D, z=z, delta_bias=bias, delta_softplus=True)
            ref = selective_scan_sequential(u, delta, A, B, C, **kw)
            t0 = time.perf_counter()
            out = selective_scan(u, delta, A, B, C, chunk_size=chunk, segment_len=seg, **kw)
            ctx.sync()
            fwd_ms = (time.perf_counter() - t0) * 1e3
            gy = torch.randn_like(ref)
            g_ref = torch.autograd.grad(ref, inputs, gy)
            g_out = torch.autograd.grad(out, inputs, gy)
            pairs = [("y", out, ref)] + [(f"d{nm}", go, gr) for nm, go, gr in
                                         zip(("u", "delta", "A", "B", "C", "D", "z", "bias"), g_out, g_ref)]
            parts = []
            for nm, a, r in pairs:
                err = (a - r).abs().max().item()
                scale = max(1.0, r.abs().max().item())
                rel = err / scale
                worst = max(worst, rel)
                finite = bool(torch.isfinite(a).all())
                parts.append(f"{nm} {err:.2e}/{rel:.1e}")
                if rel > SCAN_TOL or not finite:
                    bad.append(f"{(b, d, n, L)} {nm}: abs {err:.3g}, rel {rel:.3g}{'' if finite else ', non-finite'}")
            log(f"  B={b} D={d} N={n} L={L} chunk={chunk} seg={seg} ({fwd_ms:.1f} ms fwd): "
                f"max abs/rel err  " + "  ".join(parts))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
    if bad:
        raise RuntimeError(f"scan beyond tolerance {SCAN_TOL} (err / max(1, |ref|max)): " + "; ".join(bad))
    return f"{len(shapes)} shapes, worst scaled error {worst:.2e} <= {SCAN_TOL}"


# --------------------------------------------------------------------------- step 4: cv
def step_cv(ctx: Ctx) -> str:
    import shutil

    from abaw import demo

    if ctx.tiny:
        spec = demo.DemoSpec(n_train=10, n_val=2, n_test=2, min_frames=200, max_frames=500,
                             mean_extra_frames=100, dims=(("visual", 32),))
    else:  # Aff-Wild2-shaped: 1024-d visual, lengths as the demo's (mean ~1000 frames)
        spec = demo.DemoSpec(n_train=96, n_val=24, n_test=16, dims=(("visual", 1024),))
    shutil.rmtree(ctx.data_root, ignore_errors=True)
    shutil.rmtree(ctx.run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    demo.generate(ctx.data_root, spec)
    gen_s = time.perf_counter() - t0
    mb = sum(p.stat().st_size for p in (ctx.data_root / "features").rglob("*.npy")) / 2 ** 20
    log(f"  generated {spec.n_train + spec.n_val + spec.n_test} videos, {mb:.0f} MiB of features in {gen_s:.1f} s")
    cmd = [sys.executable, str(REPO / "run_cv.py"), "--data-root", str(ctx.data_root), "--arch", "mamba_va",
           "--size", ctx.size, "--folds", "2", "--epochs", "1", "--patience", "1", "--jobs", "1",
           "--device", str(ctx.device), "--out", str(ctx.run_dir)]
    log("  $", " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    for line in (proc.stdout + proc.stderr).rstrip().splitlines()[-30:]:
        log("  |", line)
    if proc.returncode != 0:
        raise RuntimeError(f"run_cv.py exited {proc.returncode} after {wall:.1f} s")
    model_pt = ctx.run_dir / "mamba_va" / "fold0" / "model.pt"
    if not model_pt.is_file():
        raise RuntimeError(f"{model_pt} was not written")
    return f"run_cv.py 2 folds x 1 epoch at --size {ctx.size} on {ctx.device}: {wall:.1f} s wall"


# --------------------------------------------------------------------------- step 5: ckpt
def step_ckpt(ctx: Ctx) -> str:
    import numpy as np
    import torch

    from abaw.checkpoint import load_checkpoint
    from abaw.config import RunConfig
    from abaw.data import open_dataset
    from abaw.train import build_model
    from abaw.windows import predict_video

    path = ctx.run_dir / "mamba_va" / "fold0" / "model.pt"
    if not path.is_file():
        raise RuntimeError(f"{path} missing: the cv step did not write it")
    ckpt = load_checkpoint(path, map_location="cpu")
    known = {f.name for f in dataclasses.fields(RunConfig)}
    config = RunConfig(**{k: v for k, v in ckpt["run_config"].items() if k in known})
    dataset = open_dataset(ctx.data_root)
    videos = sorted(dataset.videos.values(), key=lambda v: v.name)[:4]

    def predictions(device) -> dict[str, np.ndarray]:
        model = build_model(config, ckpt["arch"], dataset)
        model.load_state_dict(ckpt["state_dict"])
        model.to(device).eval()
        return {v.name: predict_video(model, v, config.window, config.hop, device, config.full_sequence_predict)
                for v in videos}

    cpu = predictions(torch.device("cpu"))
    results = {}
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        # as the toolkit predicts (PyTorch's defaults: cuDNN convolutions may use TF32), then strict fp32
        for label, tf32, tol in (("default", prev[1], 2e-2), ("no-TF32", False, 1e-4)):
            torch.backends.cuda.matmul.allow_tf32 = prev[0] and tf32
            torch.backends.cudnn.allow_tf32 = tf32
            dev = predictions(ctx.device)
            err = max(float(np.abs(dev[n] - cpu[n]).max()) for n in cpu)
            scale = max(1.0, max(float(np.abs(cpu[n]).max()) for n in cpu))
            results[label] = (err, err / scale, tol)
            log(f"  {ctx.device} ({label}) vs cpu over {len(videos)} videos "
                f"({sum(v.n_frames for v in videos)} frames): max abs err {err:.3g}, rel {err / scale:.3g} (tol {tol})")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
    bad = [f"{k}: {r:.3g} > {t}" for k, (_, r, t) in results.items() if not r <= t]
    if bad:
        raise RuntimeError("device and CPU predictions differ: " + "; ".join(bad))
    return (f"epoch-{ckpt['epoch']} checkpoint: cpu == {ctx.device} within tolerance "
            f"({', '.join(f'{k} {r:.2g}' for k, (_, r, _) in results.items())})")


# --------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="device cpu, fp32 (checks the script off the GPU)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: demo models, short inputs, a small dataset")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    p.add_argument("--work", default=os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check"),
                   help="scratch folder for the generated data and the CV run")
    args = p.parse_args()

    import torch
    log(f"python {sys.version.split()[0]}  torch {torch.__version__}  cuda available {torch.cuda.is_available()}")
    if not args.cpu:
        if not torch.cuda.is_available():
            log("no CUDA device: run with --cpu (--tiny) off the GPU")
            return 2
        log(f"device {torch.cuda.get_device_name(0)}, "
            f"{torch.cuda.get_device_properties(0).total_memory / 2 ** 30:.0f} GiB")
    else:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    ctx = Ctx(args)
    funcs = {"pytest": step_pytest, "models": step_models, "scan": step_scan, "cv": step_cv, "ckpt": step_ckpt}
    summary = []
    t_all = time.perf_counter()
    for name in args.steps:
        log(f"\n=== {name} ===")
        t0 = time.perf_counter()
        try:
            msg = funcs[name](ctx)
            summary.append((name, "OK", msg, time.perf_counter() - t0))
        except Exception as exc:  # noqa: BLE001 - log it and go on to the next step
            log(traceback.format_exc().rstrip())
            summary.append((name, "FAIL", f"{type(exc).__name__}: {exc}", time.perf_counter() - t0))
        log(f"=== {name}: {summary[-1][1]} ({summary[-1][3]:.1f} s) ===")
    log(f"\n=== summary ({time.perf_counter() - t_all:.0f} s) ===")
    for name, status, msg, secs in summary:
        log(f"{status:4s} {name:7s} {secs:6.1f} s  {msg}")
    return 1 if any(s == "FAIL" for _, s, _, _ in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
