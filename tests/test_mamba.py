"""Tests for abaw.models.mamba: chunked selective scan, mamba-ssm compatibility, causality."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from abaw.models import mamba as mamba_mod
from abaw.models import scan_cpu
from abaw.models.mamba import Mamba, selective_scan, selective_scan_sequential

TOL = 1e-4


@pytest.fixture(params=["compiled", "torch"])
def scan_impl(request, monkeypatch):
    """Runs a test on both CPU scans: the compiled loops (scan_cpu) and the PyTorch chunked scan."""
    if request.param == "torch":
        monkeypatch.setenv("ABAW_CPU_SCAN", "torch")
    else:
        monkeypatch.delenv("ABAW_CPU_SCAN", raising=False)
        assert scan_cpu.available(), "numba is a dependency: the compiled scan must be importable"
    return request.param


def autograd_nodes(out):
    """Names of every autograd node behind ``out``."""
    names, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            stack.extend(f for f, _ in node.next_functions)
    return names


SCAN_NODE = {"compiled": "_CompiledScanFnBackward", "torch": "_ChunkedScanFnBackward"}


def assert_close_scaled(actual, expected, tol=TOL, name=""):
    """max |actual - expected| <= tol * max(1, max |expected|)  (float32 vs float32)."""
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{name}: max abs err {err:.3g} > {tol} * {scale:.3g}"


def make_scan_inputs(batch, dim, nstate, seqlen, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, seqlen, generator=g)
    # raw dt: mostly moderate, plus large values (softplus(dt) up to ~20, i.e. a per-step
    # log-decay dt*A down to ~-160, which overflows a naive exp(-cumsum) factorisation) and
    # very negative ones (dt ~ 1e-9)
    delta = torch.randn(batch, dim, seqlen, generator=g) * 3.0
    delta.view(-1)[::7] = 20.0
    delta.view(-1)[3::11] = -20.0
    A = -torch.exp(torch.randn(dim, nstate, generator=g))  # (D, N), A < 0
    A[0, 0] = -8.0
    B = torch.randn(batch, nstate, seqlen, generator=g)
    C = torch.randn(batch, nstate, seqlen, generator=g)
    D = torch.randn(dim, generator=g)
    z = torch.randn(batch, dim, seqlen, generator=g)
    delta_bias = torch.randn(dim, generator=g) * 0.5
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, z, delta_bias)]


# chunk 8 / segment 16: L=5 (< chunk), 8 (= chunk), 13 and 45 (not a multiple of the chunk,
# 45 spans several segments), 64 (multiple of the segment)
@pytest.mark.parametrize("seqlen", [1, 5, 8, 13, 45, 64])
@pytest.mark.parametrize("full", [True, False], ids=["D_z_bias_softplus", "bare"])
def test_chunked_scan_matches_sequential(seqlen, full, scan_impl):
    u, delta, A, B, C, D, z, delta_bias = inputs = make_scan_inputs(2, 6, 4, seqlen)
    if full:
        kwargs = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=True)
        grad_inputs = inputs
    else:
        delta = F.softplus(delta.detach()).requires_grad_()  # the scan needs delta >= 0
        kwargs = {}
        grad_inputs = [u, delta, A, B, C]
    ref = selective_scan_sequential(u, delta, A, B, C, **kwargs)
    out = selective_scan(u, delta, A, B, C, chunk_size=8, segment_len=16, **kwargs)
    assert SCAN_NODE[scan_impl] in autograd_nodes(out)
    assert out.shape == ref.shape == u.shape
    assert torch.isfinite(out).all()
    assert_close_scaled(out, ref, name="y")

    gy = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, grad_inputs, gy)
    g_out = torch.autograd.grad(out, grad_inputs, gy)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    for name, a, b in zip(names, g_out, g_ref):
        assert torch.isfinite(a).all(), name
        assert_close_scaled(a, b, name=f"grad {name}")


@pytest.mark.parametrize("chunk,segment", [(1, 1), (4, 4), (16, 64), (64, 64)])
def test_chunked_scan_chunk_sizes(chunk, segment, scan_impl):
    inputs = make_scan_inputs(1, 3, 2, 50, seed=1)
    u, delta, A, B, C, D, z, delta_bias = inputs
    kwargs = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=True)
    ref = selective_scan_sequential(u, delta, A, B, C, **kwargs)
    out = selective_scan(u, delta, A, B, C, chunk_size=chunk, segment_len=segment, **kwargs)
    assert_close_scaled(out, ref, name="y")
    g_ref = torch.autograd.grad(ref.sum(), inputs)
    g_out = torch.autograd.grad(out.sum(), inputs)
    for a, b in zip(g_out, g_ref):
        assert_close_scaled(a, b)


def test_chunked_scan_gradcheck_float64():
    """Analytic backward vs finite differences (float64 is computed in float64)."""
    inputs = [t.detach().double().requires_grad_() for t in make_scan_inputs(1, 2, 3, 7, seed=2)]
    inputs[1] = (inputs[1].detach() * 0.3).requires_grad_()  # keep softplus' curvature moderate

    def f(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                              delta_softplus=True, chunk_size=2, segment_len=4)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_scan_does_not_save_state_tensor(scan_impl):
    """The custom Function keeps neither the (B, L, D, N) states nor anything that large."""
    batch, dim, nstate, seqlen = 2, 8, 16, 96
    inputs = make_scan_inputs(batch, dim, nstate, seqlen)
    u, delta, A, B, C, D, z, delta_bias = inputs
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                             delta_softplus=True, chunk_size=8, segment_len=16)
    out.sum().backward()
    # largest saved tensors are the (B, L, D) / (B, L, N) inputs, far below B*L*D*N
    assert max(sizes) <= batch * seqlen * max(dim, nstate)


def test_compiled_scan_single_row_same_bits_at_any_thread_count():
    """Validation runs one video (B = 1): its channels are split into (uneven) blocks. The result
    is right, and bit-equal at 1 and 3 threads (a Ray worker with 1 CPU must match a 2-core run)."""
    inputs = make_scan_inputs(1, 21, 3, 70, seed=4)
    u, delta, A, B, C, D, z, delta_bias = inputs
    kwargs = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=True)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            out = selective_scan(u, delta, A, B, C, segment_len=16, **kwargs)
            runs.append((out, torch.autograd.grad(out.sum(), inputs)))
    finally:
        torch.set_num_threads(before)
    assert "_CompiledScanFnBackward" in autograd_nodes(runs[0][0])
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    ref = selective_scan_sequential(u, delta, A, B, C, **kwargs)
    assert_close_scaled(runs[0][0], ref, name="y")
    for name, a, b in zip("u delta A B C D z bias".split(), runs[0][1], torch.autograd.grad(ref.sum(), inputs)):
        assert_close_scaled(a, b, name=f"grad {name}")


def test_compiled_scan_exp_matches_libm():
    """The polynomial exp of the compiled loops: within 2 float32 ulps of exp, 0 below -87."""
    x = torch.cat([-torch.logspace(-8, 2, 4000, dtype=torch.float64), torch.tensor([0.0, -87.0, -87.5, -1e4])])
    x32 = x.float()
    got = torch.tensor([float(scan_cpu.exp_nonpos(v)) for v in x32.numpy()], dtype=torch.float64)
    want = torch.exp(x32.double())
    normal = x32 >= -87.0
    assert ((got - want).abs() <= 2.4e-7 * want)[normal].all()
    assert (got[~normal] == 0).all()


def test_compiled_scan_softplus_and_sigmoid_match_torch():
    """The loops' own softplus (dt) and sigmoid (gate, softplus'), over the range dt and z take:
    within a few float32 ulps of PyTorch's, and finite at the extremes."""
    x = torch.cat([torch.linspace(-100, 100, 20001), torch.tensor([0.0, 20.0, -20.0, 88.0, -88.0, 1e4, -1e4])])
    for mine, theirs in ((scan_cpu.softplus, F.softplus), (scan_cpu.sigmoid, torch.sigmoid)):
        got = torch.tensor([float(mine(v)) for v in x.numpy()], dtype=torch.float64)
        want = theirs(x.double())
        assert torch.isfinite(got).all()
        assert ((got - want).abs() <= 5e-7 * want.abs() + 1e-30).all(), mine.__name__


