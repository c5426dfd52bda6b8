"""Scoring models on held-out prompts and benchmarks: accuracy in both modes, greedy and
sampled, and the reward-model judgements (mean score, win rate against the starting model).

Pure functions of a loaded model and its prompts; the evaluate stage (`stages.evaluate`) loads
the models, calls these and writes the files.
"""

from __future__ import annotations

from pathlib import Path

from .config import Params
from .modes import MODES, mode_name


def accuracy(generated: list, answers: list[str], thinking: bool) -> tuple[list[float], list[float]]:
    """Per prompt, the share of its completions (generated prompt-major: all prompts, then all
    again) with a verified answer (invalid ones count as wrong), and the share invalid."""
    from .rewards import verified_reward
    from .sequences import parse_completion

    correct, invalid = [0.0] * len(answers), [0.0] * len(answers)
    repeats = len(generated) // len(answers)
    for i, g in enumerate(generated):
        parsed = parse_completion(g.text, thinking)
        if g.truncated or parsed.malformed:
            invalid[i % len(answers)] += 1 / repeats
            continue
        correct[i % len(answers)] += verified_reward(parsed.answer, answers[i % len(answers)]) / repeats
    return correct, invalid


def shown_answers(generated: list, thinking: bool) -> list[str | None]:
    """The final answer each completion shows the user (trace removed); None where it is invalid
    (truncated, or malformed in its mode)."""
    from .sequences import parse_completion

    parsed = [parse_completion(g.text, thinking) for g in generated]
    return [None if g.truncated or p.malformed else p.answer for g, p in zip(generated, parsed)]


def score_prompts(model, tokenizer, prompts: list[str], answers: list[str], params: Params,
                  label: str, final: dict | None = None, gold: bool = False) -> dict[str, list[float]]:
    """Per prompt, in both modes: greedy accuracy, its length and whether it was invalid, with
    `gold` the judged task's gold grade (`gold_*`), and (evaluate.n_samples > 0) the sampled
    accuracy (and gold grade). `summarize` turns any subset into eval.json's entry. `final`, when given, receives
    the greedy final answers per mode (None where invalid), for a reward model to judge."""
    import torch

    from .judged import gold_reward
    from .sequences import generate

    e = params.evaluate
    scores = {}
    for thinking in (True, False):
        mode = mode_name(thinking)
        generated = generate(model, tokenizer, prompts, thinking, e.max_new_tokens, e.batch_size, greedy=True,
                             desc=f"evaluate {label} ({mode})", kv_cache=params.sample.kv_cache)
        scores[f"accuracy_{mode}"], scores[f"invalid_{mode}"] = accuracy(generated, answers, thinking)
        scores[f"length_{mode}"] = [float(g.n_tokens) for g in generated]
        shown = shown_answers(generated, thinking)
        if gold:
            scores[f"gold_{mode}"] = [0.0 if a is None else gold_reward(a, answer) for a, answer in zip(shown, answers)]
        if final is not None:
            final[mode] = shown
        if e.n_samples:
            # The same RNG stream for every model, so models differ by their weights only.
            torch.manual_seed(params.seed + (0 if thinking else 1))
            sampled = generate(model, tokenizer, prompts * e.n_samples, thinking, e.max_new_tokens, e.batch_size,
                               temperature=e.temperature, desc=f"evaluate {label} ({mode}, {e.n_samples} samples)",
                               kv_cache=params.sample.kv_cache)
            scores[f"accuracy_{mode}_sampled"], _ = accuracy(sampled, answers, thinking)
            if gold:  # per prompt, the mean over its samples (generated prompt-major, as above)
                grades = [0.0 if a is None else gold_reward(a, answer) for a, answer
                          in zip(shown_answers(sampled, thinking), answers * e.n_samples)]
                scores[f"gold_{mode}_sampled"] = [sum(grades[i::len(answers)]) / e.n_samples
                                                  for i in range(len(answers))]
    return scores


def summarize(scores: dict[str, list[float]]) -> dict[str, float]:
    """eval.json's entry from per-prompt columns: means of accuracy and reward (greedy, sampled),
    mean length and invalid rate per mode, the two-mode means, and the number of prompts."""
    entry = {}
    for key, values in scores.items():
        mean = sum(values) / len(values)
        if key.startswith("length_"):
            entry[f"mean_length_{key.removeprefix('length_')}"] = mean
        elif key.startswith("invalid_"):
            entry[f"invalid_rate_{key.removeprefix('invalid_')}"] = mean
        else:
            entry[key] = mean
    for kind in ("accuracy", "reward", "gold"):
        for suffix in ("", "_sampled"):
            if f"{kind}_think{suffix}" in entry:
                entry[f"{kind}_mean{suffix}"] = (entry[f"{kind}_think{suffix}"] + entry[f"{kind}_nothink{suffix}"]) / 2
    entry["n_prompts"] = len(next(iter(scores.values())))
    return entry


