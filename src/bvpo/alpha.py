"""The MSE-optimal mixing weight α* (docs/method.md), estimated from gradient samples.

Model: g_t = g + u with E[u] = 0 (the trace estimator is unbiased for the marginal gradient),
g_e = g + b_e + v with E[v] = 0 (the empty-trace estimator has bias b_e), u and v independent.
The mixed estimator α·g_t + (1−α)·g_e then has

    MSE(α) = α²·tr Σ_t + (1−α)²·(tr Σ_e + ‖b_e‖²),

minimised by α* = (‖b_e‖² + tr Σ_e) / (tr Σ_t + tr Σ_e + ‖b_e‖²), clipped to [0, 1].

The plug-in uses n independent draws of each (rows of [n, d] tensors, one micro-batch gradient
per row): tr Σ from the per-row sample variances (the variance of ONE draw, since BVPO mixes
one draw of each per step), and ‖b_e‖² from the gap between the two means, minus the noise
that gap carries from finite n: E‖ḡ_e − ḡ_t‖² = ‖b_e‖² + (tr Σ_t + tr Σ_e)/n.

The step's batch is not the draw's. A draw is the mean gradient of `draw_size` pairs, but a
training step mixes the means of `batch_size` pairs of each estimator: the per-pair variances
shrink as 1/batch_size while the bias does not. So the trainer rescales the variances AFTER
the noise correction of the bias gap (which depends on the draws, not the step):
tr Σ_step = tr Σ_draw · draw_size / batch_size, then α* from those (`step_statistics`). With
per-pair variances 8 and 0.8 and ‖b_e‖² = 0.09, 8-pair draws give α*_draw = 0.160 while the
optimum for 32-pair steps is 0.315: without the rescaling α* is pushed toward 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import TrainConfig


def gradient_statistics(trace_grads: torch.Tensor, empty_grads: torch.Tensor) -> dict[str, float]:
    """Per-draw variances, the noise-corrected squared bias gap, norms and cosine."""
    if trace_grads.ndim != 2 or empty_grads.ndim != 2 or trace_grads.shape[1] != empty_grads.shape[1]:
        raise ValueError(
            f"expected two [n, d] tensors with the same d, got {tuple(trace_grads.shape)} "
            f"and {tuple(empty_grads.shape)}"
        )
    n_t, n_e = trace_grads.shape[0], empty_grads.shape[0]
    if n_t < 2 or n_e < 2:
        raise ValueError(f"need at least 2 draws of each estimator, got {n_t} and {n_e}")
    g_t = trace_grads.double()
    g_e = empty_grads.double()
    mean_t, mean_e = g_t.mean(0), g_e.mean(0)
    var_t = ((g_t - mean_t) ** 2).sum(1).sum().item() / (n_t - 1)
    var_e = ((g_e - mean_e) ** 2).sum(1).sum().item() / (n_e - 1)
    raw_gap = ((mean_e - mean_t) ** 2).sum().item()
    bias_sq = max(raw_gap - var_t / n_t - var_e / n_e, 0.0)
    norm_t, norm_e = mean_t.norm().item(), mean_e.norm().item()
    cosine = (mean_t @ mean_e).item() / max(norm_t * norm_e, 1e-30)
    return {
        "var_think": var_t,
        "var_nothink": var_e,
        "bias_gap_sq": bias_sq,
        "bias_gap_sq_raw": raw_gap,
        "grad_norm_think": norm_t,
        "grad_norm_nothink": norm_e,
        "cos_think_nothink": cosine,
    }


def alpha_from_statistics(var_think: float, var_nothink: float, bias_gap_sq: float) -> float:
    numerator = bias_gap_sq + var_nothink
    denominator = var_think + var_nothink + bias_gap_sq
    if denominator <= 0:
        return 0.5  # both estimators identical and noiseless: any mixture is optimal
    return float(min(max(numerator / denominator, 0.0), 1.0))


def step_statistics(stats: dict[str, float], think_draw_size: int, nothink_draw_size: int,
                    batch_size: int) -> dict[str, float]:
    """The variances of the step's `batch_size`-pair means, from those of the draws (pairs per
    draw may differ by estimator when one dataset is smaller than the draw size)."""
    return {"var_think": stats["var_think"] * think_draw_size / batch_size,
            "var_nothink": stats["var_nothink"] * nothink_draw_size / batch_size,
            "bias_gap_sq": stats["bias_gap_sq"]}


def optimal_alpha(trace_grads: torch.Tensor, empty_grads: torch.Tensor) -> float:
    """Plug-in α* ∈ [0, 1] from [n, d] draws of the trace and empty-trace gradients."""
    stats = gradient_statistics(trace_grads, empty_grads)
    return alpha_from_statistics(stats["var_think"], stats["var_nothink"], stats["bias_gap_sq"])


@dataclass
class AlphaState:
    """The method's mixing weight: fixed, or `auto` (re-estimated from gradient draws)."""

    alpha: float
    auto: bool
    estimated: bool = False


def update_alpha(state: AlphaState, statistics: dict[str, float], config: TrainConfig) -> tuple[AlphaState, dict]:
    """α* from one estimate's draw statistics (`gradient_statistics` plus the pairs per draw of
    each estimator, `think_draw_size` and `nothink_draw_size`), and the method's new α state.

    α* is the optimum for the step's batch (`config.batch_size` pairs of each estimator), not
    for a draw: the draws' variances are rescaled by draw size / batch size after the bias gap
    was noise-corrected (`alpha.step_statistics`). An `auto` method takes the first estimate as
    is, then smooths (α ← ema·α + (1−ema)·α*) and clips to [alpha_min, alpha_max]; a fixed
    method keeps its α and only reports α*. Returns (state, values to log)."""
    step = step_statistics(statistics, int(statistics["think_draw_size"]), int(statistics["nothink_draw_size"]),
                           config.batch_size)
    alpha_star = alpha_from_statistics(step["var_think"], step["var_nothink"], step["bias_gap_sq"])
    logged = {"alpha_star": alpha_star,
              "alpha_star_draw": alpha_from_statistics(statistics["var_think"], statistics["var_nothink"],
                                                       statistics["bias_gap_sq"]),
              "grad/var_think_step": step["var_think"], "grad/var_nothink_step": step["var_nothink"]}
    if not state.auto:
        return state, logged
    smoothed = alpha_star if not state.estimated else config.alpha_ema * state.alpha + (1 - config.alpha_ema) * alpha_star
    return AlphaState(min(max(smoothed, config.alpha_min), config.alpha_max), auto=True, estimated=True), logged