def test_compiled_scan_keeps_torch_thread_count():
    """numba's threading layer resets OpenMP's thread count when it starts; torch's must survive
    it (a Ray worker given 1 CPU sets 1 thread)."""
    code = ("import torch; torch.set_num_threads(1); from abaw.models.mamba import selective_scan; "
            "t = [torch.randn(1, 4, 9) for _ in range(2)] + [-torch.rand(4, 3)] + [torch.randn(1, 3, 9) for _ in range(2)]; "
            "selective_scan(*t); print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1"]


def reference_block_forward(m: Mamba, hidden_states):
    """mamba_ssm's Mamba.forward slow path (no kernels), written from the paper/reference."""
    batch, seqlen, _ = hidden_states.shape
    xz = (m.in_proj.weight @ hidden_states.reshape(-1, m.d_model).t())  # (2*Din, B*L)
    xz = xz.reshape(-1, batch, seqlen).transpose(0, 1)  # (B, 2*Din, L)
    A = -torch.exp(m.A_log.float())
    x, z = xz.chunk(2, dim=1)
    x = F.silu(m.conv1d(x)[..., :seqlen])
    x_dbl = m.x_proj(x.transpose(1, 2).reshape(batch * seqlen, -1))
    dt, B, C = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = (m.dt_proj.weight @ dt.t()).reshape(-1, batch, seqlen).transpose(0, 1)
    B = B.reshape(batch, seqlen, -1).transpose(1, 2)
    C = C.reshape(batch, seqlen, -1).transpose(1, 2)
    y = selective_scan_sequential(x, dt, A, B, C, m.D.float(), z=z,
                                  delta_bias=m.dt_proj.bias.float(), delta_softplus=True)
    return m.out_proj(y.transpose(1, 2))


