import pytest
import torch

from bvpo.alpha import alpha_from_statistics, gradient_statistics, optimal_alpha


def draws(n, mean, std, generator):
    return mean + std * torch.randn(n, mean.numel(), generator=generator, dtype=torch.float64)


@pytest.mark.parametrize(
    "sigma_t, sigma_e, bias",
    [(2.0, 0.5, 0.3), (1.0, 1.0, 0.0), (3.0, 0.2, 1.0), (0.5, 0.5, 0.5)],
)
def test_recovers_closed_form_alpha(sigma_t, sigma_e, bias):
    d, n = 64, 4000
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(d, generator=gen, dtype=torch.float64)
    b_e = torch.full((d,), bias, dtype=torch.float64)
    trace = draws(n, g, sigma_t, gen)
    empty = draws(n, g + b_e, sigma_e, gen)
    tr_t, tr_e, b2 = d * sigma_t**2, d * sigma_e**2, (b_e**2).sum().item()
    expected = (b2 + tr_e) / (tr_t + tr_e + b2)
    assert optimal_alpha(trace, empty) == pytest.approx(expected, abs=0.02)


def test_bias_gap_is_corrected_for_the_noise_of_the_means():
    # No bias at all: the raw gap of the means is pure noise and must not count as bias.
    d, n = 200, 20
    gen = torch.Generator().manual_seed(1)
    trace = draws(n, torch.zeros(d, dtype=torch.float64), 1.0, gen)
    empty = draws(n, torch.zeros(d, dtype=torch.float64), 1.0, gen)
    stats = gradient_statistics(trace, empty)
    assert stats["bias_gap_sq_raw"] == pytest.approx(2 * d / n, rel=0.3)
    assert stats["bias_gap_sq"] < 0.3 * stats["bias_gap_sq_raw"]
    assert optimal_alpha(trace, empty) == pytest.approx(0.5, abs=0.1)


def test_noiseless_trace_estimator_gets_alpha_one():
    d = 16
    gen = torch.Generator().manual_seed(2)
    trace = torch.ones(50, d, dtype=torch.float64)
    empty = draws(50, torch.ones(d, dtype=torch.float64) + 2.0, 0.1, gen)
    assert optimal_alpha(trace, empty) == 1.0


def test_identical_estimators_split_evenly_and_clip():
    assert alpha_from_statistics(0.0, 0.0, 0.0) == 0.5
    assert alpha_from_statistics(1.0, 0.0, 0.0) == 0.0  # noiseless, unbiased empty estimator
    assert 0.0 <= alpha_from_statistics(1e-30, 1e30, 0.0) <= 1.0


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="same d"):
        optimal_alpha(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="at least 2"):
        optimal_alpha(torch.zeros(1, 4), torch.zeros(3, 4))
