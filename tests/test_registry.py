"""The registry survives crashes: a failure injected at each step of register-and-promote, then
a rerun, leaves one version per trained model, every version fully tagged, the candidate's
decision recorded and `@champion` where that decision puts it. `bvpo champion` shows, lists and
rolls back the champion, and a rollback is never undone by a rerun of the round."""

from __future__ import annotations

import json

import pytest

from micro_params import make_project

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
METHODS = {"bvpo": {"alpha": 0.5}, "dpo_think": {"alpha": 1.0}}
LINEAGE = ("method", "fingerprint", "round", "started_from_version", "pipeline_run_id")


class Injected(RuntimeError):
    """The failure a test injects."""


@pytest.fixture
def round_outputs(tmp_path, tokenizer, monkeypatch):
    """A project as a round leaves it just before registration: two trained models (different
    weights) and per-prompt scores in which the candidate, bvpo, beats the round's start."""
    from bvpo.modeling import build_tiny_model, save_model
    from bvpo.tracking import tracking_uri

    project = make_project(tmp_path / "project", {"train": {"methods": METHODS},
                                                  "tracking": {"register_method": "bvpo"},
                                                  "promotion": {"margin": 0.0}})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(project))
    for seed, method in enumerate(METHODS):
        save_model(build_tiny_model(tokenizer, 32, 2, 4, 64, 96, seed=seed), tokenizer, project / "data/models" / method)
    scores = {"base": {"accuracy_think": [0, 1, 0, 0], "accuracy_nothink": [0, 0, 0, 1]},
              "bvpo": {"accuracy_think": [1, 1, 1, 0], "accuracy_nothink": [1, 0, 1, 1]},
              "dpo_think": {"accuracy_think": [0, 1, 1, 0], "accuracy_nothink": [0, 0, 0, 0]}}
    (project / "data/eval_prompts.json").write_text(json.dumps({"prompts": ["a", "b", "c", "d"], "scores": scores}))
    return project


def register(project, champion_version=None, round_=1):
    from bvpo.flow import register_and_promote

    champion = {"registered_model": "bvpo", "version": champion_version, "round": round_}
    return register_and_promote.fn(str(project), str(project / "params.yaml"), f"run-{round_}", champion)


def registry(project) -> tuple[dict[str, dict], str | None]:
    from bvpo.tracking import champion_version, model_versions

    return {tags["version"]: tags for tags in model_versions(project, "bvpo")}, champion_version(project, "bvpo")


