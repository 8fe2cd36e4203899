"""Causal temporal convolutional network (TCN), shared by every TCN-based model here.

Bai, Kolter & Koltun, "An Empirical Evaluation of Generic Convolutional and Recurrent Networks
for Sequence Modeling", arXiv:1803.01271 (2018) -- the locuslab ``TemporalBlock`` design that all
three seed systems (Mamba-VA, MAE+TCN+Transformer, leader-follower) build on.

One block, for input (B, C_in, T):

    x ─ wn-conv(k, d) ─ act ─ drop ─ wn-conv(k, d) ─ act ─ drop ─┐
    └──────────── 1x1 conv if C_in != C_out, else identity ──────+─ act ─ (B, C_out, T)

Both convolutions are weight-normalised, dilated and causal: frame t only sees frames <= t.
Block i uses dilation 2**i, so a stack of n blocks with kernel k sees 1 + 2(k-1)(2**n - 1) frames.

Parameter count per block (matches the published code exactly): two weight-normalised convs
(v: C_out*C_in*k, g: C_out, bias: C_out), the optional 1x1 conv, plus one parameter per PReLU
(three per block; 0 for ReLU). The published counts pin the activation down: Mamba-VA and
MAE+TCN+Transformer use PReLU (+12 in 66,203,148 for 4 blocks, +9 in 7,689,097 for 3), the
leader-follower TCNs use ReLU (968,832 and 104,832 have no such remainder).

Deviations from the locuslab code, none of which changes the function or the parameter count:
- causal padding is applied on the left only (``F.pad``), instead of padding both sides and
  chomping the right; this skips computing the (k-1)*d frames that the chomp throws away.
- ``torch.nn.utils.parametrizations.weight_norm`` replaces the deprecated hook version.
- locuslab re-initialises ``conv.weight`` with N(0, 0.01) *after* weight_norm; with weight norm
  that write hits a derived tensor and is lost, so the published models effectively train from
  PyTorch's default initialisation. We keep the default initialisation and say so.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from abaw.models.act_dropout import prelu_dropout

ACTIVATIONS = {"relu": nn.ReLU, "prelu": nn.PReLU, "gelu": nn.GELU}


def make_activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


class _CausalConvCPU(torch.autograd.Function):
    """conv1d(pad_left(x), w, b) with a backward that is faster on the CPU than autograd's.

    oneDNN's input gradient of a dilated convolution took twice its forward's time (3.0 against
    1.5 ms at 16 x 64 x 300, dilation 2, on 2 cores). The input gradient of a causal convolution
    is itself a causal convolution run backwards in time: the output gradient padded on the right,
    convolved with the kernel flipped in time and transposed (in <-> out), which oneDNN runs at
    forward speed. The weight and bias gradients stay oneDNN's. Same math; sums in another order.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, dilation: int, left_pad: int):
        padded = F.pad(x, (left_pad, 0))  # (B, C_in, P + T)
        ctx.save_for_backward(padded, weight)
        ctx.dilation, ctx.left_pad, ctx.has_bias = dilation, left_pad, bias is not None
        return F.conv1d(padded, weight, bias, dilation=dilation)  # (B, C_out, T)

    @staticmethod
    def backward(ctx, grad_out):
        padded, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = None
        if ctx.needs_input_grad[0]:  # grad_x[t] = sum_k w[k]^T grad_out[t + (K-1-k) d]
            grad_x = F.conv1d(F.pad(grad_out, (0, ctx.left_pad)), weight.flip(-1).transpose(0, 1),
                              dilation=ctx.dilation)
        _, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, padded, weight, [weight.shape[0]] if ctx.has_bias else None, [1], [0], [ctx.dilation],
            False, [0], 1, [False, ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]])
        return grad_x, grad_w, grad_b, None, None


class CausalConv1d(nn.Module):
    """Weight-normalised dilated Conv1d, padded on the left so output t depends on inputs <= t."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, dilation: int):
        super().__init__()
        self.left_pad = (kernel_size - 1) * dilation
        self.dilation = dilation
        self.conv = weight_norm(nn.Conv1d(c_in, c_out, kernel_size, dilation=dilation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, T) -> (B, C_out, T)
        if (x.device.type == "cpu" and torch.is_grad_enabled() and x.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu")):
            return _CausalConvCPU.apply(x, self.conv.weight, self.conv.bias, self.dilation, self.left_pad)
        return self.conv(F.pad(x, (self.left_pad, 0)))


class TemporalBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel_size: int, dilation: int,
                 dropout: float, activation: str):
        super().__init__()
        self.conv1 = CausalConv1d(c_in, c_out, kernel_size, dilation)
        self.act1 = make_activation(activation)
        self.conv2 = CausalConv1d(c_out, c_out, kernel_size, dilation)
        self.act2 = make_activation(activation)
        self.dropout = nn.Dropout(dropout)
        # a 1x1 conv only where the residual must change width (as published; no weight norm)
        self.downsample = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else None
        self.act_out = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, T) -> (B, C_out, T)
        h = self._activate(self.act1, self.conv1(x), self.dropout.p)
        h = self._activate(self.act2, self.conv2(h), self.dropout.p)
        res = x if self.downsample is None else self.downsample(x)
        return self._activate(self.act_out, h + res, 0.0)

    def _activate(self, act: nn.Module, h: torch.Tensor, p: float) -> torch.Tensor:
        """dropout(act(h)); PReLU and ReLU as one fused CPU pass (abaw.models.act_dropout)."""
        if isinstance(act, (nn.PReLU, nn.ReLU)):
            return prelu_dropout(h, getattr(act, "weight", None), p, self.training)
        h = act(h)
        return self.dropout(h) if p > 0 else h


class TCN(nn.Module):
    """Stack of causal ``TemporalBlock``s with dilations 1, 2, 4, ...

    Works on channels-last sequences: (B, T, input_dim) -> (B, T, channels[-1]).
    """

    causal = True

    def __init__(self, input_dim: int, channels: Sequence[int], kernel_size: int,
                 dropout: float = 0.1, activation: str = "prelu"):
        super().__init__()
        if not channels:
            raise ValueError("TCN needs at least one block (channels is empty)")
        widths = [input_dim, *channels]
        self.blocks = nn.Sequential(*[
            TemporalBlock(widths[i], widths[i + 1], kernel_size, 2 ** i, dropout, activation)
            for i in range(len(channels))
        ])
        self.out_dim = channels[-1]
        self.receptive_field = 1 + 2 * (kernel_size - 1) * (2 ** len(channels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, C)
        return self.blocks(x.transpose(1, 2)).transpose(1, 2)
