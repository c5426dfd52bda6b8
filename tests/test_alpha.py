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


def test_alpha_for_the_steps_batch_matches_the_closed_form():
    """Per-pair gradients with known variances and bias, draws of 8 pairs, steps of 32: the
    estimate is the optimum for a 32-pair step, not for an 8-pair draw (the issue's example:
    per-pair variances 8 and 0.8, squared bias 0.09 → 0.160 for 8-pair means, 0.315 for 32)."""
    from bvpo.config import TrainConfig
    from bvpo.alpha import AlphaState, update_alpha

    d, draw_size, batch, n_draws = 16, 8, 32, 16
    var_pair_t, var_pair_e, bias_sq = 8.0, 0.8, 0.09
    optimum_draw = (bias_sq + var_pair_e / draw_size) / ((var_pair_t + var_pair_e) / draw_size + bias_sq)
    optimum_step = (bias_sq + var_pair_e / batch) / ((var_pair_t + var_pair_e) / batch + bias_sq)
    assert (round(optimum_draw, 3), round(optimum_step, 3)) == (0.160, 0.315)
    config = TrainConfig(batch_size=batch, alpha_draw_size=draw_size)
    g = torch.linspace(-1, 1, d, dtype=torch.float64)
    b_e = torch.full((d,), (bias_sq / d) ** 0.5, dtype=torch.float64)
    estimates, draw_estimates = [], []
    for seed in range(300):
        gen = torch.Generator().manual_seed(seed)
        # Each draw is the mean of `draw_size` per-pair gradients.
        pairs_t = g + (var_pair_t / d) ** 0.5 * torch.randn(n_draws, draw_size, d, generator=gen, dtype=torch.float64)
        pairs_e = g + b_e + (var_pair_e / d) ** 0.5 * torch.randn(n_draws, draw_size, d, generator=gen,
                                                                  dtype=torch.float64)
        stats = gradient_statistics(pairs_t.mean(1), pairs_e.mean(1))
        _, logged = update_alpha(AlphaState(0.5, auto=True), {**stats, "think_draw_size": draw_size,
                                                             "nothink_draw_size": draw_size}, config)
        estimates.append(logged["alpha_star"])
        draw_estimates.append(logged["alpha_star_draw"])
    mean = sum(estimates) / len(estimates)
    # The plug-in is a ratio of noisy estimates: its mean over seeds lands within 0.03 of the optimum.
    assert mean == pytest.approx(optimum_step, abs=0.03)
    assert sum(draw_estimates) / len(draw_estimates) == pytest.approx(optimum_draw, abs=0.03)


def test_step_statistics_rescale_each_estimator_by_its_own_draw_size():
    from bvpo.alpha import step_statistics

    stats = {"var_think": 2.0, "var_nothink": 1.0, "bias_gap_sq": 0.5}
    assert step_statistics(stats, 8, 4, 32) == {"var_think": 0.5, "var_nothink": 0.125, "bias_gap_sq": 0.5}


def test_update_alpha_takes_the_first_estimate_then_smooths_and_clips():
    from bvpo.config import TrainConfig
    from bvpo.alpha import AlphaState, update_alpha

    config = TrainConfig(batch_size=8, alpha_draw_size=8, alpha_ema=0.8, alpha_min=0.1, alpha_max=0.7)
    # Draw size = batch size: α* = (b² + v_e) / (v_t + v_e + b²) = (0.2 + 0.2) / (0.6 + 0.2 + 0.2) = 0.4.
    stats = {"var_think": 0.6, "var_nothink": 0.2, "bias_gap_sq": 0.2, "think_draw_size": 8, "nothink_draw_size": 8}
    first, logged = update_alpha(AlphaState(0.5, auto=True), stats, config)
    assert logged["alpha_star"] == pytest.approx(0.4) and first == AlphaState(pytest.approx(0.4), True, True)
    high = {**stats, "var_think": 0.0}  # α* = 1
    second, _ = update_alpha(first, high, config)
    assert second.alpha == pytest.approx(0.8 * 0.4 + 0.2 * 1.0)
    third, _ = update_alpha(AlphaState(0.7, True, True), high, config)
    assert third.alpha == 0.7  # 0.76 clipped to alpha_max
    fixed, logged = update_alpha(AlphaState(0.5, auto=False), high, config)
    assert fixed == AlphaState(0.5, False) and logged["alpha_star"] == 1.0
