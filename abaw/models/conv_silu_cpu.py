"""Mamba's depthwise causal convolution + SiLU as one compiled CPU pass (numba), in (B, L, D) layout.

    pre[b, t, d] = bias[d] + sum_k w[d, k] x[b, t - K + 1 + k, d]      (x = 0 before the start)
    out          = silu(pre) = pre * sigmoid(pre)

Why: ``nn.Conv1d(groups=D)`` wants (B, D, L), so the PyTorch path transposes in and out, and
oneDNN's depthwise backward is slow on the CPU; with the SiLU's own passes this was about a tenth
of a demo-size Mamba-VA step. The same math as ``F.silu(conv1d(x.transpose(1, 2))[..., :L])``;
only the order of the K-term sums may differ in rounding. float32 CPU tensors only; mamba.py uses
the PyTorch modules otherwise.
"""
from __future__ import annotations

import numpy as np
import torch

from abaw.models import scan_cpu

try:
    from numba import njit, prange
except ImportError:
    njit = None

__all__ = ["fused_available", "conv_silu"]

_FASTMATH = {"reassoc", "contract", "nsz", "arcp", "afn"}
_FRAMES = 64  # frames per forward work item


def fused_available(x: torch.Tensor) -> bool:
    return njit is not None and scan_cpu.available() and x.device.type == "cpu" and x.dtype == torch.float32


if njit is not None:
    _sigmoid = scan_cpu.sigmoid

    @njit(fastmath=_FASTMATH, inline="always", error_model="numpy", cache=True)
    def _pre(x, wt, bias, b, t, acc):
        """acc[:] = pre[b, t, :] (loops over d innermost, so they vectorise)."""
        width, dim = wt.shape
        for d in range(dim):
            acc[d] = bias[d]
        for k in range(max(0, width - 1 - t), width):
            s = t - width + 1 + k
            for d in range(dim):
                acc[d] += wt[k, d] * x[b, s, d]

    @njit(fastmath=_FASTMATH, parallel=True, error_model="numpy", cache=True)
    def _forward(x, wt, bias, out):
        bsz, seqlen, dim = x.shape
        n_blocks = (seqlen + _FRAMES - 1) // _FRAMES
        for item in prange(bsz * n_blocks):  # frames are independent: blocks of frames
            b = item // n_blocks
            t0 = (item % n_blocks) * _FRAMES
            acc = np.empty(dim, dtype=np.float32)
            for t in range(t0, min(seqlen, t0 + _FRAMES)):
                _pre(x, wt, bias, b, t, acc)
                for d in range(dim):
                    out[b, t, d] = acc[d] * _sigmoid(acc[d])

    @njit(fastmath=_FASTMATH, parallel=True, error_model="numpy", cache=True)
    def _backward(x, wt, bias, g, grad_pre, grad_x, grad_w, grad_b):
        """grad_w (B, K, D), grad_b (B, D): partial sums per batch row."""
        bsz, seqlen, dim = x.shape
        width = wt.shape[0]
        for b in prange(bsz):
            acc = np.empty(dim, dtype=np.float32)
            grad_w[b] = 0.0
            grad_b[b] = 0.0
            for t in range(seqlen):
                _pre(x, wt, bias, b, t, acc)
                for d in range(dim):
                    p = acc[d]
                    sg = _sigmoid(p)
                    gp = g[b, t, d] * sg * (np.float32(1.0) + p * (np.float32(1.0) - sg))
                    grad_pre[b, t, d] = gp
                    grad_b[b, d] += gp
                for k in range(max(0, width - 1 - t), width):
                    src = t - width + 1 + k
                    for d in range(dim):
                        grad_w[b, k, d] += grad_pre[b, t, d] * x[b, src, d]
            for t in range(seqlen):
                for d in range(dim):
                    acc[d] = 0.0
                for k in range(max(0, t + width - seqlen), width):
                    dst = t + width - 1 - k  # the output frame where x[t] met w[k]
                    for d in range(dim):
                        acc[d] += wt[k, d] * grad_pre[b, dst, d]
                grad_x[b, t, :] = acc


class _ConvSiLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x = x.contiguous()  # (B, L, D); x is a strided view of in_proj's output
        wt = weight.detach().reshape(weight.shape[0], -1).t().contiguous()  # (K, D)
        b = bias.detach() if bias is not None else x.new_zeros(x.shape[-1])
        out = torch.empty_like(x)
        scan_cpu.run_parallel(_forward, x.detach().numpy(), wt.numpy(), b.numpy(), out.numpy())
        ctx.save_for_backward(x, weight, bias)
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, bias = ctx.saved_tensors
        g = g.contiguous().float()
        bsz, _, dim = x.shape
        wt = weight.detach().reshape(dim, -1).t().contiguous()
        b = bias.detach() if bias is not None else x.new_zeros(dim)
        grad_pre, grad_x = torch.empty_like(x), torch.empty_like(x)
        grad_w, grad_b = x.new_empty(bsz, *wt.shape), x.new_empty(bsz, dim)
        scan_cpu.run_parallel(_backward, x.detach().numpy(), wt.numpy(), b.numpy(), g.numpy(),
                              grad_pre.numpy(), grad_x.numpy(), grad_w.numpy(), grad_b.numpy())
        grad_weight = grad_w.sum(0).t().reshape(weight.shape)
        return grad_x, grad_weight, (grad_b.sum(0) if bias is not None else None)


def conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """silu(causal depthwise conv(x)); x (B, L, D), weight (D, 1, K) as nn.Conv1d stores it."""
    return _ConvSiLUFn.apply(x, weight, bias)
