"""The selective scan's recurrence as compiled CPU loops (numba), for float32 training on the CPU.

Why: the pure-PyTorch chunked scan in :mod:`abaw.models.mamba` runs the recurrence as a few dozen
small tensor operations per chunk, each a memory-bound pass over (B, S, D, N) buffers; at the
demo size it was 55 % of a training step. A loop compiled once does the same recurrence in one
pass per direction, with the state in registers and nothing of size (B, L, D, N) in memory.

Everything elementwise is done in the same loops (softplus of dt, the D skip, the ``silu(z)`` gate
and their gradients), so a Mamba layer's scan reads its (B, L, D) inputs once per direction and
PyTorch adds no passes of its own::

    forward   dt_t = softplus(delta_t + bias);  h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t   (D, N)
              y_t = (sum_n C_t h_t + D u_t) silu(z_t)                                   -> (B, L, D)
    backward  lambda_t = gy_t C_t + exp(dt_{t+1} A) lambda_{t+1}    (dLoss/dh_t)
              lamB_t = sum_n lambda_t B_t;  wA_t = sum_n A lambda_t a_t h_{t-1}
              dA = sum_{b,t} dt_t lambda_t a_t h_{t-1};  dB_t = sum_d lambda_t dt_t u_t;
              dC_t = sum_d gy_t h_t

Work is split into items (batch row, block of channels): each item owns its outputs, so the
result does not depend on how items are spread over threads. The backward recomputes the states
one segment at a time from the states that the forward saved at segment starts (gradient
checkpointing), so memory stays O(B L (D + N)) plus (B, L/seg, D, N).

``exp`` is :func:`exp_nonpos`, a Cephes-style polynomial (max relative error about 1.2e-7,
one ulp, over [-87, 0]) that the compiler can vectorise over the channels, where a call to the C
library's ``expf`` cannot be; its arguments ``dt * A`` are never positive, because dt >= 0 and
A = -exp(A_log) < 0. Below -87 it returns 0 (expf gives a denormal there). :func:`sigmoid` and
:func:`softplus` are built on it (softplus' log1p as an atanh series), within a few ulps of
PyTorch's (tests/test_mamba.py).
"""
from __future__ import annotations

import os

import numpy as np
import torch

try:
    import numba
    from numba import njit, prange, types
    from numba.extending import intrinsic
except ImportError:  # numba is a dependency; without it mamba.py keeps the pure-PyTorch scan
    numba = None

__all__ = ["available", "scan_forward", "scan_backward", "exp_nonpos", "sigmoid", "softplus"]

# fastmath without 'nnan'/'ninf': a diverging run must still produce NaN for the trainer to see.
# Every kernel also compiles with error_model="numpy": under numba's default ("python") each
# division checks for zero to raise ZeroDivisionError, and that branch alone kept the sigmoid and
# softplus loops from vectorising (5-9 ns an element instead of 1-1.5).
_FASTMATH = {"reassoc", "contract", "nsz", "arcp", "afn"}
# Per-item workspace of the backward (states and decays of one segment) kept near L2's size.
_SEGMENT_ELEMS = 2**15
_MIN_ITEMS = 16  # work items per call, whatever the thread count


def available() -> bool:
    """True when the compiled scan can run (numba importable, not switched off by ABAW_CPU_SCAN)."""
    return numba is not None and os.environ.get("ABAW_CPU_SCAN", "numba") != "torch"


