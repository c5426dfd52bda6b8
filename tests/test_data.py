import json
import random

import pandas as pd
import pytest

from bvpo.data import DataError, longest_prompt, make_problem, make_trace, read_prompts_file, solve, synthetic_prompts


def test_synthetic_prompts_are_disjoint_seeded_and_correct():
    a = synthetic_prompts(200, 50, 2, 3, seed=3)
    b = synthetic_prompts(200, 50, 2, 3, seed=3)
    assert a["train"]["prompt"] == b["train"]["prompt"]
    assert not set(a["train"]["prompt"]) & set(a["test"]["prompt"])
    for row in list(a["train"])[:50]:
        expression = row["prompt"].removeprefix("Compute ").removesuffix(".")
        assert int(row["answer"]) == eval(expression)  # noqa: S307 - digits and +/- only
        assert 2 <= expression.count("+") + expression.count("-") <= 3


def test_traces_are_stochastic_and_state_every_step():
    chain = [47, ("+", 38), ("-", 19)]
    rng = random.Random(0)
    traces = {make_trace(rng, chain) for _ in range(50)}
    assert len(traces) > 10
    for trace in traces:
        assert "85" in trace and "66" in trace
    assert solve(chain)[-1][3] == 66


def test_jsonl_prompts_keep_extra_columns(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "What is 2+2?", "answer": 4, "source": "x"},
        {"prompt": "Name a prime.", "answer": "7", "source": "y"},
    ]) + "\n")
    ds = read_prompts_file(path)
    assert ds["answer"] == ["4", "7"] and ds["source"] == ["x", "y"]


def test_benchmark_files_may_call_the_prompt_problem(tmp_path):
    path = tmp_path / "math500.jsonl"
    path.write_text(json.dumps({"problem": "Compute $\\frac{1}{2}+\\frac{1}{2}$.", "answer": "1", "level": 2}) + "\n")
    with pytest.raises(DataError, match="no 'prompt' or 'messages' column"):
        read_prompts_file(path)
    ds = read_prompts_file(path, prompt_columns=("prompt", "problem"))
    assert ds["prompt"] == ["Compute $\\frac{1}{2}+\\frac{1}{2}$."] and ds["level"] == [2]
    assert "problem" not in ds.column_names
    with pytest.raises(DataError, match="no 'prompt' or 'problem' column"):
        path.write_text('{"question": "x", "answer": "1"}\n')
        read_prompts_file(path, prompt_columns=("prompt", "problem"))


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "ok"}', "{not json"], r"p\.jsonl, line 2: not valid JSON"),
        (['{"prompt": "ok"}', '{"prompt": "   "}'], r"row 2: field 'prompt' must be non-empty text"),
        (['{"question": "ok"}'], "no 'prompt' or 'messages' column"),
        (['{"prompt": "ok", "answer": ""}'], r"row 1: field 'answer'"),
        (["[1, 2]"], "line 1: expected a JSON object"),
        ([""], "no rows"),
    ],
)
def test_malformed_jsonl_names_file_row_and_field(tmp_path, lines, message):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        read_prompts_file(path)


def test_parquet_prompts_and_bad_parquet(tmp_path):
    good = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": ["a", "b"], "answer": ["1", "2"]}).to_parquet(good)
    assert read_prompts_file(good)["prompt"] == ["a", "b"]
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(DataError, match="cannot be read as Parquet"):
        read_prompts_file(bad)
    with pytest.raises(DataError, match="not found"):
        read_prompts_file(tmp_path / "missing.jsonl")


def test_unreadable_prompt_files_name_the_file(tmp_path):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"prompt": "caf\u00e9", "answer": "1"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=f"{latin1}: not valid UTF-8"):
        read_prompts_file(latin1)
    folder = tmp_path / "prompts.jsonl"
    folder.mkdir()
    with pytest.raises(DataError, match=f"{folder}: is a directory"):
        read_prompts_file(folder)
    good = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": [f"q{i}" for i in range(200)], "answer": ["1"] * 200}).to_parquet(good)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match=f"{truncated}: cannot be read as Parquet"):
        read_prompts_file(truncated)


def test_a_file_without_read_permission_names_the_file(tmp_path):
    import os

    locked = tmp_path / "locked.jsonl"
    locked.write_text('{"prompt": "q", "answer": "1"}\n')
    locked.chmod(0)
    if os.access(locked, os.R_OK):
        pytest.skip("running as root: file permissions do not stop reads here")
    with pytest.raises(DataError, match=f"{locked}: cannot be read"):
        read_prompts_file(locked)


def test_single_digit_operands_keep_the_first_two_digit_and_values_in_range():
    rng = random.Random(3)
    for _ in range(200):
        prompt, chain = make_problem(rng, 1, 3, (1, 9))
        assert 10 <= chain[0] <= 99 and all(1 <= b <= 9 for _, b in chain[1:])
        assert all(0 <= r <= 99 for *_, r in solve(chain)) and 1 <= len(chain) - 1 <= 3
    assert len(longest_prompt(3)) >= max(len(make_problem(rng, 3, 3, (10, 99))[0]) for _ in range(50))


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_small_operand_fraction_mixes_single_digit_chains_in_that_share(fraction):
    rng = random.Random(5)
    chains = [make_problem(rng, 2, 3, (10, 99), fraction)[1] for _ in range(2000)]
    small = [all(b <= 9 for _, b in c[1:]) for c in chains]
    # Every chain is all-small or all-two-digit, never a mix.
    assert all(s or all(b >= 10 for _, b in c[1:]) for s, c in zip(small, chains))
    assert sum(small) / len(small) == pytest.approx(fraction, abs=0.03)
