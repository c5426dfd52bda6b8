"""Prompt sources: the embedded arithmetic task and users' own JSONL/Parquet prompt files.

The arithmetic task is what makes the default pipeline verifiable offline: every prompt has
an exact answer, and the reference traces are deliberately stochastic (openers, phrasing,
optional check lines) so that sampled traces vary the way a real model's do.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from typing import TYPE_CHECKING

from .errors import BvpoError

if TYPE_CHECKING:  # datasets costs ~0.8 s to import; validating params needs only the task's text
    from datasets import Dataset, DatasetDict

OPENERS = ("", "", "Let me see.", "Step by step.", "OK.")
STEP_FORMS = ("{a}{op}{b}={r}",)
CLOSERS = ("", "", "so {ans}", "answer {ans}")


SMALL_OPERANDS = (1, 9)


class DataError(BvpoError, ValueError):
    """A prompts file is missing or malformed. The message names the file, row and field."""


def make_problem(rng: random.Random, min_ops: int, max_ops: int,
                 operands: tuple[int, int] = (10, 99), small_fraction: float = 0.0) -> tuple[str, list]:
    """One chain whose first operand has two digits and whose running value stays within
    0..99; the later operands are drawn from `operands` (inclusive), or, for a
    `small_fraction` share of chains, from 1..9: (prompt text, [operand, (op, operand), ...])."""
    n_ops = rng.randint(min_ops, max_ops)
    if small_fraction > 0 and rng.random() < small_fraction:
        operands = SMALL_OPERANDS
    first = rng.randint(10, 99)
    chain: list = [first]
    value = first
    while len(chain) <= n_ops:
        op, b = rng.choice("+-"), rng.randint(*operands)
        result = value + b if op == "+" else value - b
        if not 0 <= result <= 99:
            continue
        value = result
        chain.append((op, b))
    expr = str(first) + "".join(f"{op}{b}" for op, b in chain[1:])
    return prompt_text(expr), chain


def longest_prompt(max_ops: int) -> str:
    """The longest prompt `make_problem` can write with `max_ops` operations (every operand
    has two digits), for checking that prompts and samples fit the model's context."""
    return prompt_text("10" + "+10" * max_ops)


def prompt_text(expression: str) -> str:
    return f"Compute {expression}."


def solve(chain: list) -> list[tuple[int, str, int, int]]:
    """The chain's steps, left to right: (a, op, b, result)."""
    steps, acc = [], chain[0]
    for op, b in chain[1:]:
        result = acc + b if op == "+" else acc - b
        steps.append((acc, op, b, result))
        acc = result
    return steps


def make_trace(rng: random.Random, chain: list) -> str:
    """A stochastic reasoning trace, one line per step (opener, phrasing, an optional check
    line and closer vary), short enough that a tiny model can write it within budget."""
    steps = solve(chain)
    lines = []
    opener = rng.choice(OPENERS)
    if opener:
        lines.append(opener)
    for a, op, b, r in steps:
        lines.append(rng.choice(STEP_FORMS).format(a=a, op=op, b=b, r=r))
    if rng.random() < 0.3:
        a, op, b, r = steps[-1]
        lines.append(f"check {r}{'-' if op == '+' else '+'}{b}={a}")
    closer = rng.choice(CLOSERS)
    if closer:
        lines.append(closer.format(ans=steps[-1][3]))
    return "\n".join(lines)


def synthetic_prompts(n_train: int, n_test: int, min_ops: int, max_ops: int, seed: int,
                      operands: tuple[int, int] = (10, 99), small_fraction: float = 0.0) -> DatasetDict:
    """Disjoint train/test prompt sets with exact answers, from one seeded generator."""
    from datasets import Dataset, DatasetDict

    rng = random.Random(f"bvpo-task-{seed}")
    seen: set[str] = set()
    rows: list[dict] = []
    attempts = 0
    while len(rows) < n_train + n_test:
        attempts += 1
        if attempts > 50 * (n_train + n_test):
            raise DataError("synthetic task: could not draw enough distinct prompts")
        prompt, chain = make_problem(rng, min_ops, max_ops, operands, small_fraction)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "answer": str(solve(chain)[-1][3])})
    return DatasetDict(
        train=Dataset.from_list(rows[n_test:]),
        test=Dataset.from_list(rows[:n_test]),
    )


def warmup_examples(
    n: int, test_prompts: set[str], min_ops: int, max_ops: int, seed: int,
    operands: tuple[int, int] = (10, 99), small_fraction: float = 0.0,
) -> list[tuple[str, str, list]]:
    """`n` distinct SFT problems (prompt, answer, trace) that never repeat a test prompt."""
    rng = random.Random(f"bvpo-warmup-{seed}")
    seen = set(test_prompts)
    out = []
    while len(out) < n:
        prompt, chain = make_problem(rng, min_ops, max_ops, operands, small_fraction)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append((prompt, str(solve(chain)[-1][3]), chain))
    return out


ROLES = ("system", "user", "assistant")


