"""CCC against an independent computation, in numpy and torch, with masks."""
import numpy as np
import pytest
import torch

from abaw.metrics import ccc, ccc_loss, score


def reference_ccc(x, y):
    """Straight from the formula, population moments via np.cov(bias=True)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    cov = np.cov(x, y, bias=True)
    return 2 * cov[0, 1] / (cov[0, 0] + cov[1, 1] + (x.mean() - y.mean()) ** 2)


@pytest.fixture
def pair():
    rng = np.random.default_rng(1)
    y = rng.uniform(-1, 1, size=(500, 2))
    x = 0.6 * y + 0.2 + rng.normal(0, 0.3, size=y.shape)
    return x, y


def test_numpy_matches_reference(pair):
    x, y = pair
    np.testing.assert_allclose(ccc(x, y), [reference_ccc(x[:, 0], y[:, 0]), reference_ccc(x[:, 1], y[:, 1])],
                               rtol=1e-7)
    assert ccc(x[:, 0], y[:, 0]) == pytest.approx(reference_ccc(x[:, 0], y[:, 0]), rel=1e-7)


def test_mask_equals_dropping_frames(pair):
    x, y = pair
    mask = np.arange(len(x)) % 3 != 0
    np.testing.assert_allclose(ccc(x, y, mask), ccc(x[mask], y[mask]), rtol=1e-10)


def test_torch_matches_numpy_and_has_gradients(pair):
    x, y = pair
    mask = np.arange(len(x)) % 4 != 0
    xt = torch.tensor(x, requires_grad=True)
    out = ccc(xt, torch.tensor(y), torch.tensor(mask))
    np.testing.assert_allclose(out.detach().numpy(), ccc(x, y, mask), rtol=1e-10)
    out.sum().backward()
    assert torch.all(xt.grad[~torch.tensor(mask)] == 0) and xt.grad.abs().sum() > 0


def test_perfect_and_shifted_predictions():
    y = np.linspace(-1, 1, 100)
    assert ccc(y, y) == pytest.approx(1.0, abs=1e-6)
    assert ccc(y + 0.5, y) < 0.9  # CCC, unlike Pearson, punishes a bias
    assert ccc(-y, y) == pytest.approx(-1.0, abs=1e-6)


def test_loss_is_sum_of_one_minus_ccc_over_flattened_batch(pair):
    x, y = pair
    xt, yt = torch.tensor(x).reshape(5, 100, 2), torch.tensor(y).reshape(5, 100, 2)
    mask = torch.ones(5, 100, dtype=torch.bool)
    mask[0, :10] = False
    loss = ccc_loss(xt, yt, mask)
    flat = mask.reshape(-1).numpy()
    expected = sum(1 - reference_ccc(x[flat, d], y[flat, d]) for d in range(2))
    assert loss.item() == pytest.approx(expected, rel=1e-7)


def test_score_concatenates_frames_and_ignores_minus_five(pair):
    x, y = pair
    y = y.copy()
    y[:50] = -5
    s = score(x, y)
    assert s["valence"] == pytest.approx(reference_ccc(x[50:, 0], y[50:, 0]))
    assert s["mean"] == pytest.approx((s["valence"] + s["arousal"]) / 2)


def test_masked_frames_may_hold_nan(pair):
    x, y = pair
    x = x.copy()
    mask = np.ones(len(x), bool)
    mask[7], x[7] = False, np.nan
    np.testing.assert_allclose(ccc(x, y, mask), ccc(np.delete(x, 7, 0), np.delete(y, 7, 0)), rtol=1e-10)
    xt = torch.tensor(x, requires_grad=True)
    out = ccc(xt, torch.tensor(y), torch.tensor(mask))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(xt.grad).all()
