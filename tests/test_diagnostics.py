import pytest

from bvpo.diagnostics import prompt_subset, trace_diagnostics


def test_hand_computed_statistics_and_ratios():
    rows = [
        # thinking: prompt 0 twice, prompt 1 once; 3 trace tokens then the answer
        {"prompt_id": 0, "mode": "think", "token_logps": [-1.0, -1.0, -1.0, -0.5], "n_trace_tokens": 3},
        {"prompt_id": 0, "mode": "think", "token_logps": [-2.0, -2.0, -2.0, -0.5, -0.5, -0.5], "n_trace_tokens": 3},
        {"prompt_id": 1, "mode": "think", "token_logps": [-1.0, -1.0, -1.0, -1.0], "n_trace_tokens": 3},
        {"prompt_id": 0, "mode": "nothink", "token_logps": [-1.0, -1.0], "n_trace_tokens": None},
        {"prompt_id": 0, "mode": "nothink", "token_logps": [-2.0], "n_trace_tokens": None},
    ]
    d = trace_diagnostics(rows)
    think, nothink = d["think"], d["nothink"]
    # sequence log-probs: -3.5, -7.5, -4 → mean -5, pvariance ((1.5²+2.5²+1²)/3)
    assert think["seq_logp_var"] == pytest.approx((1.5**2 + 2.5**2 + 1.0) / 3)
    assert think["seq_logp_var_within_prompt"] == pytest.approx(4.0)  # prompt 0 only: (-3.5, -7.5)
    assert think["mean_length"] == pytest.approx(14 / 3)
    assert think["length_var"] == pytest.approx(((4 - 14 / 3) ** 2 * 2 + (6 - 14 / 3) ** 2) / 3)
    assert think["trace_token_fraction"] == pytest.approx(9 / 14)
    assert think["trace_nll_per_token"] == pytest.approx((3 + 6 + 3) / 9)
    assert think["answer_nll_per_token"] == pytest.approx((0.5 + 1.5 + 1.0) / 5)
    assert nothink["seq_logp_var"] == pytest.approx(0.0)
    assert nothink["mean_length"] == pytest.approx(1.5)
    assert nothink["nll_per_token"] == pytest.approx(4 / 3)
    assert d["ratios"]["mean_length"] == pytest.approx((14 / 3) / 1.5)
    assert "seq_logp_var" not in d["ratios"]  # no-thinking variance is zero: no ratio


def test_prompt_subset_draws_distinct_prompts_reproducibly():
    ids = [7, 7, 3, 3, 9, 9, 1, 1, 5]  # a prompt's samples repeat its id
    subset = prompt_subset(ids, 3, seed=0)
    assert len(subset) == 3 and subset <= set(ids)
    assert prompt_subset(list(reversed(ids)), 3, seed=0) == subset  # the order of the rows does not matter
    assert prompt_subset(ids, None, seed=0) == prompt_subset(ids, 5, seed=0) == prompt_subset(ids, 99, seed=0) == {1, 3, 5, 7, 9}
    # Another seed draws another subset for some seed; draws over many seeds cover every prompt.
    draws = [frozenset(prompt_subset(ids, 3, seed=s)) for s in range(20)]
    assert len(set(draws)) > 1 and set().union(*draws) == {1, 3, 5, 7, 9}
