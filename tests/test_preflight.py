"""The preflight (`bvpo check`) and the recipes (`bvpo init`): a real run's settings are checked
in seconds, before any sampling, and a recipe writes a params.yaml that loads and says where
each value comes from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bvpo.config import ConfigError, Params, load_params
from micro_params import make_project

# Qwen3-0.6B's shape (its config.json): 28 layers, 8 key/value heads of 128 dims.
QWEN3_06B = {"num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
             "hidden_size": 1024, "max_position_embeddings": 40960}


def qwen3_sizes():
    from transformers import Qwen3Config

    from bvpo.preflight import Sizes

    return Sizes.of(Qwen3Config(**QWEN3_06B))


def test_kv_cache_estimate_refuses_a_batch_that_does_not_fit_and_names_one_that_does():
    from bvpo.preflight import MEMORY_SHARE, sampling_batch

    sizes = qwen3_sizes()
    # 256 sequences of a 100-token prompt + 2,048 new tokens in bf16: the ~63 GB of the issue.
    assert 256 * sizes.kv_bytes(2148, "bf16") == pytest.approx(63.06e9, rel=1e-3)
    assert sampling_batch(256, sizes, 2148, "bf16", free_bytes=100 * 2**30) == 256
    per_sequence = sizes.kv_bytes(2148, "bf16")
    fits = int(MEMORY_SHARE * 40 * 2**30 // per_sequence)
    with pytest.raises(ConfigError, match=rf"sample.batch_size: 256 sequences .* set sample.batch_size to {fits} "
                                          "or less, or to auto"):
        sampling_batch(256, sizes, 2148, "bf16", free_bytes=40 * 2**30)
    assert sampling_batch("auto", sizes, 2148, "bf16", free_bytes=40 * 2**30) == fits
    assert sampling_batch("auto", sizes, 2148, "bf16", free_bytes=10**13) == 256
    with pytest.raises(ConfigError, match="not even one sequence"):
        sampling_batch("auto", sizes, 2148, "bf16", free_bytes=2**20)


@pytest.fixture(scope="module")
def user_project(tmp_path_factory, tokenizer, tiny_model):
    """A project whose model is a saved local model and whose prompts are a file in data/inputs/."""
    from bvpo.modeling import save_model

    root = tmp_path_factory.mktemp("preflight")
    project = make_project(root / "project")
    save_model(tiny_model, tokenizer, root / "model")
    rows = [{"prompt": f"Compute {10 + i}+{20 + i}.", "answer": str(30 + 2 * i)} for i in range(20)]
    rows.append({"prompt": "Compute " + "+".join(["11"] * 30) + ".", "answer": "330"})  # one long prompt
    (project / "data/inputs/prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (project / "data/inputs/no_answers.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n"
                                                                 for r in rows))
    return project, root / "model"


def params_with(project: Path, name: str, **sections) -> Path:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in sections.items():
        raw[section].update(values)
    path = project / f"params-{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_prompts_that_do_not_fit_the_length_limit_are_refused_before_sampling(user_project):
    from bvpo.preflight import run

    project, model = user_project
    # One long prompt of 21 is within train.max_skipped_fraction (0.1): a warning, not an error.
    ok = params_with(project, "fits", model={"path": str(model), "max_length": 64},
                     data={"source": "data/inputs/prompts.jsonl"}, sample={"max_new_tokens": 24})
    notes = run(load_params(ok), project)
    assert any(n.startswith("sampling: batch 128") for n in notes)
    tight = params_with(project, "tight", model={"path": str(model), "max_length": 40},
                        data={"source": "data/inputs/prompts.jsonl"}, sample={"max_new_tokens": 24})
    with pytest.raises(ConfigError, match=r"model.max_length: 21 of 21 prompts \(thinking\) plus "
                                          r"sample.max_new_tokens=24 exceed 40 tokens.* at least \d+"):
        run(load_params(tight), project)


def test_training_settings_the_model_or_machine_cannot_run_are_refused_before_sampling(user_project, monkeypatch):
    """train.gradient_checkpointing needs a model class transformers can checkpoint, and
    train.compile on a CPU a C++ compiler: `bvpo check` says so before hours of sampling."""
    import torch._inductor.config as inductor_config
    from transformers import Qwen3ForCausalLM

    from bvpo.chat import ModelError
    from bvpo.preflight import run

    project, model = user_project
    both = params_with(project, "ckpt-compile", model={"path": str(model), "max_length": 64},
                       data={"source": "data/inputs/prompts.jsonl"}, sample={"max_new_tokens": 24},
                       train={"gradient_checkpointing": True, "compile": True})
    run(load_params(both), project)  # this model class and this machine can
    # As with CXX pointing at a compiler that is not there. inductor's own patch restores the
    # setting; monkeypatch.setattr on its config proxy left it deleted for every later test.
    with inductor_config.patch({"cpp.cxx": (None, "/nonexistent/g++")}):
        with pytest.raises(ModelError, match=r"train.compile on a CPU needs a C\+\+ compiler .*No working C\+\+ compiler"):
            run(load_params(both), project)
    monkeypatch.setattr(Qwen3ForCausalLM, "supports_gradient_checkpointing", False)
    with pytest.raises(ModelError, match="train.gradient_checkpointing: Qwen3ForCausalLM does not support"):
        run(load_params(both), project)


def test_settings_that_need_answers_are_checked_against_the_prompts(user_project):
    from bvpo.preflight import run

    project, model = user_project
    base = {"model": {"path": str(model)}, "data": {"source": "data/inputs/no_answers.jsonl"}}
    verified = params_with(project, "noanswers", **base)
    with pytest.raises(ConfigError, match="pairs.reward: graded grades answers against an 'answer' column"):
        run(load_params(verified), project)
    model_reward = params_with(project, "noanswers-model", **base, pairs={"reward": "model", "reward_model": str(model)})
    with pytest.raises(ConfigError, match="promotion.metric: accuracy_mean needs held-out prompts with answers"):
        run(load_params(model_reward), project)
    answers = params_with(project, "answers-reward", model={"path": str(model)},
                          data={"source": "data/inputs/prompts.jsonl"}, pairs={"reward_model": str(model)},
                          promotion={"metric": "reward_mean"})
    with pytest.raises(ConfigError, match="promotion.metric: reward_mean is for held-out prompts without answers"):
        run(load_params(answers), project)


def test_files_outside_the_input_folders_are_named(user_project, tmp_path):
    from bvpo.preflight import untracked_inputs

    project, _ = user_project
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text((project / "data/inputs/prompts.jsonl").read_text())
    params = load_params(params_with(project, "outside", data={"source": str(outside)},
                                     evaluate={"benchmarks": {"math500": "data/benchmarks/math500.jsonl"}}))
    [note] = untracked_inputs(params, project)
    assert note.startswith(f"{outside} is outside data/inputs/: the pipeline reads it, but DVC does not rerun")


def test_bvpo_check_on_the_embedded_default(user_project, capsys):
    from bvpo.cli import main

    project, _ = user_project
    assert main(["--project-dir", str(project), "check"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "bvpo check: ok"


@pytest.mark.parametrize("recipe", ["qwen3-0.6b", "r1-distill-qwen-1.5b", "r1-distill-qwen-7b-8gpu"])
def test_bvpo_init_writes_a_recipe_that_loads_and_cites_every_changed_value(recipe, tmp_path):
    from bvpo.cli import main
    from bvpo.recipes import RECIPES

    project = make_project(tmp_path / "project")
    (project / "configs").mkdir()
    (project / "configs/fsdp.yaml").write_text((Path(__file__).parent.parent / "configs/fsdp.yaml").read_text())
    (project / "params.yaml").unlink()
    assert main(["--project-dir", str(project), "init", "--model", "Qwen/Qwen3-0.6B", "--recipe", recipe]) == 0
    text = (project / "params.yaml").read_text()
    params = load_params(project / "params.yaml")
    assert params.model.path == "Qwen/Qwen3-0.6B"
    written, default = params.to_dict(), Params().to_dict()
    lines = text.splitlines()
    changed = []
    for section, values in written.items():
        for key, value in (values.items() if isinstance(values, dict) else []):
            if value != default[section][key]:
                changed.append(f"{section}.{key}")
                index = next(i for i, line in enumerate(lines)
                             if line.startswith(f"  {key}: ") and _section_of(lines, i) == section)
                assert lines[index - 1].startswith("  # "), f"{section}.{key} has no source comment"
    for key in RECIPES[recipe].values:  # a recipe value equal to the default is cited too
        section, field = key.split(".")
        index = next(i for i, line in enumerate(lines)
                     if line.startswith(f"  {field}: ") and _section_of(lines, i) == section)
        assert lines[index - 1].startswith("  # "), key
    assert "model.path" in changed
    # The toy's settings that would sink a real run are all replaced.
    assert params.train.beta != 2.0 and params.train.lr != 1e-4 and params.sample.max_new_tokens > 96
    assert params.model.max_length > 192 and params.evaluate.max_new_tokens > 96


def _section_of(lines: list[str], index: int) -> str:
    return next(line[:-1] for line in reversed(lines[:index]) if line and not line.startswith((" ", "#")))


def test_bvpo_init_refuses_to_replace_params_and_needs_a_judge_for_prompts_without_answers(user_project, tmp_path):
    from bvpo.cli import main

    project, model = user_project
    before = (project / "params.yaml").read_text()
    assert main(["--project-dir", str(project), "init", "--model", str(model), "--recipe", "qwen3-0.6b"]) == 2
    assert (project / "params.yaml").read_text() == before
    out = "params-init.yaml"
    assert main(["--project-dir", str(project), "init", "--model", str(model), "--recipe", "qwen3-0.6b",
                 "--prompts", "data/inputs/no_answers.jsonl", "--out", out]) == 2
    assert not (project / out).exists()
    assert main(["--project-dir", str(project), "init", "--model", str(model), "--recipe", "qwen3-0.6b",
                 "--prompts", "data/inputs/no_answers.jsonl", "--reward-model", str(model), "--out", out]) == 0
    params = load_params(project / out)
    assert (params.pairs.reward, params.promotion.metric) == ("model", "reward_mean")
    assert params.data.source == "data/inputs/no_answers.jsonl"


def test_a_recipe_as_written_passes_the_preflight(user_project, tokenizer, tmp_path):
    """The recipe's no-thinking limit (2,048) is tighter than its generation budget (4,096) on
    purpose: the preflight checks that no-thinking prompts leave room for an answer, not for the
    whole budget (it refused every recipe before)."""
    from bvpo.cli import main
    from bvpo.modeling import build_tiny_model, save_model
    from bvpo.preflight import run

    project, _ = user_project
    # A model whose context holds the recipe's 5,120 tokens.
    save_model(build_tiny_model(tokenizer, 32, 2, 4, 64, 16384, seed=0), tokenizer, tmp_path / "long-context")
    assert main(["--project-dir", str(project), "init", "--model", str(tmp_path / "long-context"), "--recipe",
                 "qwen3-0.6b", "--prompts", "data/inputs/prompts.jsonl", "--out", "params-recipe.yaml"]) == 0
    params = load_params(project / "params-recipe.yaml")
    assert params.model.max_length_nothink < params.sample.max_new_tokens
    notes = run(params, project)
    assert any(n.startswith("sampling: batch") for n in notes)


def test_the_reward_needs_training_answers_and_the_metric_held_out_ones(user_project):
    from bvpo.preflight import run

    project, model = user_project
    both = {"model": {"path": str(model)}}
    ok = params_with(project, "train-answers", **both, data={"source": "data/inputs/prompts.jsonl",
                                                            "test_source": "data/inputs/no_answers.jsonl"},
                     pairs={"reward": "verified", "reward_model": str(model)}, promotion={"metric": "reward_mean"})
    run(load_params(ok), project)  # refused before: the held-out file's (missing) answers were checked
    bad = params_with(project, "test-answers", **both, data={"source": "data/inputs/no_answers.jsonl",
                                                            "test_source": "data/inputs/prompts.jsonl"},
                      pairs={"reward": "verified"})
    with pytest.raises(ConfigError, match="which data/inputs/no_answers.jsonl does not have"):
        run(load_params(bad), project)  # passed before, and the pairs stage failed after sampling


def test_a_params_file_from_an_older_version_is_refused_naming_what_dvc_would_miss(tmp_path):
    """The loader fills defaults for keys a params file lacks; DVC does not, and would stop at the
    first stage that reads one. The preflight names every such key before any work."""
    import shutil

    from bvpo.preflight import missing_dvc_params, run
    from micro_params import ROOT

    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert missing_dvc_params(tmp_path, ROOT / "params.yaml") == []
    del raw["data"]["task"], raw["reward_model"]
    old = tmp_path / "params.yaml"
    old.write_text(yaml.safe_dump(raw))
    assert missing_dvc_params(tmp_path, old) == ["data.task", "reward_model"]
    with pytest.raises(ConfigError, match=r"no data.task, reward_model, which dvc.yaml's stages read"):
        run(load_params(old), tmp_path, old)
    raw["data"]["task"], raw["reward_model"] = "arithmetic", {}  # the fix the message gives
    old.write_text(yaml.safe_dump(raw))
    assert missing_dvc_params(tmp_path, old) == [] and load_params(old).reward_model.steps == 1500
