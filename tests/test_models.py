"""Contract tests for every registered model (demo sizes) + fidelity to the published configs.

Neural models (``nn.Module``, forward on padded batches) and classical ones (``fit`` on videos,
``predict`` per video) have separate contracts; every registered model has one of the two.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from abaw.models import create_model, is_classical, list_models, model_class, model_info
from conftest import make_videos

NEURAL, CLASSICAL = list_models(kind="neural"), list_models(kind="classical")

DEMO_DIMS = {"visual": 768, "audio": 40, "text": 64}  # the demo dataset's feature widths
B, T = 3, 24
LENGTHS = (24, 13, 19)  # sample 0 is full, the others are right-padded

torch.set_num_threads(2)


def build(name: str, **overrides):
    torch.manual_seed(0)
    return create_model(name, size="demo", input_dims=DEMO_DIMS, **overrides)


def make_feats(model, b=B, t=T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(b, t, DEMO_DIMS[m], generator=g) for m in model.modalities}


def make_mask(lengths, t=T):
    return torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]  # (B, T), True = real


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NEURAL)
def test_forward_shape_and_interface(name):
    model = build(name).eval()
    assert isinstance(model.causal, bool)
    assert model.modalities == model_info(name, size="demo", input_dims=DEMO_DIMS).modalities
    assert model.config is not None
    with torch.no_grad():
        out = model(make_feats(model), make_mask(LENGTHS))
    assert out.shape == (B, T, 2) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NEURAL)
def test_every_parameter_gets_a_gradient(name):
    model = build(name).train()
    mask = make_mask(LENGTHS)
    out = model(make_feats(model), mask)
    target = torch.rand(B, T, 2, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ((out - target) ** 2)[mask].mean().backward()  # not out.sum(): BatchNorm would zero that
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


@pytest.mark.parametrize("name", NEURAL)
def test_padding_never_reaches_real_frames(name):
    """Garbage in padded frames and the padding length leave every real frame's output unchanged."""
    model = build(name).eval()
    feats, mask = make_feats(model), make_mask(LENGTHS)
    with torch.no_grad():
        out = model(feats, mask)
        garbage = {m: torch.where(mask[..., None], x, 1e4 * torch.randn_like(x)) for m, x in feats.items()}
        close(model(garbage, mask)[mask], out[mask])
        for i, n in enumerate(LENGTHS):  # each sample alone, unpadded
            alone = model({m: x[i:i + 1, :n] for m, x in feats.items()}, torch.ones(1, n, dtype=torch.bool))
            close(alone[0], out[i, :n])
        longer = {m: torch.cat([x, torch.randn(B, 7, x.shape[-1])], 1) for m, x in feats.items()}
        out_longer = model(longer, make_mask(LENGTHS, T + 7))
        close(out_longer[:, :T][mask], out[mask])


@pytest.mark.parametrize("name", [n for n in NEURAL if model_info(n).causal])
def test_causal_models_ignore_the_future(name):
    model = build(name).eval()
    feats, mask = make_feats(model), make_mask((T,) * B)
    t = T // 2
    future = {m: torch.cat([x[:, :t + 1], torch.randn_like(x[:, t + 1:])], 1) for m, x in feats.items()}
    with torch.no_grad():
        close(model(future, mask)[:, :t + 1], model(feats, mask)[:, :t + 1])


def test_every_model_is_of_one_kind():
    assert CLASSICAL and NEURAL and not set(CLASSICAL) & set(NEURAL)
    assert sorted(CLASSICAL + NEURAL) == list_models()
    for name in list_models():
        assert model_info(name).kind == ("classical" if is_classical(name) else "neural")
        assert isinstance(create_model(name, size="demo", input_dims=DEMO_DIMS), torch.nn.Module) != is_classical(name)
    with pytest.raises(ValueError, match="unknown kind"):
        list_models(kind="bayesian")


