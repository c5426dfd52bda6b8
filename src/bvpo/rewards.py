"""Rewards for sampled answers.

`verified`: 1 when the final answer equals the reference, else 0. Integers (the embedded task)
are compared exactly and fast; anything else goes through math-verify, which understands
LaTeX, fractions and equivalent forms.
`graded`: `verified`, plus partial credit below 0.5 for a wrong number that is close to a
numeric reference, so that even a weak policy's samples rarely tie (more pairs per prompt).
"""

from __future__ import annotations

import re

_INTEGER = re.compile(r"[-+]?\d+")
_LAST_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def _as_int(text: str) -> int | None:
    text = text.strip().rstrip(".")
    return int(text) if _INTEGER.fullmatch(text) else None


def verified_reward(response: str, reference: str) -> float:
    """1.0 when `response` states the reference answer, else 0.0. Empty responses score 0."""
    response = response.strip()
    if not response:
        return 0.0
    gold = _as_int(reference)
    if gold is not None:
        pred = _as_int(response)
        if pred is None:
            numbers = _LAST_NUMBER.findall(response)
            pred = _as_int(numbers[-1]) if numbers else None
        return float(pred == gold)
    from math_verify import parse, verify

    try:
        return float(bool(verify(parse(reference), parse(response))))
    except Exception:  # math-verify gives up on unparsable text; that is a wrong answer
        return 0.0


def _last_number(text: str) -> float | None:
    numbers = _LAST_NUMBER.findall(text)
    return float(numbers[-1]) if numbers else None


def graded_reward(response: str, reference: str) -> float:
    """1.0 for a verified answer; else 0.5 / (1 + |error|) for a numeric answer; else 0."""
    if verified_reward(response, reference) == 1.0:
        return 1.0
    gold, pred = _last_number(reference), _last_number(response)
    if gold is None or pred is None:
        return 0.0
    return 0.5 / (1.0 + abs(pred - gold))


REWARDS = {"verified": verified_reward, "graded": graded_reward}
