"""The paper's trace diagnostics: why trace-based gradients are noisy.

Per mode, over sampled completions scored by the sampling policy: variance of the sequence
log-prob (pooled, and within prompt: the part due to sampling alone), variance and mean of
the length, per-token NLL, and with thinking on, the trace's share of tokens and its per-token
NLL against the answer's. `ratios` puts thinking over no-thinking, as the paper reports them.
"""

from __future__ import annotations

import random
from collections import defaultdict
from statistics import fmean, pvariance

from .modes import MODES


def _variance(values: list[float]) -> float:
    return pvariance(values) if len(values) > 1 else 0.0


def _within_prompt_variance(rows: list[dict], key) -> float:
    by_prompt: dict[int, list[float]] = defaultdict(list)
    for row in rows:
        by_prompt[row["prompt_id"]].append(key(row))
    per_prompt = [_variance(v) for v in by_prompt.values() if len(v) > 1]
    return fmean(per_prompt) if per_prompt else 0.0


def mode_statistics(rows: list[dict]) -> dict[str, float]:
    """`rows`: prompt_id, token_logps (completion tokens), n_trace_tokens (None if no trace)."""
    seq_logp = lambda r: float(sum(r["token_logps"]))  # noqa: E731
    length = lambda r: float(len(r["token_logps"]))  # noqa: E731
    n_tokens = sum(len(r["token_logps"]) for r in rows)
    stats = {
        "n_samples": float(len(rows)),
        "seq_logp_var": _variance([seq_logp(r) for r in rows]),
        "seq_logp_var_within_prompt": _within_prompt_variance(rows, seq_logp),
        "length_var": _variance([length(r) for r in rows]),
        "length_var_within_prompt": _within_prompt_variance(rows, length),
        "mean_length": fmean([length(r) for r in rows]) if rows else 0.0,
        "nll_per_token": -sum(sum(r["token_logps"]) for r in rows) / max(n_tokens, 1),
    }
    with_trace = [r for r in rows if r.get("n_trace_tokens")]
    if with_trace:
        trace_tokens = sum(r["n_trace_tokens"] for r in with_trace)
        answer_tokens = sum(len(r["token_logps"]) - r["n_trace_tokens"] for r in with_trace)
        trace_nll = -sum(sum(r["token_logps"][: r["n_trace_tokens"]]) for r in with_trace)
        answer_nll = -sum(sum(r["token_logps"][r["n_trace_tokens"]:]) for r in with_trace)
        stats["trace_token_fraction"] = trace_tokens / max(trace_tokens + answer_tokens, 1)
        stats["trace_nll_per_token"] = trace_nll / max(trace_tokens, 1)
        stats["answer_nll_per_token"] = answer_nll / max(answer_tokens, 1)
        stats["trace_vs_answer_nll"] = stats["trace_nll_per_token"] / max(stats["answer_nll_per_token"], 1e-12)
    return stats


def trace_diagnostics(rows: list[dict]) -> dict:
    """{"think": stats, "nothink": stats, "ratios": thinking ÷ no-thinking} over all rows."""
    by_mode = {mode: [r for r in rows if r["mode"] == mode] for mode in MODES}
    result: dict = {mode: mode_statistics(mode_rows) for mode, mode_rows in by_mode.items()}
    ratios = {}
    for key in ("seq_logp_var", "seq_logp_var_within_prompt", "length_var", "mean_length", "nll_per_token"):
        denominator = result["nothink"].get(key, 0.0)
        if denominator > 0:
            ratios[key] = result["think"][key] / denominator
    result["ratios"] = ratios
    return result


def prompt_subset(prompt_ids, n: int | None, seed: int) -> set:
    """`n` of the distinct prompt ids, drawn at random with `seed` (all of them when `n` is None
    or not smaller): the diagnostics then score every sample of those prompts, so the
    within-prompt statistics keep all k samples."""
    distinct = sorted(set(prompt_ids))
    if n is None or n >= len(distinct):
        return set(distinct)
    return set(random.Random(f"bvpo-analyze-{seed}").sample(distinct, n))
