import pytest

from bvpo.diagnostics import trace_diagnostics


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
