"""The judged task: the embedded arithmetic prompts, graded for quality by a hidden gold scorer
and judged in the pipeline by a learned reward model, as conversational tasks are.

On the arithmetic task the reward is right or wrong, so a chosen sample is simply a right
answer and fine-tuning on it carries most of the signal. Here an answer is graded by how close
it is (`gold_reward`), so a chosen sample is often only *better*: off by one beats off by ten.
The pipeline never sees the gold scorer. It trains a Bradley–Terry reward model on noisy
comparisons the gold scorer labelled (`comparisons`, then `reward_training.train_reward_model`),
and the pairs stage ranks samples with that model through the ordinary `pairs.reward: model`
path, exactly as it would use a user's reward model. Evaluation reports the gold reward next
to the reward model's judgement, so over-optimising the proxy shows as a gap between them.
"""

from __future__ import annotations

import math
import random
import re

from .data import DataError

_INTEGER = re.compile(r"[-+]?\d+")

GOLD_SCALE = 3.0
"""Error (in units) at which closeness has fallen to 1/e: exact 1, off by one 0.72, by three
0.37, by ten 0.04. Small enough that 'closer' matters between wrong answers a weak policy
writes, large enough that most of a prompt's samples differ in grade."""
NOT_BARE = 0.8
"""Factor for an answer that is more than the number ('so 42', '42 apples'): the user asked for
the number; a right answer in prose still beats a near miss."""


MAX_ERROR = 1000
"""Errors beyond this grade as this (0 to double precision): a 400-digit number is just wrong."""


def gold_reward(response: str, answer: str) -> float:
    """Hidden quality grade of an answer in [0, 1]: exp(−|error| / GOLD_SCALE) for its last
    integer, times NOT_BARE unless the answer is the bare integer; 0 without a number, and 0
    against a reference that is not an integer (a prompt from elsewhere has no gold)."""
    text = response.strip()
    numbers = _INTEGER.findall(text)
    if not numbers or not _INTEGER.fullmatch(answer.strip()):
        return 0.0
    error = min(abs(int(numbers[-1]) - int(answer)), MAX_ERROR)
    return math.exp(-error / GOLD_SCALE) * (1.0 if _INTEGER.fullmatch(text) else NOT_BARE)


def _sigmoid(x: float) -> float:
    """Logistic function without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


OFFSETS = (1, 1, 2, 2, 3, 4, 5, 7, 10, 15, 20)
"""Distances of the candidate answers the comparisons are made of: mostly near misses, as the
policy's wrong answers are, with some far ones."""


def candidate_answer(rng: random.Random, truth: int, exact: float = 0.25, prose: float = 0.15) -> str:
    """An answer a policy might give: exact with probability `exact`, else off by one of
    OFFSETS; written as prose ('so 42') with probability `prose`."""
    value = truth if rng.random() < exact else truth + rng.choice((-1, 1)) * rng.choice(OFFSETS)
    return f"so {value}" if rng.random() < prose else str(value)


def comparisons(prompts: list[str], answers: list[str], n: int, noise: float, seed: int) -> list[dict]:
    """`n` labelled comparisons of two different candidate answers to a random prompt. The label
    follows the Bradley–Terry model of the gold grades with temperature `noise`: the better
    answer is `chosen` with probability sigmoid(Δgold / noise), as a human rater would pick it
    (0: always the better one). Each row keeps both gold grades (`gold_margin` > 0 when the label
    agrees with the gold scorer)."""
    rng = random.Random(f"bvpo-judged-comparisons-{seed}")
    gradable = [i for i, answer in enumerate(answers) if _INTEGER.fullmatch(answer.strip())]
    if not gradable:
        raise DataError("judged task: no prompt has an integer answer to grade candidate answers against "
                        "(data.task judged grades the embedded task's answers; a prompts file needs integer answers)")
    rows = []
    while len(rows) < n:
        i = rng.choice(gradable)
        truth = int(answers[i])
        a, b = candidate_answer(rng, truth), candidate_answer(rng, truth)
        gold_a, gold_b = gold_reward(a, answers[i]), gold_reward(b, answers[i])
        if a == b or gold_a == gold_b:
            continue  # no preference to learn
        p_a = _sigmoid((gold_a - gold_b) / noise) if noise > 0 else float(gold_a > gold_b)
        chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
        rows.append({"prompt": prompts[i], "chosen": chosen, "rejected": rejected,
                     "gold_margin": gold_reward(chosen, answers[i]) - gold_reward(rejected, answers[i])})
    return rows
