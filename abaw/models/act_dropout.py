"""PReLU (or ReLU) followed by dropout, fused into one compiled CPU pass (numba), as the TCN uses them.

Why: on the CPU, ``nn.Dropout`` draws its mask with ``bernoulli_``, one element at a time
(3.3 ms for a 16 x 64 x 300 batch here), and PReLU's backward reduces its weight's gradient in a
separate slow pass; together they were about a fifth of a demo-size Mamba-VA step. Here one
parallel loop computes ``prelu(x) * mask / (1 - p)`` and one computes both gradients.

The dropout mask comes from a counter-based generator: one ``splitmix64(seed + (g + 1) * golden)``
draw serves the four elements ``4g .. 4g + 3``, 16 bits each, and an element is kept when its 16
bits are >= round(p * 2**16). So the mask is the same whatever the number of threads, and the
backward recomputes it from the seed instead of storing it. (One 64-bit hash per element took most
of the forward's time: AVX2 has no 64-bit multiply. The drop rate is p rounded to a multiple of
2**-16.) The seed is drawn from torch's default generator, so ``torch.manual_seed`` still makes
runs repeatable.
Deviation, stated: the masks differ from those ``nn.Dropout`` would draw (another random
stream, same Bernoulli(1 - p) law), so a training run is not bit-equal to one with ``nn.Dropout``.

Other devices, dtypes, per-channel PReLU weights and the GELU activation use the PyTorch modules.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from abaw.models import scan_cpu

try:
    from numba import njit, prange, uint64
except ImportError:  # without numba the PyTorch modules run
    njit = None

__all__ = ["prelu_dropout", "fused_available"]

_CHUNK = 16384  # elements per parallel work item (and per partial sum of the weight gradient)


def fused_available(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """The fused pass serves float32 CPU tensors with a single PReLU weight (or ReLU)."""
    return (njit is not None and scan_cpu.available() and x.device.type == "cpu"
            and x.dtype == torch.float32 and (weight is None or weight.numel() == 1))


if njit is not None:

    @njit(error_model="numpy", cache=True)
    def _draws(seed, c, bits):
        """bits (_CHUNK,) uint16 <- the 16-bit draws of chunk c's elements. Group g (over the whole
        tensor) is splitmix64 of the counter g + 1; its 64 bits, read as four uint16 (x86 is
        little-endian), are the draws of elements 4g .. 4g + 3."""
        words = bits.view(np.uint64)  # _CHUNK // 4 words
        first = uint64(c * (_CHUNK // 4))
        for j in range(words.size):
            z = seed + (first + uint64(j + 1)) * uint64(0x9E3779B97F4A7C15)
            z = (z ^ (z >> uint64(30))) * uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> uint64(27))) * uint64(0x94D049BB133111EB)
            words[j] = z ^ (z >> uint64(31))

    @njit(parallel=True, fastmath={"contract"}, error_model="numpy", cache=True)
    def _forward(x, out, slope, seed, threshold, scale, use_mask):
        n = x.size
        for c in prange((n + _CHUNK - 1) // _CHUNK):
            bits = np.empty(_CHUNK, dtype=np.uint16)
            if use_mask:
                _draws(seed, c, bits)
            base = c * _CHUNK
            for i in range(base, min(n, base + _CHUNK)):
                v = x[i]
                y = v if v > 0 else slope * v
                if use_mask:  # a select, not a jump, so it vectorises
                    y = y * (scale if bits[i - base] >= threshold else np.float32(0.0))
                out[i] = y

    @njit(parallel=True, fastmath={"contract", "reassoc"}, error_model="numpy", cache=True)
    def _backward(x, g, grad_x, grad_w_parts, slope, seed, threshold, scale, use_mask):
        n = x.size
        for c in prange((n + _CHUNK - 1) // _CHUNK):
            bits = np.empty(_CHUNK, dtype=np.uint16)
            if use_mask:
                _draws(seed, c, bits)
            base = c * _CHUNK
            acc = np.float32(0.0)
            for i in range(base, min(n, base + _CHUNK)):  # branch-free, so it vectorises
                gi = g[i]
                if use_mask:
                    gi = gi * (scale if bits[i - base] >= threshold else np.float32(0.0))
                v = x[i]
                grad_x[i] = gi if v > 0 else gi * slope
                acc += np.float32(0.0) if v > 0 else gi * v
            grad_w_parts[c] = acc


class _PReLUDropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, p):
        x = x.contiguous()
        slope = np.float32(0.0 if weight is None else weight.item())
        seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
        threshold = np.uint16(min(round(p * 2**16), 2**16 - 1))
        scale = np.float32(1.0 / (1.0 - p) if p < 1 else 0.0)
        out = torch.empty_like(x)
        scan_cpu.run_parallel(_forward, x.detach().view(-1).numpy(), out.view(-1).numpy(), slope,
                              np.uint64(seed), threshold, scale, p > 0)
        ctx.save_for_backward(x, weight)
        ctx.params = (slope, np.uint64(seed), threshold, scale, p > 0)
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g = g.contiguous()
        grad_x = torch.empty_like(x)
        parts = x.new_empty(-(-x.numel() // _CHUNK))
        scan_cpu.run_parallel(_backward, x.detach().view(-1).numpy(), g.detach().view(-1).numpy(), grad_x.view(-1).numpy(),
                              parts.numpy(), *ctx.params)
        grad_w = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = parts.sum().reshape(weight.shape).to(weight.dtype)
        return grad_x, grad_w, None


def prelu_dropout(x: torch.Tensor, weight: torch.Tensor | None, p: float, training: bool) -> torch.Tensor:
    """dropout(prelu(x, weight)) (weight None: ReLU); dropout only when training and p > 0."""
    p = float(p) if training else 0.0
    if fused_available(x, weight):
        return _PReLUDropoutFn.apply(x, weight, p)
    y = F.relu(x) if weight is None else F.prelu(x, weight)
    return F.dropout(y, p, training=True) if p > 0 else y
