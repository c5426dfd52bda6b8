from pathlib import Path

import pytest
import yaml

from bvpo.config import ConfigError, load_params

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
    assert params.train.methods["bvpo"].alpha == 0.5
    assert params.train.methods["dpo_trace"].alpha == 1.0
    assert params.train.methods["dpo_empty"].alpha == 0.0
    assert params.train.lr == pytest.approx(5e-5)


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


def test_methods_replace_the_default_set(tmp_path):
    params = load_params(write(tmp_path, {"train.methods": {"bvpo": {"alpha": 0.3}},
                                          "tracking.register_method": "bvpo"}))
    assert list(params.train.methods) == ["bvpo"]
    assert params.train.methods["bvpo"].alpha == pytest.approx(0.3)