@pytest.mark.parametrize("name", CLASSICAL)
def test_classical_fit_predict_save_load(name, tmp_path):
    model = create_model(name, size="demo", input_dims=DEMO_DIMS)
    info = model_info(name, size="demo", input_dims=DEMO_DIMS)
    assert model.kind == "classical" and isinstance(model.causal, bool) and model.causal == info.causal
    assert model.modalities == info.modalities and model.config == info.config
    videos = make_videos(tmp_path / "feats", {m: DEMO_DIMS[m] for m in model.modalities})
    train, held = videos[:6], videos[6:]
    with pytest.raises(RuntimeError, match="not fitted"):
        model.predict(held[0])
    assert model.fit(train) is model
    preds = {v.name: model.predict(v) for v in held}
    for v in held:
        assert preds[v.name].shape == (v.n_frames, 2) and preds[v.name].dtype == np.float32
        assert np.isfinite(preds[v.name]).all()
    model.save(tmp_path / "saved")
    loaded = model_class(name).load(tmp_path / "saved")
    assert loaded.config == model.config
    for v in held:
        np.testing.assert_array_equal(loaded.predict(v), preds[v.name])


@pytest.mark.parametrize("name", CLASSICAL)
def test_classical_models_refuse_features_of_another_width(name, tmp_path):
    model = create_model(name, size="demo", input_dims={"visual": 8, "audio": 3, "text": 5})
    videos = make_videos(tmp_path, {m: 4 for m in model.modalities})
    with pytest.raises(ValueError, match="are 4-d, but the config says"):
        model.fit(videos)


def test_non_causal_models_do_see_the_future():
    # guards the causality test itself: it must be able to fail
    model = build("tcn_transformer").eval()
    feats, mask = make_feats(model), make_mask((T,) * B)
    future = {m: torch.cat([x[:, :2], torch.randn_like(x[:, 2:])], 1) for m, x in feats.items()}
    with torch.no_grad():
        assert not torch.allclose(model(future, mask)[:, :2], model(feats, mask)[:, :2])


def test_masked_batchnorm_ignores_padding_in_train_mode():
    model = build("tcn_transformer", dropout=0.0, tcn_dropout=0.0).train()
    feats, mask = make_feats(model), make_mask(LENGTHS)
    out = model(feats, mask)
    # inputs are zeroed at padded frames, so garbage cannot tell; more padding frames can
    longer = {m: torch.cat([x, torch.randn(B, 7, x.shape[-1])], 1) for m, x in feats.items()}
    close(model(longer, make_mask(LENGTHS, T + 7))[:, :T][mask], out[mask])


def test_positional_encoding_is_parameter_free_and_padding_safe():
    plain, pe = build("tcn_transformer"), build("tcn_transformer", pos_encoding=True)
    assert sum(p.numel() for p in pe.parameters()) == sum(p.numel() for p in plain.parameters())
    pe.eval()
    feats, mask = make_feats(pe), make_mask(LENGTHS)
    with torch.no_grad():
        out = pe(feats, mask)
        assert not torch.allclose(out, plain.eval()(feats, mask))
        alone = pe({m: x[1:2, :LENGTHS[1]] for m, x in feats.items()}, torch.ones(1, LENGTHS[1], dtype=torch.bool))
    close(alone[0], out[1, :LENGTHS[1]])


@pytest.mark.parametrize("name", [n for n in NEURAL if model_info(n).modalities == ("visual",)])
@pytest.mark.parametrize("dim", [17, 1024])
def test_visual_only_models_accept_any_width(name, dim):
    torch.manual_seed(0)
    model = create_model(name, size="demo", input_dims={"visual": dim, "audio": 40}).eval()
    with torch.no_grad():
        out = model({"visual": torch.randn(2, 10, dim)}, torch.ones(2, 10, dtype=torch.bool))
    assert out.shape == (2, 10, 2)


def test_leader_follower_any_number_of_followers_and_single_target():
    dims = {"visual": 20, "vggish": 12, "mfcc": 7, "egemaps": 5}
    model = create_model("leader_follower", size="demo", input_dims=dims,
                         followers=("vggish", "mfcc", "egemaps"), single_target="arousal").eval()
    assert model.modalities == ("visual", "vggish", "mfcc", "egemaps") and model.out_dim == 1
    feats = {m: torch.randn(2, 9, d) for m, d in dims.items()}
    assert model(feats, torch.ones(2, 9, dtype=torch.bool)).shape == (2, 9, 1)


