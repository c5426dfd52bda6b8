"""Rounds: the promotion gate (by hand), model identity, the prompt inbox, the champion pointer."""

from __future__ import annotations

import json
import math

import pytest

from bvpo.data import DataError, read_inbox
from bvpo.rounds import PromotionError, decide, model_fingerprint, next_round, per_prompt_metric


def scores(think: list[float], nothink: list[float]) -> dict[str, list[float]]:
    return {"accuracy_think": think, "accuracy_nothink": nothink}


# Four held-out prompts. Candidate minus champion, two-mode average per prompt: +0.5, +0.5, 0, 0.
CHAMPION = scores([0, 1, 1, 0], [0, 0, 1, 0])
CANDIDATE = scores([1, 1, 1, 0], [0, 1, 1, 0])


def test_decision_is_the_paired_difference_with_its_t_interval():
    decision = decide({"base": CHAMPION, "bvpo": CANDIDATE}, "bvpo", "accuracy_mean", margin=0.0,
                      require_interval=False)
    assert decision["champion_score"] == pytest.approx((0 + 0.5 + 1 + 0) / 4)
    assert decision["candidate_score"] == pytest.approx((0.5 + 1 + 1 + 0) / 4)
    assert decision["difference"] == pytest.approx(0.25)
    # sd of (0.5, 0.5, 0, 0) = sqrt(1/3 * 4 * 0.0625) = 0.288675; t(0.975, 3) = 3.182446
    half = 3.182446 * 0.288675 / 2
    assert decision["interval_low"] == pytest.approx(0.25 - half, abs=1e-5)
    assert decision["interval_high"] == pytest.approx(0.25 + half, abs=1e-5)
    assert decision["promoted"] is True and decision["n_prompts"] == 4


def test_margin_and_interval_rules():
    data = {"base": CHAMPION, "bvpo": CANDIDATE}
    assert decide(data, "bvpo", "accuracy_mean", 0.25, False)["promoted"] is False  # must exceed, not equal
    assert decide(data, "bvpo", "accuracy_mean", 0.2, False)["promoted"] is True
    assert decide(data, "bvpo", "accuracy_mean", 0.0, True)["promoted"] is False   # interval reaches below 0
    assert decide(data, "bvpo", "accuracy_think", 0.0, False)["difference"] == pytest.approx(0.25)
    worse = decide({"base": CANDIDATE, "bvpo": CHAMPION}, "bvpo", "accuracy_mean", -0.3, False)
    assert worse["difference"] == pytest.approx(-0.25) and worse["promoted"] is True  # a tolerated loss


def test_sampled_means_combine_both_modes_and_a_missing_metric_refuses():
    sampled = {"accuracy_think_sampled": [0.25, 0.75], "accuracy_nothink_sampled": [0.0, 0.5]}
    assert per_prompt_metric(sampled, "accuracy_mean_sampled", "m") == [0.125, 0.625]
    with pytest.raises(PromotionError, match="accuracy_think_sampled"):
        per_prompt_metric(CHAMPION, "accuracy_mean_sampled", "base")


@pytest.mark.parametrize("broken, match", [
    ({"bvpo": CANDIDATE}, "no evaluation of 'base'"),
    ({"base": CHAMPION, "bvpo": scores([1, 1], [0, 1])}, "same held-out prompts"),
    ({"base": CHAMPION, "bvpo": scores([1, 1, math.nan, 0], [0, 1, 1, 0])}, "non-finite"),
    ({"base": scores([], []), "bvpo": scores([], [])}, "no held-out prompts were set aside"),
])
def test_a_broken_evaluation_is_never_promoted(broken, match):
    with pytest.raises(PromotionError, match=match):
        decide(broken, "bvpo", "accuracy_mean", -1.0, False)


def test_fingerprint_follows_the_weights_not_the_summaries(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "train_summary.json").write_text('{"seconds": 1.0}')
    first = model_fingerprint(model)
    (model / "train_summary.json").write_text('{"seconds": 2.0}')
    assert model_fingerprint(model) == first
    (model / "model.safetensors").write_bytes(b"weightz")
    assert model_fingerprint(model) != first
    (model / "model.safetensors").unlink()
    with pytest.raises(PromotionError, match="model.safetensors: missing"):
        model_fingerprint(model)


def test_next_round_counts_from_the_registered_versions():
    assert next_round([]) == 1
    assert next_round([{"round": "1"}, {"round": "3"}, {"method": "old, no round tag"}]) == 4


def test_inbox_joins_prompt_files_in_name_order_and_drops_test_prompts(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"prompt": "Compute 1+2.", "answer": 3}\n')
    (tmp_path / "a.jsonl").write_text('{"prompt": "Compute 5+5.", "answer": "10"}\n'
                                      '{"prompt": "Compute 9+9.", "answer": "18"}\n')
    (tmp_path / "README.md").write_text("not prompts")
    dataset, stats = read_inbox(tmp_path, {"Compute 9+9."}, needs_answer=True)
    assert dataset["prompt"] == ["Compute 5+5.", "Compute 1+2."] and dataset["answer"] == ["10", "3"]
    assert stats == {"inbox_files": 2, "inbox_prompts": 2, "inbox_dropped_test_prompts": 1}
    assert read_inbox(tmp_path / "missing", set(), True) == (None, {"inbox_files": 0, "inbox_prompts": 0,
                                                                     "inbox_dropped_test_prompts": 0})


