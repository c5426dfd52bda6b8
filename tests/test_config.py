from pathlib import Path

import pytest
import yaml

from bvpo.config import ConfigError, Params, load_params

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, overrides: dict) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_repository_params_load_with_documented_defaults():
    params = load_params(ROOT / "params.yaml")
    # The candidate alone: the controls are the experiment's (each is a whole training run).
    assert {name: m.alpha for name, m in params.train.methods.items()} == {"bvpo": 0.5}
    assert params.tracking.register_method in params.train.methods
    assert {"dpo_think", "dpo_nothink", "bvpo"} <= set(params.experiment.methods)
    assert params.train.lr == pytest.approx(1e-4)


def test_shipped_params_equal_the_declared_defaults():
    # A user's params.yaml may leave any key out: what config.py declares (and documents) must
    # then be what the shipped default runs, or a trimmed file silently changes the recipe.
    from bvpo.config import Params

    def differences(shipped, declared, where=""):
        if isinstance(shipped, dict) and isinstance(declared, dict):
            return [d for key in sorted(set(shipped) | set(declared))
                    for d in differences(shipped.get(key), declared.get(key), f"{where}.{key}".lstrip("."))]
        return [] if shipped == declared else [f"{where}: params.yaml {shipped!r}, config.py {declared!r}"]

    assert differences(load_params(ROOT / "params.yaml").to_dict(), Params().to_dict()) == []


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"train.methods.bvpo.alpha": 1.5}, "train.methods.bvpo.alpha"),
        ({"train.methods.bvpo.alpha": -0.1}, "train.methods.bvpo.alpha"),
        ({"train.beta": 0.0}, "train.beta"),
        ({"train.beta": -1}, "train.beta"),
        ({"sample.k": 1}, "sample.k"),
        ({"model.path": "./no/such/model"}, "model.path"),
        ({"train.lr": "fast"}, "train.lr"),
        ({"data.source": "prompts.csv"}, "data.source"),
        ({"train.loss_type": "hinge"}, "train.loss_type"),
        ({"tracking.register_method": "nope"}, "tracking.register_method"),
        ({"warmup.mixed_precision": "fp16"}, "warmup.mixed_precision"),
        ({"warmup.batch_size": 31}, "warmup.batch_size"),
        ({"train.lr": float("inf")}, "train.lr"),  # `.inf` in YAML passed `lr > 0`
        ({"train.max_grad_norm": float("nan")}, "train.max_grad_norm"),
        ({"experiment.methods.bvpo.preference_weight": -1.0}, "experiment.methods.bvpo.preference_weight"),
        ({"experiment.methods.base": {"alpha": 0.5}}, "experiment.methods.base"),
        ({"experiment.judged_train_steps": 0}, "experiment.judged_train_steps"),
        ({"analyze.n_prompts": 0}, "analyze.n_prompts"),
        ({"train.max_tokens_per_micro_batch": 1}, "train.max_tokens_per_micro_batch"),
        ({"train.max_tokens_per_micro_batch": 512, "train.shared_prompt": False}, "train.max_tokens_per_micro_batch"),
        ({"train.attention": "flash_attention_2"}, "train.attention"),
        ({"train.attention": "flex_attention"}, "train.attention"),  # without packed rows
        ({"data.task": "judged"}, "pairs.reward"),  # the judged task ranks samples with its reward model
        ({"data.task": "judged", "pairs.reward": "model", "pairs.reward_model": "."}, "pairs.reward"),
        ({"data.task": "judgd"}, "data.task"),
        ({"promotion.metric": "gold_mean"}, "promotion.metric"),  # only the judged task has a gold scorer
        ({"pairs.reward": "model"}, "pairs.reward_model"),
        ({"reward_model.noise": -0.1}, "reward_model.noise"),
    ],
)
def test_bad_values_name_the_field(tmp_path, overrides, field):
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, overrides))
    assert str(err.value).startswith(field), str(err.value)


