"""Benchmark answers graded as the data sets write them: every MATH-500 solution and GSM8K
answer graded right against its own reference, another problem's answer graded wrong. The
files are the public ones, byte for byte (data/benchmarks/README.md has their sources)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from bvpo.rewards import _plain, final_answer, last_boxed, reference_answer, verified_reward

BENCHMARKS = Path(__file__).resolve().parent.parent / "data" / "benchmarks"


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (BENCHMARKS / name).read_text(encoding="utf-8").splitlines()]


def test_the_shipped_files_are_the_public_ones():
    digests = {name: hashlib.sha256((BENCHMARKS / name).read_bytes()).hexdigest()
               for name in ("math500.jsonl", "gsm8k_test.jsonl")}
    assert digests["math500.jsonl"].startswith("35dc4108")  # HuggingFaceH4/MATH-500 test.jsonl
    assert digests["gsm8k_test.jsonl"].startswith("3730d312")  # openai/grade-school-math test.jsonl
    assert len(rows("math500.jsonl")) == 500 and len(rows("gsm8k_test.jsonl")) == 1319


def test_every_math500_solution_grades_right_and_the_next_problems_answer_wrong():
    problems = rows("math500.jsonl")
    for row in problems:
        assert verified_reward(row["solution"], row["answer"]) == 1.0, row["unique_id"]
        assert verified_reward(f"So the final answer is $\\boxed{{{row['answer']}}}$.", row["answer"]) == 1.0
    graded_right = []
    for i, row in enumerate(problems):
        other = problems[(i + 1) % len(problems)]
        if _plain(other["answer"]) == _plain(row["answer"]):
            continue  # the same answer written the same way
        if verified_reward(other["solution"], row["answer"]) != 0.0:
            graded_right.append((row["answer"], other["answer"]))
    # The one pair of different strings that state the same value.
    assert graded_right == [("5", "x=5")]


def test_every_gsm8k_answer_grades_right_boxed_or_stated_and_the_next_problems_wrong():
    problems = rows("gsm8k_test.jsonl")
    for row in problems:
        gold = reference_answer(row["answer"])
        work = row["answer"].rsplit("####", 1)[0]
        assert verified_reward(f"{work}\nThe answer is \\boxed{{{gold}}}.", row["answer"]) == 1.0, gold
        assert verified_reward(f"The answer is {gold}.", row["answer"]) == 1.0, gold
    for i, row in enumerate(problems):
        other = reference_answer(problems[(i + 1) % len(problems)]["answer"])
        if other != reference_answer(row["answer"]):
            assert verified_reward(f"\\boxed{{{other}}}", row["answer"]) == 0.0


@pytest.mark.parametrize("response, reference, expected", [
    # MATH-500 references are LaTeX: each parsed bare gave nothing, so a right answer scored 0.
    ("The answer is $\\boxed{\\sqrt{2}}$.", "\\sqrt{2}", 1.0),
    ("\\boxed{\\frac{14}{3}}", "\\dfrac{14}{3}", 1.0),
    ("\\boxed{\\pi}", "\\pi", 1.0),
    ("\\boxed{[-2, 7]}", "[-2,7]", 1.0),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", 1.0),
    ("\\boxed{Evelyn}", "\\text{Evelyn}", 1.0),
    ("\\boxed{p-q}", "p - q", 1.0),
    # `2\sqrt{3}` parsed bare to 2, so a boxed 2 scored right.
    ("\\boxed{2}", "2\\sqrt{3}", 0.0),
    ("\\boxed{2\\sqrt3}", "2\\sqrt{3}", 1.0),
    # Integers: the boxed answer, not the last number in the text.
    ("\\boxed{5}. Check: 5^2 = 25", "5", 1.0),
    ("\\boxed{5}. Check: 5^2 = 25", "25", 0.0),
    # GSM8K references: the worked solution, then `#### answer` (with thousands separators).
    ("The answer is 72.", "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", 1.0),
    ("\\boxed{1,000}", "#### 1,000", 1.0),
    ("\\boxed{10\\%}", "10\\%", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    # Without a box only a stated answer counts, never a number that merely appears.
    ("5. Check: 2 × 5 = 10", "10", 0.0),
    ("It is 7 or 10", "10", 0.0),
    ("Answer: 42", "42", 1.0),
    # The embedded task: a bare number, compared exactly.
    ("42", "42", 1.0),
    ("41", "42", 0.0),
    ("", "5", 0.0),
])
def test_benchmark_answers(response, reference, expected):
    assert verified_reward(response, reference) == expected


def test_the_final_boxed_answer_is_the_last_one_with_its_braces():
    text = "First \\boxed{1}, then \\boxed{\\frac{a}{\\sqrt{b}}} is final."
    assert last_boxed(text) == "\\frac{a}{\\sqrt{b}}"
    assert final_answer(text) == "\\frac{a}{\\sqrt{b}}"
    assert final_answer("  42 ") == "42" and last_boxed("no box") is None
