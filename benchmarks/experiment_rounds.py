"""More on-policy rounds after `bvpo experiment`: each method's newest model samples again, is
paired and trained from its own weights (policy and reference), and is evaluated, per seed.

    python benchmarks/experiment_rounds.py [--project-dir .] [--rounds 2] [--methods bvpo,nll_control]

Round 1 is the finished experiment: its DVC experiments (`<experiment.name>-seed<N>`) hold the
prompts, the base model and every method's trained model; they are read back from the DVC
cache at those commits. Each later round runs the ordinary stages (`bvpo stage sample`,
`pairs`, `train`, `evaluate`) in a folder per round, seed and method
(`data/experiment_rounds/round<R>/seed<N>-<method>`) on that model, always (no registry, no
promotion gate), with `sample.seed` = seed + R − 1 (new samples each round) and
`train.seed` = seed. A folder whose evaluation exists under the same params is reused, so a
longer run extends a shorter one. Gradient telemetry is off for fixed-α methods (their
objective does not use it; it costs time). Prints and writes data/experiment_rounds/rounds.{json,md},
the experiment's table over `<method>@r<R>`: means and 95% intervals over seeds, and paired
differences against the first method's last round. An analysis for the README's Experiments
section.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml


def round_params(fs, method: str, seed: int, round_number: int) -> str:
    params = yaml.safe_load(fs.read_text("params.yaml"))
    method_config = params["train"]["methods"][method]
    params["train"]["methods"] = {method: method_config}
    params["train"]["seed"] = seed
    params["train"]["telemetry"] = method_config.get("alpha") == "auto"
    params["sample"]["seed"] = seed + round_number - 1
    params["tracking"]["register_method"] = method
    return yaml.safe_dump(params, sort_keys=False)


def run_round(fs, start_model: str | Path, method: str, seed: int, round_number: int, work: Path) -> dict:
    """The round's evaluation (metrics/eval.json) of `method` trained from `start_model`."""
    params_text = round_params(fs, method, seed, round_number)
    done = work / "metrics/eval.json"
    if done.is_file() and (work / "params.yaml").read_text() == params_text:
        print(f"round {round_number}, seed {seed}, {method}: done earlier, reused", flush=True)
        return json.loads(done.read_text())
    if work.exists():
        shutil.rmtree(work)
    (work / "data").mkdir(parents=True)
    for path in ("data/prompts", "data/base_model", "data/champion.json"):
        fs.get(path, str(work / path), recursive=True)
    if isinstance(start_model, Path):
        shutil.copytree(start_model, work / "data/policy")
    else:
        fs.get(start_model, str(work / "data/policy"), recursive=True)
    (work / "params.yaml").write_text(params_text)
    for stage in ("sample", "pairs", "train", "evaluate"):
        print(f"round {round_number}, seed {seed}, {method}: {stage}", flush=True)
        subprocess.run([sys.executable, "-m", "bvpo.cli", "--project-dir", str(work), "stage", stage,
                        "--params", str(work / "params.yaml")], check=True)
    return json.loads(done.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project-dir", default=".")
    parser.add_argument("--rounds", type=int, default=2, help="rounds in all, the experiment being round 1")
    parser.add_argument("--methods", default="bvpo,nll_control", help="comma-separated; the first is the reference")
    args = parser.parse_args()

    from dvc.api import DVCFileSystem

    from bvpo.config import load_params
    from bvpo.experiment import ExperimentError, aggregate, markdown_table, run_name, run_ref

    root = Path(args.project_dir).resolve()
    out = root / "data/experiment_rounds"
    params = load_params(root / "params.yaml")
    methods = args.methods.split(",")
    per_seed: dict[int, dict[str, dict]] = {}
    for seed in params.experiment.seeds:
        try:
            fs = DVCFileSystem(str(root), rev=run_ref(root, run_name(params, seed)))
        except ExperimentError as err:
            sys.exit(f"experiment_rounds: {err}; run `bvpo experiment` first")
        per_seed[seed] = {}
        for method in methods:
            start: str | Path = f"data/models/{method}"
            for round_number in range(2, args.rounds + 1):
                work = out / f"round{round_number}" / f"seed{seed}-{method}"
                results = run_round(fs, start, method, seed, round_number, work)
                if round_number == 2:
                    per_seed[seed][f"{method}@r1"] = results["base"]
                per_seed[seed][f"{method}@r{round_number}"] = results[method]
                start = work / "data/models" / method
    order = [f"{m}@r{r}" for m in methods for r in range(1, args.rounds + 1)]
    per_seed = {seed: {name: models[name] for name in order} for seed, models in per_seed.items()}
    result = aggregate(per_seed, f"{methods[0]}@r{args.rounds}")
    table = markdown_table(result, f"{params.experiment.name}, {args.rounds} rounds")
    (out / "rounds.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "rounds.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