def selection_split(prompts: list, fraction: float) -> tuple[list[int], list[int]]:
    """Indices of the held-out prompts that decide promotions (selection) and of those whose
    scores are reported (report). A prompt selects when the SHA-256 of its text, read as a number
    in [0, 1), is below `fraction`: it keeps its side whatever other prompts are added, removed
    or reordered, so a prompt that ever picked a champion never reports a score (scores reported
    on the prompts that picked the champion flatter it: the winner's curse). A set so small that
    every prompt falls on one side is split by rank instead, at least one prompt each."""
    import hashlib
    import json

    def position(prompt) -> float:
        # A chat hashes by its user turns: a changed system prompt moves no prompt across.
        if isinstance(prompt, list):
            prompt = [turn.get("content") for turn in prompt if turn.get("role") == "user"]
        digest = hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    positions = [position(p) for p in prompts]
    selects = [x < fraction for x in positions]
    if 0 < fraction and len(prompts) >= 2 and (all(selects) or not any(selects)):
        # A handful of prompts can all fall on one side: then the round(n * fraction) lowest
        # positions select (at least one prompt on each side).
        k = min(max(round(len(prompts) * fraction), 1), len(prompts) - 1)
        chosen = set(sorted(range(len(prompts)), key=positions.__getitem__)[:k])
        selects = [i in chosen for i in range(len(prompts))]
    return [i for i, s in enumerate(selects) if s], [i for i, s in enumerate(selects) if not s]


def subset(columns: dict[str, list], indices: list[int]) -> dict[str, list]:
    return {key: [values[i] for i in indices] for key, values in columns.items()}


def final_answers(model, tokenizer, prompts: list, params: Params, label: str) -> tuple[dict[str, list], dict]:
    """Greedy final answers (trace removed) in both modes, None where the completion is invalid;
    and per prompt their length and whether they were invalid (`summarize` columns)."""
    from .sequences import generate

    e, out, stats = params.evaluate, {}, {}
    for thinking in (True, False):
        mode = mode_name(thinking)
        generated = generate(model, tokenizer, prompts, thinking, e.max_new_tokens, e.batch_size, greedy=True,
                             desc=f"answers {label} ({mode})", kv_cache=params.sample.kv_cache)
        out[mode] = shown_answers(generated, thinking)
        stats[f"length_{mode}"] = [float(g.n_tokens) for g in generated]
        stats[f"invalid_{mode}"] = [float(a is None) for a in out[mode]]
    return out, stats


def judge_answers(answers: dict[str, dict[str, list]], prompts: list, judge: str,
                  params: Params) -> dict[tuple[str, str], list]:
    """The reward model's score of every (model, mode) answer to every prompt; None where the
    answer is invalid (never shown to the judge)."""
    from .modeling import pick_device
    from .rewards import load_reward_model

    model = load_reward_model(judge, params, str(pick_device()))
    scores = {}
    for name, by_mode in answers.items():
        for mode, texts in by_mode.items():
            valid = [i for i, t in enumerate(texts) if t is not None]
            judged = model.score([prompts[i] for i in valid], [texts[i] for i in valid], params.pairs.reward_batch_size)
            column = [None] * len(texts)
            for i, value in zip(valid, judged):
                column[i] = value
            scores[(name, mode)] = column
    return scores


def win_rates(scores: dict[tuple[str, str], list], models: list[str], prefix: str = "") -> dict[str, dict[str, float]]:
    """Each model's reward-model win rate against `base` per mode: the share of prompts where the
    judge scores its answer above base's (ties half; an invalid answer loses to a valid one)."""

    def beats(a: float | None, b: float | None) -> float:
        if a is None or b is None:
            return 0.5 if a is None and b is None else float(b is None)
        return 1.0 if a > b else 0.5 if a == b else 0.0

    return {name: {f"{prefix}win_rate_{mode}": sum(beats(a, b) for a, b in zip(scores[(name, mode)], scores[("base", mode)]))
                   / len(scores[("base", mode)]) for mode in MODES}
            for name in models if name != "base"}


def proxy_gold_gaps(reward_rates: dict[str, dict[str, float]], gold_rates: dict[str, dict[str, float]]) -> dict:
    """Per model and mode, the reward model's win rate against `base` minus the gold scorer's:
    how much better the proxy thinks the model got than it did (over-optimisation shows as > 0)."""
    return {name: {f"proxy_gold_gap_{mode}": rates[f"reward_win_rate_{mode}"] - gold_rates[name][f"gold_win_rate_{mode}"]
                   for mode in MODES} for name, rates in reward_rates.items()}


def reward_scores(scores: dict[tuple[str, str], list], models: list[str]) -> dict[str, dict[str, list[float]]]:
    """Per-prompt reward of each model's greedy answers, an invalid answer scored as the worst
    answer the judge saw in this evaluation (so a model cannot gain by writing nothing)."""
    seen = [v for column in scores.values() for v in column if v is not None]
    floor = min(seen, default=0.0)
    return {name: {f"reward_{mode}": [floor if v is None else v for v in scores[(name, mode)]]
                   for mode in MODES} for name in models}


def with_instruction(prompt, instruction: str | None):
    """A benchmark prompt with the answer instruction appended to its (last) user turn."""
    if instruction is None:
        return prompt
    if isinstance(prompt, str):
        return f"{prompt}\n\n{instruction}"
    return [*prompt[:-1], {**prompt[-1], "content": f"{prompt[-1]['content']}\n\n{instruction}"}]


def benchmark_sets(root: Path, params: Params) -> dict[str, tuple[list, list[str]]]:
    """Each benchmark's prompts (system prompt and answer instruction applied) and answers."""
    from .data import DataError, read_prompts_file, with_system_prompt

    out = {}
    for bench, path in params.evaluate.benchmarks.items():
        rows = read_prompts_file(root / path, prompt_columns=("prompt", "problem", "question", "messages"))
        if "answer" not in rows.column_names:
            raise DataError(f"evaluate.benchmarks.{bench}: {root / path} has no 'answer' column to check against")
        prompts = [with_system_prompt(with_instruction(p, params.evaluate.answer_instruction),
                                      params.data.system_prompt) for p in rows["prompt"]]
        out[bench] = (prompts, list(rows["answer"]))
    return out