if numba is not None:

    @intrinsic
    def _f32_from_bits(typingctx, bits):
        """Reinterpret an int32's bits as a float32 (how 2**k is built without a libm call)."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.float32))
        return types.float32(types.int32), codegen

    @njit(fastmath=_FASTMATH, inline="always", error_model="numpy", cache=True)
    def exp_nonpos(x):
        """exp(x) for float32 x <= 0 (Cephes expf: 2**k * p(r), |r| <= ln2/2), 0 below -87."""
        xc = max(x, np.float32(-87.0))
        k = -np.int32(np.float32(-xc * np.float32(1.44269504)) + np.float32(0.5))  # round(x/ln2)
        kf = np.float32(k)
        r = xc - kf * np.float32(0.693359375) + kf * np.float32(2.12194440e-4)  # Cody-Waite split ln2
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        p = p * r * r + r + np.float32(1.0)
        e = p * _f32_from_bits((k + np.int32(127)) << np.int32(23))
        return e if x >= np.float32(-87.0) else np.float32(0.0)

    @njit(fastmath=_FASTMATH, inline="always", error_model="numpy", cache=True)
    def sigmoid(x):
        """1 / (1 + exp(-x)), from exp of -|x| <= 0 only, so nothing overflows."""
        e = exp_nonpos(-abs(x))
        r = np.float32(1.0) / (np.float32(1.0) + e)
        return r if x >= 0 else e * r  # one division, then a select: the loops stay vectorised

    @njit(fastmath=_FASTMATH, inline="always", error_model="numpy", cache=True)
    def softplus(x):
        """log(1 + exp(x)) = max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1]. log1p(e) is
        2 atanh(s) = 2 (s + s^3/3 + ... + s^15/15), s = e / (2 + e) <= 1/3: the series' rest is
        below 2e-8 relative, and it has no cancellation for tiny e (where log1p(e) ~ e)."""
        e = exp_nonpos(-abs(x))
        s = e / (np.float32(2.0) + e)
        s2 = s * s
        q = np.float32(1.0 / 15.0)
        q = q * s2 + np.float32(1.0 / 13.0)
        q = q * s2 + np.float32(1.0 / 11.0)
        q = q * s2 + np.float32(1.0 / 9.0)
        q = q * s2 + np.float32(1.0 / 7.0)
        q = q * s2 + np.float32(1.0 / 5.0)
        q = q * s2 + np.float32(1.0 / 3.0)
        return max(x, np.float32(0.0)) + np.float32(2.0) * (s + s * s2 * q)

    @njit(inline="always", error_model="numpy", cache=True)
    def _block(At, d0, nd):
        """A contiguous copy of At[:, d0:d0 + nd]."""
        at = np.empty((At.shape[0], nd), dtype=np.float32)
        for n in range(At.shape[0]):
            for j in range(nd):
                at[n, j] = At[n, d0 + j]
        return at

    @njit(fastmath=_FASTMATH, inline="always", error_model="numpy", cache=True)
    def _load_dt(delta_t, bias, softplus_dt, dtv):
        """dtv[:] = softplus(delta_t + bias) (or delta_t + bias): this item's dt at one frame."""
        for j in range(dtv.shape[0]):
            v = delta_t[j] + bias[j]
            dtv[j] = softplus(v) if softplus_dt else v

    @njit(inline="always", error_model="numpy", cache=True)
    def _load(src, dst):
        """dst[:] = src. z is often a strided view into in_proj's output; a loop that reads it
        directly does not vectorise, so it is copied to a contiguous buffer first."""
        for j in range(dst.shape[0]):
            dst[j] = src[j]

    # Layout inside the kernels: channels innermost, (N, nd) per item, so that the inner loops run
    # over the item's nd channels (64..512) and vectorise; N (4..16) would be too short a loop.
    # Every (B, L, D) array is read through its item's row slice x[b, t, d0:d0 + nd], indexed by
    # j alone: x[b, t, d0 + j] compiles to per-lane loads, each with a check for a negative index,
    # because the compiler cannot prove d0 + j >= 0 (this made the backward 2.5x slower).
    @njit(fastmath=_FASTMATH, parallel=True, error_model="numpy", cache=True)
    def _forward_items(n_blocks, seg, u, delta, bias, softplus_dt, At, Bm, Cm, Dv, z, has_gate, y, h_saved):
        """All items: y = (sum_n C h + D u) * silu(z) (B, L, D), with dt = softplus(delta + bias);
        h_saved[b, s] = (N, D) state before segment s."""
        seqlen, dim = u.shape[1], u.shape[2]
        nst = At.shape[0]
        width = (dim + n_blocks - 1) // n_blocks
        for item in prange(u.shape[0] * n_blocks):
            b = item // n_blocks
            d0 = (item % n_blocks) * width
            nd = max(0, min(dim, d0 + width) - d0)
            at = _block(At, d0, nd)  # (N, nd)
            dv, bv = Dv[d0:d0 + nd], bias[d0:d0 + nd]
            h = np.zeros((nst, nd), dtype=np.float32)  # state of this item's channels
            dtv = np.empty(nd, dtype=np.float32)
            dtu = np.empty(nd, dtype=np.float32)
            acc = np.empty(nd, dtype=np.float32)
            zl = np.empty(nd, dtype=np.float32)
            for t in range(seqlen):
                if t % seg == 0:
                    h_saved[b, t // seg, :, d0:d0 + nd] = h
                ut = u[b, t, d0:d0 + nd]
                _load_dt(delta[b, t, d0:d0 + nd], bv, softplus_dt, dtv)
                for j in range(nd):
                    dtu[j] = dtv[j] * ut[j]
                    acc[j] = 0.0
                for n in range(nst):
                    bn = Bm[b, t, n]
                    cn = Cm[b, t, n]
                    for j in range(nd):
                        hv = exp_nonpos(dtv[j] * at[n, j]) * h[n, j] + dtu[j] * bn
                        h[n, j] = hv
                        acc[j] += hv * cn
                yt = y[b, t, d0:d0 + nd]
                if has_gate:
                    _load(z[b, t, d0:d0 + nd], zl)
                    for j in range(nd):
                        yt[j] = (acc[j] + dv[j] * ut[j]) * (zl[j] * sigmoid(zl[j]))
                else:
                    for j in range(nd):
                        yt[j] = acc[j] + dv[j] * ut[j]

    @njit(fastmath=_FASTMATH, parallel=True, error_model="numpy", cache=True)
    def _backward_items(n_blocks, seg, u, delta, bias, softplus_dt, At, Bm, Cm, Dv, z, has_gate, gout,
                        h_saved, grad_u, grad_delta, grad_z, grad_D, grad_bias, grad_A, grad_B, grad_C):
        """All items of the reverse scan, with the gate's, the D skip's and softplus' gradients.

        Writes grad_u, grad_delta and grad_z (B, L, D); per batch row the partial sums grad_D,
        grad_bias (B, D) and grad_A (B, N, D); per channel block grad_B, grad_C (n_blocks, B, L, N)."""
        seqlen, dim = u.shape[1], u.shape[2]
        nst = At.shape[0]
        width = (dim + n_blocks - 1) // n_blocks
        n_seg = (seqlen + seg - 1) // seg
        for item in prange(u.shape[0] * n_blocks):
            b = item // n_blocks
            blk = item % n_blocks
            d0 = blk * width
            nd = max(0, min(dim, d0 + width) - d0)
            at = _block(At, d0, nd)  # (N, nd)
            dv, bv = Dv[d0:d0 + nd], bias[d0:d0 + nd]
            dts = np.empty((seg, nd), dtype=np.float32)  # this segment's dt
            decay = np.empty((seg, nst, nd), dtype=np.float32)
            states = np.empty((seg + 1, nst, nd), dtype=np.float32)  # states[i + 1]: h at s0 + i
            nu = np.zeros((nst, nd), dtype=np.float32)  # a_{t+1} lambda_{t+1}; 0 after the end
            ga = np.zeros((nst, nd), dtype=np.float32)  # this item's share of grad_A
            gd = np.zeros(nd, dtype=np.float32)  # ... of grad_D
            gbias = np.zeros(nd, dtype=np.float32)  # ... of grad_bias
            dtu = np.empty(nd, dtype=np.float32)
            g = np.empty(nd, dtype=np.float32)
            sz = np.empty(nd, dtype=np.float32)  # sigmoid(z)
            zl = np.empty(nd, dtype=np.float32)
            acc_y = np.empty(nd, dtype=np.float32)  # sum_n C h: the gate's gradient needs it
            acc_lb = np.empty(nd, dtype=np.float32)
            acc_wa = np.empty(nd, dtype=np.float32)
            for s in range(n_seg - 1, -1, -1):
                s0 = s * seg
                s1 = min(seqlen, s0 + seg)
                states[0] = h_saved[b, s, :, d0:d0 + nd]
                for t in range(s0, s1):  # recompute this segment's dt, decays and states
                    i = t - s0
                    ut = u[b, t, d0:d0 + nd]
                    dtv = dts[i]
                    _load_dt(delta[b, t, d0:d0 + nd], bv, softplus_dt, dtv)
                    for n in range(nst):
                        bn = Bm[b, t, n]
                        for j in range(nd):
                            a = exp_nonpos(dtv[j] * at[n, j])
                            decay[i, n, j] = a
                            states[i + 1, n, j] = a * states[i, n, j] + dtv[j] * ut[j] * bn
                for t in range(s1 - 1, s0 - 1, -1):
                    i = t - s0
                    ut, got = u[b, t, d0:d0 + nd], gout[b, t, d0:d0 + nd]
                    dtv = dts[i]
                    zt = zl
                    if has_gate:
                        _load(z[b, t, d0:d0 + nd], zl)
                    for j in range(nd):
                        dtu[j] = dtv[j] * ut[j]
                        acc_y[j] = 0.0
                        acc_lb[j] = 0.0
                        acc_wa[j] = 0.0
                    if has_gate:  # gradient w.r.t. y + D u: through the gate silu(z) = z sigmoid(z)
                        for j in range(nd):
                            sz[j] = sigmoid(zt[j])
                            g[j] = got[j] * zt[j] * sz[j]
                    else:
                        for j in range(nd):
                            g[j] = got[j]
                    for n in range(nst):
                        bn = Bm[b, t, n]
                        cn = Cm[b, t, n]
                        sum_gh = np.float32(0.0)
                        sum_ldu = np.float32(0.0)
                        for j in range(nd):
                            hv = states[i + 1, n, j]
                            acc_y[j] += hv * cn
                            sum_gh += g[j] * hv
                            lam = g[j] * cn + nu[n, j]
                            sum_ldu += lam * dtu[j]
                            acc_lb[j] += lam * bn
                            a = decay[i, n, j]
                            w = lam * a * states[i, n, j]
                            acc_wa[j] += at[n, j] * w
                            ga[n, j] += dtv[j] * w
                            nu[n, j] = a * lam
                        grad_B[blk, b, t, n] = sum_ldu
                        grad_C[blk, b, t, n] = sum_gh
                    gu, gdt = grad_u[b, t, d0:d0 + nd], grad_delta[b, t, d0:d0 + nd]
                    if has_gate:  # d silu(z)/dz = sig * (1 + z * (1 - sig))
                        gz = grad_z[b, t, d0:d0 + nd]
                        for j in range(nd):
                            yv = acc_y[j] + dv[j] * ut[j]
                            gz[j] = got[j] * yv * sz[j] * (np.float32(1.0) + zt[j] * (np.float32(1.0) - sz[j]))
                    for j in range(nd):
                        gu[j] = dtv[j] * acc_lb[j] + g[j] * dv[j]
                        gd[j] += g[j] * ut[j]
                        gdt[j] = ut[j] * acc_lb[j] + acc_wa[j]  # dLoss/d dt = u sum_n lambda B + sum_n A w
                    if softplus_dt:  # softplus' = sigmoid
                        dt_raw = delta[b, t, d0:d0 + nd]
                        for j in range(nd):
                            gdt[j] *= sigmoid(dt_raw[j] + bv[j])
                    for j in range(nd):
                        gbias[j] += gdt[j]
            grad_A[b, :, d0:d0 + nd] = ga
            grad_D[b, d0:d0 + nd] = gd
            grad_bias[b, d0:d0 + nd] = gbias


def run_parallel(kernel, *args) -> None:
    """Run a kernel on torch's thread count, so that a Ray worker given 1 CPU stays on 1 thread.

    numba's OpenMP layer keeps its own thread pool: it loads the system's libgomp, torch the copy in
    its wheel. Measured on a training step: making them one library (LD_PRELOAD of the system's)
    was no faster, and numba's ``workqueue`` layer was 1.4x slower, so the OpenMP layer stays.
    """
    threads = torch.get_num_threads()
    if not _LAUNCHED:
        # numba starts its threading layer on first use; whatever that does to OpenMP's settings,
        # torch's thread count is put back (tests/test_mamba.py checks that it survives).
        numba.get_num_threads()
        torch.set_num_threads(threads)
        _LAUNCHED.append(True)
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    kernel(*args)


_LAUNCHED: list = []


def _n_blocks(bsz: int, dim: int) -> int:
    """Channel blocks per batch row: at least _MIN_ITEMS items, so that validation (B = 1) uses
    every thread, but never blocks under 8 channels. From the shapes only, never from the thread
    count: grad_B and grad_C are summed over blocks, and a run must give the same bits on 1 CPU
    (a Ray worker) as on 16."""
    return max(1, min(dim // 8, -(-_MIN_ITEMS // bsz)))


def segment_length(bsz: int, dim: int, nst: int, seqlen: int) -> int:
    """Frames per backward segment: a (seg, D/blocks, N) workspace of about 128 kB per item."""
    width = -(-dim // _n_blocks(bsz, dim))
    return max(8, min(seqlen, _SEGMENT_ELEMS // (width * nst)))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def scan_forward(u, delta, bias, softplus_dt: bool, A, Bm, Cm, D, z, seg: int):
    """y = (sum_n C h + D u) * silu(z) (B, L, D), dt = softplus(delta + bias) (or delta + bias),
    and the states before each segment (B, L/seg, N, D).

    u, delta, z (B, L, D), A (D, N), Bm, Cm (B, L, N), bias, D (D,): float32 CPU tensors, unit
    stride along the last dim (z may be a view into a wider tensor); z may be None (no gate).
    """
    bsz, seqlen, dim = u.shape
    n_blocks = _n_blocks(bsz, dim)
    y = torch.empty_like(u)
    h_saved = u.new_empty(bsz, -(-seqlen // seg), A.shape[1], dim)
    run_parallel(_forward_items, n_blocks, seg, _np(u), _np(delta), _np(bias), softplus_dt, _np(A.t().contiguous()),
                 _np(Bm), _np(Cm), _np(D), _np(u if z is None else z), z is not None, _np(y), _np(h_saved))
    return y, h_saved


def scan_backward(u, delta, bias, softplus_dt: bool, A, Bm, Cm, D, z, gout, h_saved, seg: int):
    """Gradients (u, delta, z, D, bias, A, B, C) of :func:`scan_forward`'s output for the upstream
    gradient gout (B, L, D); grad z is None when z is."""
    bsz, seqlen, dim = u.shape
    n_blocks = _n_blocks(bsz, dim)
    grad_u, grad_delta = torch.empty_like(u), torch.empty_like(delta)
    grad_z = torch.empty_like(u) if z is not None else None
    grad_D, grad_bias = u.new_empty(bsz, dim), u.new_empty(bsz, dim)
    grad_A = u.new_empty(bsz, A.shape[1], A.shape[0])  # (B, N, D)
    grad_B = u.new_empty(n_blocks, *Bm.shape)
    grad_C = u.new_empty(n_blocks, *Cm.shape)
    run_parallel(_backward_items, n_blocks, seg, _np(u), _np(delta), _np(bias), softplus_dt, _np(A.t().contiguous()),
                 _np(Bm), _np(Cm), _np(D), _np(u if z is None else z), z is not None, _np(gout), _np(h_saved),
                 _np(grad_u), _np(grad_delta), _np(u if grad_z is None else grad_z), _np(grad_D), _np(grad_bias),
                 _np(grad_A), _np(grad_B), _np(grad_C))
    return (grad_u, grad_delta, grad_z, grad_D.sum(0), grad_bias.sum(0), grad_A.sum(0).t(), grad_B.sum(0),
            grad_C.sum(0))
