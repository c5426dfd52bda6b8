"""Sampling throughput: generated tokens/s, one prompt at a time vs batched, in both modes; and
the whole sample stage (both modes, k per prompt, sharded) on 1 process vs 2.

    python benchmarks/sampling_throughput.py [--project-dir .] [--prompts 256] [--one-by-one 32]
                                             [--stage-processes 1,2]

Uses the project's data/base_model when a pipeline run left it (a trained model stops at its
EOS, as in the sample stage); otherwise a fresh embedded-size model, which rarely stops, so
every row runs to `max_new_tokens`. Sampling at T=1, `sample.max_new_tokens` and
`sample.batch_size` from the project's params.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project-dir", default=".")
    parser.add_argument("--prompts", type=int, default=256, help="prompts for the batched runs")
    parser.add_argument("--one-by-one", type=int, default=32, help="prompts for the batch-size-1 runs")
    parser.add_argument("--stage-processes", default="1,2",
                        help="process counts for the sample-stage timing ('' to skip it; needs a `make run` first)")
    args = parser.parse_args()

    import torch

    from bvpo.chat import build_tokenizer
    from bvpo.config import load_params
    from bvpo.data import synthetic_prompts
    from bvpo.modeling import build_tiny_model, load_model, load_tokenizer
    from bvpo.runtime import configure_environment
    from bvpo.sequences import generate

    configure_environment()
    root = Path(args.project_dir)
    params = load_params(root / "params.yaml")
    base = root / "data" / "base_model"
    if base.exists():
        tokenizer, model, source = load_tokenizer(base), load_model(base), str(base)
    else:
        tokenizer = build_tokenizer()
        m = params.model
        model = build_tiny_model(tokenizer, m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size,
                                 m.max_length, params.seed)
        source = "fresh embedded-size model (no data/base_model)"
    d = params.data
    prompts = list(synthetic_prompts(args.prompts, 0, d.min_ops, d.max_ops, 0, (d.min_operand, d.max_operand), d.small_operand_fraction)["train"]["prompt"])
    s = params.sample
    print(f"model: {source}; max_new_tokens {s.max_new_tokens}; {torch.get_num_threads()} threads")
    print(f"{'mode':8s} {'batch':>6s} {'prompts':>8s} {'tokens':>8s} {'seconds':>8s} {'tokens/s':>9s}")
    for thinking in (True, False):
        rates = {}
        for batch_size, n in ((1, args.one_by_one), (s.batch_size, args.prompts)):
            torch.manual_seed(0)
            start = time.perf_counter()
            out = generate(model, tokenizer, prompts[:n], thinking, s.max_new_tokens, batch_size,
                           temperature=s.temperature, top_p=s.top_p)
            elapsed = time.perf_counter() - start
            tokens = sum(g.n_tokens for g in out)
            rates[batch_size] = tokens / elapsed
            print(f"{'think' if thinking else 'nothink':8s} {batch_size:6d} {n:8d} {tokens:8d} {elapsed:8.2f} "
                  f"{tokens / elapsed:9.0f}")
        print(f"{'':8s} batched / one-by-one: {rates[s.batch_size] / rates[1]:.1f}x")


    if args.stage_processes and (root / "data" / "policy").is_dir():
        stage_timing(root, [int(n) for n in args.stage_processes.split(",")])


def stage_timing(root: Path, counts: list[int]) -> None:
    """The sample stage as the pipeline runs it, on a copy of the project's prompts and policy."""
    import os
    import shutil
    import tempfile

    import yaml
    from datasets import load_from_disk

    from bvpo.config import load_params
    from bvpo.stages import run_stage
    from bvpo.tracking import tracking_uri

    print("\nsample stage (both modes, k per prompt), processes vs generated tokens/s:")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp)
        for part in ("data/prompts", "data/policy"):
            shutil.copytree(root / part, copy / part)
        (copy / "data" / "incoming").mkdir()
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri(copy)
        raw = yaml.safe_load((root / "params.yaml").read_text())
        for n in counts:
            raw["sample"]["num_processes"] = n
            params_file = copy / f"params-{n}.yaml"
            params_file.write_text(yaml.safe_dump(raw))
            shutil.rmtree(copy / "data" / "samples", ignore_errors=True)
            start = time.perf_counter()
            run_stage("sample", load_params(params_file), copy, params_file)
            seconds = time.perf_counter() - start
            tokens = sum(load_from_disk(str(copy / "data" / "samples"))["n_tokens"])
            print(f"  {n} process{'es' if n > 1 else ''}: {tokens} tokens in {seconds:.1f} s = "
                  f"{tokens / seconds:.0f} tokens/s (model loading and process start included)", flush=True)


if __name__ == "__main__":
    main()
