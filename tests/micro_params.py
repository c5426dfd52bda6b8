"""A micro configuration of the real pipeline: every stage runs, in seconds."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

MICRO = {
    "data": {"n_train": 24, "n_test": 12, "n_warmup": 300, "min_ops": 1, "max_ops": 2, "min_operand": 10,
             "max_operand": 99},
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "max_length": 96},
    "warmup": {"steps": 30, "batch_size": 32, "lr": 1.0e-2},
    "sample": {"k": 3, "max_new_tokens": 40, "batch_size": 128},
    # Trained only by the judged task (data.task: judged).
    "reward_model": {"comparisons": 512, "held_out": 64, "steps": 30, "batch_size": 16, "lr": 1.0e-3},
    "pairs": {"reward": "graded"},
    "train": {"steps": 3, "batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1, "lr": 1.0e-3,
              "alpha_every": 2, "alpha_draws": 2, "alpha_draw_size": 2,
              "methods": {"bvpo": {"alpha": 0.5}, "bvpo_auto": {"alpha": "auto"},
                          "dpo_think": {"alpha": 1.0}, "dpo_nothink": {"alpha": 0.0},
                          "nll_control": {"alpha": 0.5, "preference_weight": 0.0}}},
    "evaluate": {"max_new_tokens": 40},
    # Fewer than the 24 (+ inbox) training prompts: the analyze stage's random subset is exercised.
    "analyze": {"n_prompts": 16},
    # Round 1 always promotes its candidate (a micro model rarely beats its base by chance).
    "promotion": {"margin": -1.0},
}


def micro_params(overrides: dict | None = None) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in {**MICRO, **(overrides or {})}.items():
        if isinstance(values, dict):
            params[section] = {**params[section], **values}
        else:
            params[section] = values
    return params


def write_micro_params(path: Path, overrides: dict | None = None) -> Path:
    path.write_text(yaml.safe_dump(micro_params(overrides), sort_keys=False))
    return path


# What a fresh clone holds besides the code: the pipeline, its committed inputs, ignore rules.
PROJECT_FILES = ("dvc.yaml", ".gitignore", "data/champion.json", "data/incoming/README.md", "data/inputs/README.md",
                 "data/benchmarks/README.md", "data/benchmarks/math500.jsonl", "data/benchmarks/gsm8k_test.jsonl")


def make_project(repo: Path, overrides: dict | None = None, dvc: bool = True) -> Path:
    """A fresh clone-like project: code, dvc.yaml, committed inputs and micro params in a new
    git + DVC repository with one commit (`dvc=False`: git only, for scripts that run the stages
    themselves where DVC is not installed, as on the GPU machines)."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in PROJECT_FILES:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    write_micro_params(repo / "params.yaml", overrides)
    dvc_init = ([sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "config", "core.analytics", "false"]) if dvc else ()
    for args in (["git", "init", "-q"], ["git", "config", "user.email", "ci@example.invalid"],
                 ["git", "config", "user.name", "ci"], *dvc_init, ["git", "add", "-A"],
                 ["git", "commit", "-q", "-m", "micro project"]):
        subprocess.run(args, cwd=repo, check=True, capture_output=True)
    return repo