def test_inbox_file_without_answers_is_refused_when_the_reward_needs_them(tmp_path):
    (tmp_path / "new.jsonl").write_text('{"prompt": "Compute 1+2."}\n')
    with pytest.raises(DataError, match=r"new.jsonl: no 'answer' column"):
        read_inbox(tmp_path, set(), needs_answer=True)
    dataset, _ = read_inbox(tmp_path, set(), needs_answer=False)
    assert dataset["prompt"] == ["Compute 1+2."]
    (tmp_path / "bad.jsonl").write_text('{"prompt": ""}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, row 1: field 'prompt'"):
        read_inbox(tmp_path, set(), needs_answer=False)


def test_policy_stage_refuses_a_broken_pointer_and_an_unknown_version(tmp_path, monkeypatch):
    from bvpo.config import Params
    from bvpo.paths import ChampionPointerError
    from bvpo.stages import policy
    from bvpo.tracking import RegistryError, tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(tmp_path))
    (tmp_path / "mlruns").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data/champion.json").write_text("{not json")
    with pytest.raises(ChampionPointerError, match="champion.json: not valid JSON"):
        policy(Params(), tmp_path)
    (tmp_path / "data/champion.json").write_text(json.dumps({"registered_model": "bvpo", "version": "7"}))
    with pytest.raises(RegistryError, match="registered model 'bvpo' has no version 7"):
        policy(Params(), tmp_path)
    assert not (tmp_path / "data/policy").exists()  # nothing half-written


def test_selection_split_is_a_stable_partition_by_prompt_text():
    from bvpo.evaluation import selection_split

    prompts = [f"Compute {i}+{i}." for i in range(400)]
    selection, report = selection_split(prompts, 0.5)
    assert sorted(selection + report) == list(range(400)) and not set(selection) & set(report)
    assert 160 < len(selection) < 240  # a fair hash: about half
    chosen = {prompts[i] for i in selection}
    # Reordered, half removed, new ones added: every prompt keeps its side.
    shuffled = prompts[::-1][:200] + [f"Compute {i}*3." for i in range(100)]
    again, _ = selection_split(shuffled, 0.5)
    assert {p for p in shuffled if p in set(prompts)} & chosen == {shuffled[i] for i in again if shuffled[i] in set(prompts)}
    assert selection_split(prompts, 0.0) == ([], list(range(400)))
    # Chat prompts split by their user turns: a new system prompt moves no prompt across.
    chats = [[{"role": "user", "content": p}] for p in prompts[:50]]
    with_system = [[{"role": "system", "content": "Be brief."}, *chat] for chat in chats]
    assert selection_split(chats, 0.5) == selection_split(with_system, 0.5)
    assert selection_split(chats, 0.5)[0]  # and a chat still lands on either side
    # A tiny set that hashes all to one side still gets a prompt on each.
    for n in (2, 3, 4):  # two prompts hash to the same side half the time
        for start in range(200):
            few = [f"question {start}-{j}" for j in range(n)]
            selected, reported = selection_split(few, 0.5)
            assert selected and reported and len(selected) + len(reported) == n


def test_summarize_reports_means_of_the_columns_it_is_given():
    from bvpo.evaluation import subset, summarize

    columns = {"accuracy_think": [1.0, 0.0, 1.0, 1.0], "accuracy_nothink": [0.0, 0.0, 1.0, 0.0],
               "length_think": [10.0, 20.0, 30.0, 40.0], "invalid_think": [0.0, 1.0, 0.0, 0.0],
               "accuracy_think_sampled": [0.5, 0.25, 1.0, 0.75], "accuracy_nothink_sampled": [0.0, 0.5, 0.5, 0.0]}
    entry = summarize(subset(columns, [0, 2]))
    assert entry == {"accuracy_think": 1.0, "accuracy_nothink": 0.5, "mean_length_think": 20.0,
                     "invalid_rate_think": 0.0, "accuracy_think_sampled": 0.75, "accuracy_nothink_sampled": 0.25,
                     "accuracy_mean": 0.75, "accuracy_mean_sampled": 0.5, "n_prompts": 2}
    rewards = summarize({"reward_think": [1.0, -1.0], "reward_nothink": [0.5, 0.5]})
    assert rewards["reward_mean"] == pytest.approx(0.25)


def test_no_selection_prompts_promotes_nothing():
    with pytest.raises(PromotionError, match="selection_fraction"):
        decide({"bvpo": {"accuracy_think": [], "accuracy_nothink": []},
                "base": {"accuracy_think": [], "accuracy_nothink": []}}, "bvpo", "accuracy_mean", 0.0, False)
