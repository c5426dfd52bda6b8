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
    "pairs": {"reward": "graded"},
    "train": {"steps": 3, "batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1, "lr": 1.0e-3,
              "alpha_every": 2, "alpha_draws": 2, "alpha_draw_size": 2,
              "methods": {"bvpo": {"alpha": 0.5}, "bvpo_auto": {"alpha": "auto"},
                          "dpo_trace": {"alpha": 1.0}, "dpo_empty": {"alpha": 0.0},
                          "nll_control": {"alpha": 0.5, "preference_weight": 0.0}}},
    "evaluate": {"max_new_tokens": 40},
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