@pytest.mark.parametrize("seqlen", [3, 29])
def test_block_matches_reference(seqlen, scan_impl):
    torch.manual_seed(0)
    m = Mamba(16, d_state=4, d_conv=4, expand=2)
    m.chunk_size, m.segment_len = 4, 8
    with torch.no_grad():  # make the dynamics less trivial than the init
        m.dt_proj.bias.add_(torch.randn_like(m.dt_proj.bias))
        m.A_log.add_(torch.randn_like(m.A_log) * 0.5)
    x = torch.randn(2, seqlen, 16, requires_grad=True)
    out = m(x)
    ref = reference_block_forward(m, x)
    assert out.shape == x.shape
    assert_close_scaled(out, ref, name="out")
    gy = torch.randn_like(out)
    params = [x] + list(m.parameters())
    names = ["input"] + [n for n, _ in m.named_parameters()]
    g_out = torch.autograd.grad(out, params, gy)
    g_ref = torch.autograd.grad(ref, params, gy)
    for name, a, b in zip(names, g_out, g_ref):
        assert_close_scaled(a, b, name=f"grad {name}")


def test_block_is_causal(scan_impl):
    torch.manual_seed(0)
    m = Mamba(16, d_state=4, expand=2)
    m.chunk_size, m.segment_len = 4, 8  # cross chunk and segment boundaries
    x = torch.randn(2, 40, 16)
    t0 = 21
    y = m(x)
    x2 = x.clone()
    x2[:, t0:] += torch.randn_like(x2[:, t0:]) * 10
    y2 = m(x2)
    assert torch.equal(y[:, :t0], y2[:, :t0])  # bit-identical before the change
    assert (y[:, t0:] - y2[:, t0:]).abs().amax(dim=(0, 2)).min() > 0  # later frames react
    # gradient of the output at t wrt inputs after t is exactly zero
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(m(xg)[:, t0].sum(), xg)
    assert torch.all(g[:, t0 + 1:] == 0)
    assert g[:, t0].abs().sum() > 0


# Published names/shapes of mamba_ssm.modules.mamba_simple.Mamba parameters, written out
# independently of the implementation: d_inner = expand*d_model, dt_rank = ceil(d_model/16).
def mamba_ssm_state_dict_shapes(d_model, d_state, d_conv, expand, bias=False, conv_bias=True):
    d_inner = expand * d_model
    dt_rank = math.ceil(d_model / 16)
    shapes = {
        "A_log": (d_inner, d_state),
        "D": (d_inner,),
        "in_proj.weight": (2 * d_inner, d_model),
        "conv1d.weight": (d_inner, 1, d_conv),
        "x_proj.weight": (dt_rank + 2 * d_state, d_inner),
        "dt_proj.weight": (d_inner, dt_rank),
        "dt_proj.bias": (d_inner,),
        "out_proj.weight": (d_model, d_inner),
    }
    if conv_bias:
        shapes["conv1d.bias"] = (d_inner,)
    if bias:
        shapes["in_proj.bias"] = (2 * d_inner,)
        shapes["out_proj.bias"] = (d_model,)
    return shapes


