import pytest

from bvpo.pairs import build_pairs
from bvpo.rewards import verified_reward


@pytest.mark.parametrize(
    "response, reference, reward",
    [("66", "66", 1.0), ("-12", "-12", 1.0), ("65", "66", 0.0), ("", "66", 0.0),
     ("The answer is 66.", "66", 1.0), ("\\frac{1}{2}", "0.5", 1.0), ("banana", "0.5", 0.0)],
)
def test_verified_reward(response, reference, reward):
    assert verified_reward(response, reference) == reward


def sample(pid, mode, completion, reward, valid=True):
    return {"prompt_id": pid, "prompt": f"p{pid}", "mode": mode, "completion": completion,
            "reward": reward, "valid": valid}


def test_best_against_worst_per_prompt_and_mode():
    samples = [
        sample(0, "think", "a", 1.0), sample(0, "think", "b", 0.0), sample(0, "think", "c", 1.0),
        sample(0, "think", "d", 0.0), sample(0, "nothink", "e", 1.0), sample(0, "nothink", "f", 1.0),
        sample(1, "nothink", "g", 0.0), sample(1, "nothink", "h", 1.0), sample(1, "nothink", "i", 0.0, valid=False),
    ]
    pairs = build_pairs(samples, max_pairs_per_prompt=2)
    assert [(p["chosen"], p["rejected"]) for p in pairs["think"]] == [("a", "d"), ("c", "b")]
    # Prompt 0 no-thinking: all tied, no pair. Prompt 1: the invalid sample never pairs.
    assert [(p["prompt_id"], p["chosen"], p["rejected"]) for p in pairs["nothink"]] == [(1, "h", "g")]


def test_pairs_stop_at_ties_and_respect_the_cap():
    samples = [sample(0, "think", c, r) for c, r in zip("abcd", (1.0, 1.0, 1.0, 0.0))]
    assert len(build_pairs(samples, 2)["think"]) == 1
    samples = [sample(0, "think", c, r) for c, r in zip("abcd", (1.0, 1.0, 0.0, 0.0))]
    assert len(build_pairs(samples, 1)["think"]) == 1


def test_graded_reward_prefers_close_numbers():
    from bvpo.rewards import graded_reward

    assert graded_reward("66", "66") == 1.0
    assert graded_reward("65", "66") == pytest.approx(0.25)
    assert graded_reward("56", "66") == pytest.approx(0.5 / 11)
    assert graded_reward("no idea", "66") == 0.0