def test_unknown_key_is_refused_with_its_full_name(tmp_path):
    path = write(tmp_path, {"train.betta": 0.1})
    with pytest.raises(ConfigError, match=r"unknown parameter train\.betta"):
        load_params(path)


def test_unknown_top_level_section(tmp_path):
    path = write(tmp_path, {"trainer": {}})
    with pytest.raises(ConfigError, match="unknown parameter trainer"):
        load_params(path)


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_the_judged_task_needs_no_reward_model_path(tmp_path):
    params = load_params(write(tmp_path, {"data.task": "judged", "pairs.reward": "model",
                                          "promotion.metric": "gold_mean"}))
    assert (params.data.task, params.pairs.reward_model) == ("judged", None)
    # It ranks and judges with the reward model its own stage trains.
    assert params.ranking_reward_model() == params.judging_reward_model() == "data/reward_model"


def test_which_reward_model_ranks_and_which_judges(tmp_path):
    (tmp_path / "rm").mkdir()
    assert (Params().ranking_reward_model(), Params().judging_reward_model()) == (None, None)
    params = Params()
    params.evaluate.win_rate_reward_model = "judge"
    assert (params.ranking_reward_model(), params.judging_reward_model()) == (None, "judge")
    params = load_params(write(tmp_path, {"pairs.reward": "model", "pairs.reward_model": "rm"}))
    assert (params.ranking_reward_model(), params.judging_reward_model()) == ("rm", "rm")
    params.evaluate.win_rate_reward_model = "other/judge"
    assert (params.ranking_reward_model(), params.judging_reward_model()) == ("rm", "other/judge")


def test_methods_replace_the_default_set(tmp_path):
    params = load_params(write(tmp_path, {"train.methods": {"bvpo": {"alpha": 0.3}},
                                          "tracking.register_method": "bvpo"}))
    assert list(params.train.methods) == ["bvpo"]
    assert params.train.methods["bvpo"].alpha == pytest.approx(0.3)


def numeric_fields():
    """Every int/float parameter of every section, as dotted names."""
    import dataclasses
    import typing

    from bvpo.config import Params

    out = []

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
            elif any(a in (int, float) for a in args):
                out.append(f"{prefix}{f.name}")

    walk(Params, "")
    return out