# published parameter counts (shared/ABAW_REFERENCE.md), built with the published input widths
REFERENCE = {
    "mamba_va": ({"visual": 1024}, {}, 67_155_086),
    "tcn_transformer": ({"visual": 768}, {}, 20_511_371),
    "leader_follower": ({"visual": 512, "vggish": 128, "mfcc": 39},
                        {"followers": ("vggish", "mfcc"), "single_target": "valence"}, 1_092_801),
    # encoder_layers=0: the published self-attention is a frozen BEiT-3 outside the count
    "maven": ({"visual": 1024, "audio": 768, "text": 768}, {"encoder_layers": 0}, 8_535_810),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_parameter_count_matches_published_code(name):
    dims, overrides, expected = REFERENCE[name]
    model = create_model(name, size="abaw", input_dims=dims, **overrides)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_published_submodule_counts():
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    mva = create_model("mamba_va")
    assert (n(mva.tcn), n(mva.layers) + n(mva.proj), n(mva.head)) == (66_203_148, 918_784, 33_154)
    assert n(mva.layers[0].mamba) == 212_736
    tt = create_model("tcn_transformer")
    assert n(tt.tcn) == 7_689_097 and n(tt.proj) + n(tt.transformer) == 12_689_920
    lf = create_model("leader_follower", input_dims={"visual": 512, "vggish": 128, "mfcc": 39},
                      followers=("vggish", "mfcc"), single_target="valence")
    assert n(lf.tcns["visual"]) == 968_832 and n(lf.tcns["vggish"]) + n(lf.tcns["mfcc"]) == 104_832
    assert (n(lf.fusion), n(lf.regressor)) == (18_912, 225)


def test_unknown_model_lists_known_names():
    with pytest.raises((KeyError, ValueError)) as err:
        create_model("mamba-va")
    for name in list_models():
        assert name in str(err.value)


def test_unknown_override_names_valid_fields():
    with pytest.raises((TypeError, ValueError)) as err:
        create_model("tcn", size="demo", chanels=(8,))
    assert "chanels" in str(err.value) and "channels" in str(err.value)


def test_unknown_size_is_an_error():
    with pytest.raises(ValueError, match="demo"):
        create_model("linear", size="huge")


def test_model_info_does_not_need_the_model():
    info = model_info("maven")
    assert info.modalities == ("visual", "audio", "text") and info.causal is False
    assert model_info("leader_follower").modalities == ("visual", "audio")
    assert model_info("mamba_va").causal is True and model_info("mamba_va").config.d_state == 8


@pytest.mark.parametrize("dilation", [1, 2, 4])
@pytest.mark.parametrize("input_grad", [True, False], ids=["x_grad", "no_x_grad"])
def test_causal_conv_cpu_backward_matches_autograd(dilation, input_grad):
    """The TCN's CPU convolution (its own input gradient, a flipped convolution) gives autograd's
    output and gradients, for the input and for weight norm's g and v and the bias."""
    from torch.nn.functional import pad

    from abaw.models.tcn import CausalConv1d

    torch.manual_seed(dilation)
    conv = CausalConv1d(6, 5, kernel_size=3, dilation=dilation)
    x = torch.randn(2, 6, 23, requires_grad=input_grad)
    gy = torch.randn(2, 5, 23)
    params = [p for p in conv.parameters()]
    out = conv(x)
    assert type(out.grad_fn).__name__ == "_CausalConvCPUBackward"
    wanted = [x] * input_grad + params
    got = torch.autograd.grad(out, wanted, gy)
    ref_out = conv.conv(pad(x, (conv.left_pad, 0)))
    ref = torch.autograd.grad(ref_out, wanted, gy)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    y = out.detach()
    y2 = conv(x.detach() + torch.cat([torch.zeros(2, 6, 11), torch.randn(2, 6, 12)], -1))
    assert torch.equal(y[..., :11], y2.detach()[..., :11])  # still causal: frames >= 11 changed nothing before


def test_tcn_trains_under_cpu_bf16_autocast():
    """Under CPU autocast the TCN keeps PyTorch's own convolution (the fused CPU one is float32
    only): forward and backward run, and every parameter gets a finite gradient."""
    from abaw.models.tcn import TCN

    torch.manual_seed(0)
    tcn = TCN(3, (8, 8), kernel_size=3, dropout=0.1)
    x = torch.randn(2, 17, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tcn(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 17, 8)
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tcn.parameters())