def test_state_dict_compatible_with_mamba_ssm():
    expected = mamba_ssm_state_dict_shapes(256, 8, 4, 1)
    assert expected["in_proj.weight"] == (512, 256)
    assert expected["x_proj.weight"] == (32, 256)
    assert expected["dt_proj.weight"] == (256, 16)
    foreign = {k: torch.randn(shape) for k, shape in expected.items()}  # "saved by mamba_ssm"

    m = Mamba(256, d_state=8, d_conv=4, expand=1)
    assert sum(p.numel() for p in m.parameters()) == 212_736
    assert sum(math.prod(s) for s in expected.values()) == 212_736
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    result = m.load_state_dict(foreign, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in m.state_dict().items():
        assert torch.equal(v, foreign[k]), k


def test_state_dict_keys_with_bias():
    m = Mamba(32, d_state=4, d_conv=3, expand=2, bias=True, conv_bias=False)
    expected = mamba_ssm_state_dict_shapes(32, 4, 3, 2, bias=True, conv_bias=False)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected


def test_initialisation_matches_mamba_ssm():
    torch.manual_seed(0)
    d_model, d_state, dt_min, dt_max = 64, 16, 1e-3, 1e-1
    m = Mamba(d_model, d_state=d_state, dt_min=dt_min, dt_max=dt_max)
    d_inner, dt_rank = 2 * d_model, 4
    assert (m.d_inner, m.dt_rank) == (d_inner, dt_rank)
    a_s4d = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
    assert m.A_log.dtype == torch.float32 and torch.equal(m.A_log.data, torch.log(a_s4d))
    assert torch.equal(m.D.data, torch.ones(d_inner))
    assert m.A_log._no_weight_decay and m.D._no_weight_decay and m.dt_proj.bias._no_reinit
    bound = dt_rank**-0.5
    assert m.dt_proj.weight.abs().max() <= bound
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= dt_min * 0.999 and dt.max() <= dt_max * 1.001
    assert m.in_proj.bias is None and m.out_proj.bias is None and m.conv1d.bias is not None
    mc = Mamba(d_model, dt_init="constant", dt_scale=2.0)
    assert torch.allclose(mc.dt_proj.weight, torch.full_like(mc.dt_proj.weight, 2 * bound))
    with pytest.raises(NotImplementedError):
        Mamba(d_model, dt_init="bogus")


def test_bf16_autocast_cpu(scan_impl):
    torch.manual_seed(0)
    m = Mamba(32, d_state=4)
    x = torch.randn(2, 20, 32, requires_grad=True)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


# CPU stand-ins with the signatures/semantics of mamba-ssm's and causal-conv1d's reference
# functions (selective_scan_ref, mamba_inner_ref, causal_conv1d_ref), used to check how the
# CUDA code paths call the kernels (argument order, layouts) on machines without CUDA.
def fake_causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None,
                          return_final_states=False, final_states_out=None, activation=None):
    assert weight.dim() == 2 and x.dim() == 3  # (D, W), (B, D, L)
    width, seqlen = weight.shape[1], x.shape[-1]
    out = F.conv1d(x, weight[:, None, :], bias, padding=width - 1, groups=x.shape[1])
    out = out[..., :seqlen]
    return F.silu(out) if activation in ("silu", "swish") else out


def fake_selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False, return_last_state=False):
    assert not return_last_state
    assert u.shape == delta.shape and B.shape == C.shape and B.shape[1] == A.shape[1]
    return selective_scan_sequential(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                     delta_softplus=delta_softplus)


