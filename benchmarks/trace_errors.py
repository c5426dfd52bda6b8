"""Where thinking-mode errors happen on the embedded arithmetic task: a wrong step inside the
trace, or a right trace whose final answer does not copy the trace's result.

    python benchmarks/trace_errors.py [--project-dir .] NAME=MODEL_DIR [NAME=MODEL_DIR ...]

Greedy decoding on the held-out prompts of data/prompts (the `evaluate` stage's), thinking on,
`evaluate.max_new_tokens` from params.yaml. A trace's result is the last `=N` before any
`check` line (the warmup traces end with an optional verification step). Prints, per model,
the share of prompts answered right, "right trace, different answer", "wrong trace", and
completions without a closed think block. Analysis for the README's Experiments section; the
embedded task only (it parses the trace format the warmup teaches).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

RESULT = re.compile(r"=(-?\d+)")


def classify(completion: str, answer: str, close: str = "</think>") -> str:
    if close not in completion:
        return "unclosed"
    trace, tail = completion.split(close, 1)
    final = re.sub(r"<\|[^|]*\|>", "", tail).strip()
    results = RESULT.findall(trace.split("check")[0])
    if final == answer:
        return "right"
    if results and results[-1] == answer:
        return "right_trace_wrong_answer"
    return "wrong_trace"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project-dir", default=".")
    parser.add_argument("models", nargs="+", metavar="NAME=MODEL_DIR")
    args = parser.parse_args()

    import torch
    from datasets import load_from_disk

    from bvpo.config import load_params
    from bvpo.modeling import load_model, load_tokenizer, render_prompt

    root = Path(args.project_dir)
    params = load_params(root / "params.yaml")
    test = load_from_disk(str(root / "data/prompts"))["test"]
    prompts, answers = test["prompt"], [str(a) for a in test["answer"]]
    for spec in args.models:
        name, _, model_dir = spec.partition("=")
        tokenizer = load_tokenizer(model_dir)
        tokenizer.padding_side = "left"
        model = load_model(model_dir).eval()
        counts = dict.fromkeys(("right", "right_trace_wrong_answer", "wrong_trace", "unclosed"), 0)
        batch = params.evaluate.batch_size
        for start in range(0, len(prompts), batch):
            texts = [render_prompt(tokenizer, p, True) for p in prompts[start:start + batch]]
            encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**encoded, max_new_tokens=params.evaluate.max_new_tokens, do_sample=False)
            width = encoded["input_ids"].shape[1]
            for row, answer in zip(out, answers[start:start + batch]):
                counts[classify(tokenizer.decode(row[width:], skip_special_tokens=False), answer)] += 1
        shares = "  ".join(f"{key} {100 * n / len(prompts):.1f}%" for key, n in counts.items())
        print(f"{name}: {shares}", flush=True)


if __name__ == "__main__":
    main()
