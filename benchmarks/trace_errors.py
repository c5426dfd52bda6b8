"""Where thinking-mode errors happen on the embedded arithmetic task: a wrong step inside the
trace, or a right trace whose final answer does not copy the trace's result.

    python benchmarks/trace_errors.py [--project-dir .] NAME=MODEL_DIR [NAME=MODEL_DIR ...]

Greedy decoding on the held-out prompts of data/prompts (the `evaluate` stage's), thinking on,
`evaluate.max_new_tokens` from params.yaml. A trace's result is the last `=N` before any
`check` line (the warmup traces end with an optional verification step). Prints, per model,
the share of prompts answered right (verified as the `evaluate` stage does), "right trace,
different answer", "wrong trace", and invalid completions (think block never closed, or cut
at the length limit). Analysis for docs/results.md's experiments; the
embedded task only (it parses the trace format the warmup teaches).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

RESULT = re.compile(r"=(-?\d+)")


def classify(generated, answer: str) -> str:
    """Scored as the evaluate stage scores (parse, verified reward), then split by the trace."""
    from bvpo.rewards import verified_reward
    from bvpo.sequences import parse_completion

    parsed = parse_completion(generated.text, thinking=True)
    if generated.truncated or parsed.malformed:
        return "invalid"
    if verified_reward(parsed.answer, answer):
        return "right"
    results = RESULT.findall(parsed.trace.split("check")[0])
    return "right_trace_wrong_answer" if results and results[-1] == answer else "wrong_trace"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project-dir", default=".")
    parser.add_argument("models", nargs="+", metavar="NAME=MODEL_DIR")
    args = parser.parse_args()

    from datasets import load_from_disk

    from bvpo.config import load_params
    from bvpo.modeling import load_model, load_tokenizer
    from bvpo.sequences import generate

    root = Path(args.project_dir)
    params = load_params(root / "params.yaml")
    test = load_from_disk(str(root / "data/prompts"))["test"]
    prompts, answers = test["prompt"], [str(a) for a in test["answer"]]
    e = params.evaluate
    for spec in args.models:
        name, _, model_dir = spec.partition("=")
        model, tokenizer = load_model(model_dir).eval(), load_tokenizer(model_dir)
        generated = generate(model, tokenizer, prompts, True, e.max_new_tokens, e.batch_size, greedy=True,
                             desc=f"generate {name}")
        counts = dict.fromkeys(("right", "right_trace_wrong_answer", "wrong_trace", "invalid"), 0)
        for g, answer in zip(generated, answers):
            counts[classify(g, answer)] += 1
        shares = "  ".join(f"{key} {100 * n / len(prompts):.1f}%" for key, n in counts.items())
        print(f"{name}: {shares}", flush=True)


if __name__ == "__main__":
    main()