@pytest.mark.parametrize("field", numeric_fields())
def test_every_numeric_parameter_is_range_checked(tmp_path, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_params(write(tmp_path, {field: -5}))


def test_numeric_fields_cover_the_sections():
    fields = numeric_fields()
    assert {"evaluate.n_prompts", "seed", "train.max_grad_norm", "model.max_length", "data.n_test"} <= set(fields)


def test_deepspeed_is_refused_with_the_reason(tmp_path):
    config = tmp_path / "ds.yaml"
    config.write_text("distributed_type: DEEPSPEED\nnum_processes: 8\n")
    with pytest.raises(ConfigError, match="train.accelerate_config.*DeepSpeed steps its engine on every backward"):
        load_params(write(tmp_path, {"train.accelerate_config": str(config)}))
    with pytest.raises(ConfigError, match="train.accelerate_config: expected an existing"):
        load_params(write(tmp_path, {"train.accelerate_config": str(tmp_path / "missing.yaml")}))
    assert not (ROOT / "configs" / "deepspeed_zero3.yaml").exists()
    for shipped in (ROOT / "configs").glob("*.yaml"):
        load_params(write(tmp_path, {"train.accelerate_config": str(shipped)}))


def test_gradient_checkpointing_is_refused_beside_fsdp_activation_checkpointing(tmp_path):
    shipped = str(ROOT / "configs" / "fsdp.yaml")  # sets fsdp_activation_checkpointing: true
    with pytest.raises(ConfigError, match="train.gradient_checkpointing: expected false while .*fsdp.yaml sets "
                                          "fsdp_activation_checkpointing"):
        load_params(write(tmp_path, {"train.accelerate_config": shipped, "train.gradient_checkpointing": True}))
    unprefixed = tmp_path / "fsdp-unprefixed.yaml"  # accelerate reads fsdp_config keys without fsdp_ too
    unprefixed.write_text("distributed_type: FSDP\nfsdp_config:\n  activation_checkpointing: true\n")
    with pytest.raises(ConfigError, match="train.gradient_checkpointing: expected false"):
        load_params(write(tmp_path, {"train.accelerate_config": str(unprefixed), "train.gradient_checkpointing": True}))
    # A DDP config with a leftover fsdp_config block does not run FSDP.
    leftover = tmp_path / "ddp-leftover.yaml"
    leftover.write_text("distributed_type: MULTI_GPU\nfsdp_config:\n  fsdp_activation_checkpointing: true\n")
    for config in (ROOT / "configs" / "ddp_multi_gpu.yaml", leftover, ROOT / "configs" / "fsdp.yaml"):
        load_params(write(tmp_path, {"train.accelerate_config": str(config),
                                     "train.gradient_checkpointing": config.name != "fsdp.yaml"}))


def test_compile_is_refused_beside_accelerates_own_compilation(tmp_path):
    # accelerate reads dynamo_config's key with or without its prefix, and an older top-level one.
    for name, text in (("dynamo.yaml", "distributed_type: MULTI_GPU\ndynamo_config:\n  dynamo_backend: INDUCTOR\n"),
                       ("dynamo-unprefixed.yaml", "distributed_type: MULTI_GPU\ndynamo_config:\n  backend: inductor\n"),
                       ("dynamo-old.yaml", "distributed_type: MULTI_GPU\ndynamo_backend: inductor\n")):
        config = tmp_path / name
        config.write_text(text)
        with pytest.raises(ConfigError, match=f"train.compile: expected false while .*{name} sets dynamo_config "
                                              "\\(dynamo_backend INDUCTOR"):
            load_params(write(tmp_path, {"train.accelerate_config": str(config), "train.compile": True}))
        load_params(write(tmp_path, {"train.accelerate_config": str(config), "train.compile": False}))
    off = tmp_path / "dynamo-off.yaml"
    off.write_text("distributed_type: MULTI_GPU\ndynamo_config:\n  dynamo_backend: 'NO'\n")
    for config in (off, ROOT / "configs" / "ddp_multi_gpu.yaml"):
        load_params(write(tmp_path, {"train.accelerate_config": str(config), "train.compile": True}))
    with pytest.raises(ConfigError, match="train.compile: expected false with the FSDP config .*fsdp.yaml"):
        load_params(write(tmp_path, {"train.accelerate_config": str(ROOT / "configs" / "fsdp.yaml"),
                                     "train.compile": True}))


def test_the_embedded_task_must_fit_the_context(tmp_path):
    with pytest.raises(ConfigError, match=r"model.max_length: expected at least \d+ .*max_new_tokens 170"):
        load_params(write(tmp_path, {"sample.max_new_tokens": 170}))
    load_params(write(tmp_path, {"sample.max_new_tokens": 170, "model.max_length": 256}))


def test_draw_size_must_split_over_processes(tmp_path):
    with pytest.raises(ConfigError, match="train.alpha_draw_size: expected a multiple of train.num_processes"):
        load_params(write(tmp_path, {"train.num_processes": 4, "train.alpha_draw_size": 6}))


def test_unreadable_params_file_is_a_clear_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"seed: 0\ntrain:\n  lr: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_params(path)


def test_run_seeds_default_to_the_top_level_seed(tmp_path):
    params = load_params(write(tmp_path, {"seed": 3}))
    assert (params.sample_seed, params.train_seed) == (3, 3)
    params = load_params(write(tmp_path, {"seed": 3, "sample.seed": 5, "train.seed": 7}))
    assert (params.sample_seed, params.train_seed) == (5, 7)