def fail_at(monkeypatch, target: str, after: int) -> None:
    """`tracking.<target>` fails on its call number `after + 1` (0: the first call)."""
    from bvpo import tracking

    real, calls = getattr(tracking, target), []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise Injected(f"{target} failed (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(tracking, target, flaky)


@pytest.mark.parametrize("target, after", [
    ("log_and_register_model", 0),  # before anything is registered
    ("log_and_register_model", 1),  # the candidate (and its decision) registered, the other method not
    ("set_champion", 0),            # every version registered, the alias not moved yet
])
def test_a_failure_at_any_step_is_finished_by_the_next_run(round_outputs, monkeypatch, target, after):
    from bvpo.rounds import decide

    with monkeypatch.context() as patch:
        fail_at(patch, target, after)
        with pytest.raises(Injected):
            register(round_outputs)
    result = register(round_outputs)
    versions, champion = registry(round_outputs)
    fingerprints = [tags["fingerprint"] for tags in versions.values()]
    assert sorted(tags["method"] for tags in versions.values()) == sorted(METHODS)  # one version per model
    assert len(set(fingerprints)) == len(fingerprints) == 2
    for tags in versions.values():
        assert all(key in tags for key in LINEAGE), tags
    candidate = next(v for v, tags in versions.items() if tags["method"] == "bvpo")
    scores = json.loads((round_outputs / "data/eval_prompts.json").read_text())["scores"]
    expected = decide(scores, "bvpo", "accuracy_mean", 0.0, False)
    assert expected["promoted"]  # +0.375 on the two-mode mean
    assert versions[candidate]["promotion_decision"] == "promoted"
    assert float(versions[candidate]["promotion_difference"]) == pytest.approx(expected["difference"])
    assert champion == candidate
    # The rerun finished what the failed run began: when the failed run had recorded the decision
    # (the candidate registers first, with it), the rerun applies it and says so.
    decided_before = not (target == "log_and_register_model" and after == 0)
    assert result["finished_promotion"] == (candidate if decided_before else None)
    assert (result["decision"] is None) == decided_before
    # A third run has nothing left to do.
    again = register(round_outputs)
    assert again["new_versions"] == [] and again["decision"] is None and again["finished_promotion"] is None


def test_champion_commands_show_list_and_roll_back(round_outputs, capsys):
    from bvpo.cli import main

    register(round_outputs)
    versions, champion = registry(round_outputs)
    project = ["--project-dir", str(round_outputs)]
    assert main([*project, "champion", "show"]) == 0
    shown = capsys.readouterr().out
    assert f"bvpo @champion: version {champion}" in shown and "promotion_decision: promoted" in shown
    assert main([*project, "champion", "set", "base", "--reason", "regression on the new benchmark"]) == 0
    assert registry(round_outputs)[1] is None
    assert main([*project, "champion", "history"]) == 0
    history = capsys.readouterr().out
    assert f"    1 {champion:>7}  promoted" in history and "@champion is unset" in history
    # The rolled-back candidate is marked: rerunning its round (same weights) does not promote it again.
    assert registry(round_outputs)[0][champion]["champion_replaced_by"] == "base"
    assert register(round_outputs)["finished_promotion"] is None and registry(round_outputs)[1] is None
    other = next(v for v, tags in versions.items() if tags["method"] == "dpo_think")
    assert main([*project, "champion", "set", other, "--reason", "by hand"]) == 0
    assert registry(round_outputs)[1] == other
    assert registry(round_outputs)[0][other]["champion_set_reason"] == "by hand"
    assert main([*project, "champion", "set", "99", "--reason", "typo"]) == 2
    assert "has no version 99" in capsys.readouterr().err


def test_a_champion_of_another_base_model_is_not_this_lineages(round_outputs, tokenizer, tiny_model):
    """After params.yaml points at another model (or task), the next round starts from the new
    base model, not from the registered champion of the old one, and says why."""
    import yaml

    from bvpo.flow import resolve_champion
    from bvpo.modeling import save_model

    register(round_outputs)
    champion = registry(round_outputs)[1]
    params_file = round_outputs / "params.yaml"
    same = resolve_champion.fn(str(round_outputs), str(params_file))
    assert same["version"] == champion and same["lineage_reset"] is None and same["round"] == 2
    save_model(tiny_model, tokenizer, round_outputs / "user-model")
    raw = yaml.safe_load(params_file.read_text())
    raw["model"]["path"] = "user-model"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    moved = resolve_champion.fn(str(round_outputs), str(params_file))
    assert moved["version"] is None and "another base model or task" in moved["lineage_reset"]
    assert json.loads((round_outputs / "data/champion.json").read_text())["version"] is None


def test_a_new_lineage_promotes_over_the_old_lineages_champion(round_outputs, tokenizer):
    """After a lineage reset the round starts from the new base model; a candidate that beats it
    is promoted, though @champion still pointed at the old lineage's version (it was decided
    "promoted" and never moved before)."""
    import yaml

    from bvpo.flow import resolve_champion
    from bvpo.modeling import build_tiny_model, save_model

    register(round_outputs)
    old = registry(round_outputs)[1]
    params_file = round_outputs / "params.yaml"
    save_model(build_tiny_model(tokenizer, 32, 2, 4, 64, 96, seed=7), tokenizer, round_outputs / "user-model")
    raw = yaml.safe_load(params_file.read_text())
    raw["model"]["path"] = "user-model"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    for seed, method in enumerate(METHODS, start=10):  # the new lineage's trained models
        save_model(build_tiny_model(tokenizer, 32, 2, 4, 64, 96, seed=seed), tokenizer,
                   round_outputs / "data/models" / method)
    champion = resolve_champion.fn(str(round_outputs), str(params_file))
    assert champion["version"] is None and champion["lineage_reset"]
    result = register(round_outputs, champion_version=None, round_=champion["round"])
    assert result["decision"]["promoted"]
    new = result["versions"]["bvpo"]
    assert registry(round_outputs)[1] == new != old
    assert registry(round_outputs)[0][new]["base_identity"] != registry(round_outputs)[0][old]["base_identity"]