def fake_mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                        out_proj_weight, out_proj_bias, A, B=None, C=None, D=None,
                        delta_bias=None, B_proj_bias=None, C_proj_bias=None,
                        delta_softplus=True):
    seqlen = xz.shape[-1]
    delta_rank = delta_proj_weight.shape[1]
    d_state = A.shape[-1]
    x, z = xz.chunk(2, dim=1)
    x = fake_causal_conv1d_fn(x, conv1d_weight.squeeze(1), conv1d_bias, activation="silu")
    x_dbl = F.linear(x.transpose(1, 2).reshape(-1, x.shape[1]), x_proj_weight)  # (BL, .)
    delta = delta_proj_weight @ x_dbl[:, :delta_rank].t()
    delta = delta.reshape(delta.shape[0], -1, seqlen).transpose(0, 1)
    assert B is None and C is None  # variable B/C, as mamba_simple.Mamba passes
    B = x_dbl[:, delta_rank:delta_rank + d_state].reshape(-1, seqlen, d_state).transpose(1, 2)
    C = x_dbl[:, -d_state:].reshape(-1, seqlen, d_state).transpose(1, 2)
    y = fake_selective_scan_fn(x, delta, A, B, C, D, z=z, delta_bias=delta_bias,
                               delta_softplus=delta_softplus)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


@pytest.mark.parametrize("bias", [False, True])
def test_kernel_code_paths_with_reference_fakes(monkeypatch, bias):
    monkeypatch.setattr(mamba_mod, "mamba_inner_fn", fake_mamba_inner_fn)
    monkeypatch.setattr(mamba_mod, "selective_scan_fn", fake_selective_scan_fn)
    monkeypatch.setattr(mamba_mod, "causal_conv1d_fn", fake_causal_conv1d_fn)
    torch.manual_seed(0)
    m = Mamba(16, d_state=4, expand=2, bias=bias)
    x = torch.randn(2, 11, 16, requires_grad=True)
    ref = m._forward_torch(x)
    assert_close_scaled(m(x), ref, name="cpu dispatch")  # CPU input: pure-PyTorch path
    assert_close_scaled(m._forward_fused(x), ref, name="fused path")
    assert_close_scaled(m._forward_cuda_unfused(x), ref, name="unfused kernel path")
    monkeypatch.setattr(mamba_mod, "causal_conv1d_fn", None)
    assert_close_scaled(m._forward_cuda_unfused(x), ref, name="unfused, nn.Conv1d")


def _mamba_ssm_available():
    return mamba_mod.selective_scan_fn is not None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not _mamba_ssm_available(),
                    reason="needs CUDA and mamba_ssm (pip install abaw[cuda])")
@pytest.mark.parametrize("fused", [True, False])
def test_cuda_kernels_match_pure_pytorch(fused):
    torch.manual_seed(0)
    m = Mamba(64, d_state=16, expand=2, use_fast_path=fused).cuda()
    if fused and mamba_mod.causal_conv1d_fn is None:
        pytest.skip("fused path needs causal_conv1d")
    x = torch.randn(2, 77, 64, device="cuda", requires_grad=True)
    out_k = m(x)  # kernel path (fused mamba_inner_fn or selective_scan_fn)
    out_t = m._forward_torch(x)  # pure-PyTorch chunked scan on the same device
    assert_close_scaled(out_k, out_t, tol=1e-3, name="out")
    gy = torch.randn_like(out_k)
    params = [x] + list(m.parameters())
    g_k = torch.autograd.grad(out_k, params, gy)
    g_t = torch.autograd.grad(out_t, params, gy)
    for name, a, b in zip(["input"] + [n for n, _ in m.named_parameters()], g_k, g_t):
        assert_close_scaled(a, b, tol=1e-3, name=f"grad {name}")


@pytest.mark.parametrize("seqlen,bias", [(1, True), (3, True), (70, True), (70, False)])
def test_fused_conv_silu_matches_conv1d(seqlen, bias):
    """Mamba's causal depthwise conv + SiLU in one pass: as nn.Conv1d + SiLU, values and grads,
    also for sequences shorter than the kernel."""
    from abaw.models.conv_silu_cpu import conv_silu, fused_available

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(12, 12, 4, groups=12, padding=3, bias=bias)
    xz = torch.randn(3, seqlen, 24, requires_grad=True)
    x = xz[..., :12]  # a strided view, as in Mamba
    assert fused_available(x)
    ref = F.silu(conv(x.transpose(1, 2))[..., :seqlen]).transpose(1, 2)
    out = conv_silu(x, conv.weight, conv.bias)
    assert_close_scaled(out, ref, tol=1e-6, name="out")
    gy = torch.randn_like(ref)
    params = [xz] + list(conv.parameters())
    for a, b in zip(torch.autograd.grad(out, params, gy), torch.autograd.grad(ref, params, gy)):
        assert_close_scaled(a, b, tol=1e-5)
