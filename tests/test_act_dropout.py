"""Tests for abaw.models.act_dropout: the fused PReLU/ReLU + dropout pass of the TCN."""
import pytest
import torch
import torch.nn.functional as F

from abaw.models.act_dropout import fused_available, prelu_dropout


def inputs(shape=(4, 8, 50), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).requires_grad_()
    w = torch.tensor([0.25]).requires_grad_()
    return x, w


@pytest.mark.parametrize("relu", [False, True])
def test_without_dropout_equals_torch(relu):
    x, w = inputs()
    assert fused_available(x, w)
    weight = None if relu else w
    out = prelu_dropout(x, weight, 0.3, training=False)  # eval: no dropout
    ref = F.relu(x) if relu else F.prelu(x, w)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    wrt = [x] if relu else [x, w]
    for a, b in zip(torch.autograd.grad(out, wrt, g), torch.autograd.grad(ref, wrt, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dropout_mask_forward_and_backward_agree():
    """The backward regenerates the mask from the seed: its gradients must be those of the
    forward's own mask (recovered from the zeros of the output)."""
    x, w = inputs((3, 16, 400))
    p = 0.2
    torch.manual_seed(1)
    out = prelu_dropout(x, w, p, training=True)
    kept = out != 0
    ref = F.prelu(x, w) * kept / (1 - p)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [x, w], g), torch.autograd.grad(ref, [x, w], g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dropout_rate_seed_and_threads():
    x = torch.randn(1_000_000)
    torch.manual_seed(7)
    a = prelu_dropout(x, None, 0.3, training=True)
    drop = ((a == 0) & (x > 0)).sum().item() / (x > 0).sum().item()
    assert abs(drop - 0.3) < 0.005  # a Bernoulli(0.3) mask: 500k draws put this within ~0.002
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(7)
        b = prelu_dropout(x, None, 0.3, training=True)  # same seed, one thread: same mask
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a, b)
    c = prelu_dropout(x, None, 0.3, training=True)  # the generator moved on: another mask
    assert not torch.equal(a, c)


def test_other_inputs_use_torch_modules():
    x, w = inputs()
    per_channel = torch.full((8,), 0.25, requires_grad=True)
    assert not fused_available(x.double(), w) and not fused_available(x, per_channel)
    out = prelu_dropout(x, per_channel, 0.5, training=False)
    assert torch.equal(out, F.prelu(x, per_channel))


def test_dropout_draws_of_neighbours_are_independent():
    """One 64-bit draw serves four neighbours (16 bits each): their drops must still be
    independent, and the rate right in every lane of the four."""
    x = torch.rand(1_200_001) + 0.1  # positive, so a zero means dropped; not a multiple of 4
    torch.manual_seed(3)
    dropped = prelu_dropout(x, None, 0.25, training=True) == 0
    lanes = dropped[: dropped.numel() // 4 * 4].view(-1, 4).float()
    for lane in range(4):
        assert abs(lanes[:, lane].mean().item() - 0.25) < 0.006
    for a, b in ((0, 1), (1, 2), (2, 3), (0, 3)):  # both dropped: p**2 if independent
        assert abs((lanes[:, a] * lanes[:, b]).mean().item() - 0.0625) < 0.004
    assert abs(dropped[-1000:].float().mean().item() - 0.25) < 0.08  # the last chunk, a partial one