def _check_messages(path: Path, i: int, messages) -> list[dict]:
    """A chat prompt: a list of {role, content} turns that ends with the user's."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{path}, row {i}: field 'messages' must be a non-empty list of {{role, content}} turns, "
                        f"got {messages!r}")
    for turn in messages:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str) \
                or not turn["content"].strip():
            raise DataError(f"{path}, row {i}: field 'messages' must hold turns like {{\"role\": \"user\", "
                            f"\"content\": \"...\"}} (role one of {', '.join(ROLES)}, non-empty content), got {turn!r}")
    if messages[-1]["role"] != "user":
        raise DataError(f"{path}, row {i}: field 'messages' must end with a user turn (the model answers it), "
                        f"ends with {messages[-1]['role']!r}")
    return [{"role": turn["role"], "content": turn["content"]} for turn in messages]


def prompt_key(prompt: str | list[dict]) -> str:
    """A prompt as a hashable key (a chat is a list), for de-duplication and held-out checks."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def with_system_prompt(prompt: str | list[dict], system_prompt: str | None) -> str | list[dict]:
    """`prompt` as a chat that starts with `system_prompt` (unless it has a system turn already)."""
    if system_prompt is None:
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def _check_row(path: Path, i: int, row: dict) -> dict:
    """Validate one prompts row (1-based `i`); numbers in `answer` become text."""
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        row = {**row, "prompt": _check_messages(path, i, prompt)}
    elif not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{path}, row {i}: field 'prompt' must be non-empty text, got {prompt!r}")
    if "answer" in row:
        answer = row["answer"]
        if answer is None or isinstance(answer, (bool, dict, list)) or str(answer).strip() == "":
            raise DataError(f"{path}, row {i}: field 'answer' must be text or a number, got {answer!r}")
        row = {**row, "answer": str(answer)}
    return row


def read_prompts_file(path: str | Path, prompt_columns: tuple[str, ...] = ("prompt", "messages")) -> Dataset:
    """Load a user's prompts (.jsonl or .parquet), refusing malformed rows with a clear error.

    Required: `prompt`, non-empty text, or `messages`, a chat (a list of {role, content} turns
    ending with the user's); the first of `prompt_columns` present becomes `prompt` (benchmark
    files such as MATH-500 call it `problem`, GSM8K `question`). Optional: `answer` (text or
    number, used by the verified reward). Other columns are kept as they are.
    """
    from datasets import Dataset

    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a .jsonl or .parquet prompts file")
    if not path.is_file():
        raise DataError(f"{path}: prompts file not found")
    if path.suffix == ".jsonl":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not valid UTF-8 text (byte {err.start}); save the file as UTF-8") from None
        except OSError as err:
            raise DataError(f"{path}: cannot be read ({err.strerror})") from None
        rows = []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {i}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {i}: expected a JSON object with a 'prompt' field")
            rows.append(row)
        if not rows:
            raise DataError(f"{path}: no rows (expected one JSON object per line)")
    elif path.suffix == ".parquet":
        try:
            with open(path, "rb"):
                pass
        except OSError as err:
            raise DataError(f"{path}: cannot be read ({err.strerror})") from None
        try:
            rows = Dataset.from_parquet(str(path)).to_list()
        except Exception as err:  # pyarrow raises many kinds (truncated, not parquet): all unreadable
            raise DataError(f"{path}: cannot be read as Parquet ({type(err).__name__}: {err})") from None
    else:
        raise DataError(f"{path}: expected a .jsonl or .parquet file")
    column = next((c for c in prompt_columns if any(c in row for row in rows)), None)
    if column is None:
        raise DataError(f"{path}: no {' or '.join(repr(c) for c in prompt_columns)} column "
                        f"(columns: {sorted(rows[0]) if rows else []})")
    if column != "prompt":
        rows = [{"prompt": row.pop(column, None), **row} for row in rows]
    rows = [_check_row(path, i, row) for i, row in enumerate(rows, start=1)]
    if any("answer" in row for row in rows) and not all("answer" in row for row in rows):
        missing = next(i for i, row in enumerate(rows, start=1) if "answer" not in row)
        raise DataError(f"{path}, row {missing}: field 'answer' missing (other rows have one)")
    try:
        return Dataset.from_list(rows)
    except Exception as err:  # e.g. a column holding text in one row and a number in another
        raise DataError(f"{path}: columns must have one type each ({err})") from None


INBOX_SUFFIXES = (".jsonl", ".parquet")


def inbox_files(inbox: str | Path) -> list[Path]:
    """The prompts files in the inbox folder, sorted by name (the order rounds read them in)."""
    inbox = Path(inbox)
    return sorted(p for p in inbox.iterdir() if p.suffix in INBOX_SUFFIXES) if inbox.is_dir() else []


def read_inbox(inbox: str | Path, test_prompts: set[str], needs_answer: bool) -> tuple[Dataset | None, dict]:
    """Every prompts file dropped into the inbox folder (sorted by name, so the order is
    reproducible), as one dataset of `prompt` (+ `answer`) rows. Prompts that are also held-out
    test prompts (`test_prompts`: their `prompt_key`s) are dropped (evaluation stays clean across
    rounds) and counted; other files (README, .gitkeep) are ignored. Returns (None, stats) when
    no prompts arrived."""
    from datasets import Dataset

    files = inbox_files(inbox)
    rows, dropped = [], 0
    for path in files:
        dataset = read_prompts_file(path)
        if needs_answer and "answer" not in dataset.column_names:
            raise DataError(f"{path}: no 'answer' column; the other training prompts have answers and "
                            f"the verified reward needs one per prompt")
        for row in dataset:
            if prompt_key(row["prompt"]) in test_prompts:
                dropped += 1
                continue
            rows.append({"prompt": row["prompt"], **({"answer": row["answer"]} if needs_answer else {})})
    stats = {"inbox_files": len(files), "inbox_prompts": len(rows), "inbox_dropped_test_prompts": dropped}
    return (Dataset.from_list(rows) if rows else None), stats
