"""The judged task: its hidden gold scorer, the gold-labelled comparisons, Bradley–Terry reward
model training (real training of a tiny model, loaded back through the pipeline's RewardModel),
and the whole pipeline on it (slow)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from bvpo.judged import GOLD_SCALE, NOT_BARE, candidate_answer, comparisons, gold_reward


@pytest.mark.parametrize("response, value", [
    ("42", 1.0),
    (" 42 ", 1.0),
    ("43", math.exp(-1 / GOLD_SCALE)),
    ("32", math.exp(-10 / GOLD_SCALE)),
    ("so 42", NOT_BARE),
    ("so 45", NOT_BARE * math.exp(-3 / GOLD_SCALE)),
    ("41 or 42", NOT_BARE),  # the last number counts, prose costs
    ("", 0.0),
    ("forty-two", 0.0),
    ("9" * 400, 0.0),  # far beyond any float: graded as the largest error, not an overflow
])
def test_gold_grades_closeness_and_form(response, value):
    assert gold_reward(response, "42") == pytest.approx(value)


def test_a_reference_without_an_integer_has_no_gold():
    assert gold_reward("4", "4.5") == 0.0 and gold_reward("4", "\\frac{1}{2}") == 0.0
    with pytest.raises(ValueError, match="integer answer"):
        comparisons(["What is pi?"], ["3.14"], 4, 0.1, seed=0)


def test_tiny_label_noise_does_not_overflow():
    rows = comparisons(["Compute 1+1."], ["2"], 200, 1e-6, seed=0)
    assert all(r["gold_margin"] > 0 for r in rows)  # practically noise-free


def test_closer_answers_grade_higher_whatever_the_side():
    grades = [gold_reward(str(42 + d), "42") for d in (0, 1, 2, 5, 20)]
    assert grades == sorted(grades, reverse=True) and len(set(grades)) == len(grades)
    assert gold_reward("41", "42") == gold_reward("43", "42")


def test_candidate_answers_are_mostly_near_misses():
    rng = random.Random(0)
    values = [candidate_answer(rng, 50) for _ in range(4000)]
    numbers = [int(v.split()[-1]) for v in values]
    assert 0.2 < sum(n == 50 for n in numbers) / len(numbers) < 0.3
    assert 0.1 < sum(v.startswith("so ") for v in values) / len(values) < 0.2
    assert sum(abs(n - 50) <= 5 for n in numbers) / len(numbers) > 0.6


@pytest.mark.parametrize("noise", [0.0, 0.1, 1.0])
def test_comparison_labels_follow_bradley_terry_on_the_gold_grades(noise):
    """With noise 0 every label agrees with the gold scorer; with noise τ the chosen answer is
    the better one with probability sigmoid(Δgold / τ) on average."""
    prompts, answers = [f"Compute {a}+1." for a in range(10, 60)], [str(a + 1) for a in range(10, 60)]
    rows = comparisons(prompts, answers, 3000, noise, seed=0)
    assert len(rows) == 3000 and all(r["chosen"] != r["rejected"] for r in rows)
    agree = sum(r["gold_margin"] > 0 for r in rows) / len(rows)
    expected = sum(1 / (1 + math.exp(-abs(r["gold_margin"]) / noise)) if noise else 1.0 for r in rows) / len(rows)
    assert agree == pytest.approx(expected, abs=0.03)
    if noise == 1.0:
        assert agree < 0.7  # mostly noise
    assert comparisons(prompts, answers, 50, noise, seed=0) == rows[:50]  # seeded


def test_bradley_terry_loss_is_the_label_negative_log_likelihood():
    from bvpo.reward_training import bradley_terry_loss

    chosen, rejected = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 1.0, 0.5])
    expected = -sum(math.log(1 / (1 + math.exp(-(c - r)))) for c, r in zip(chosen.tolist(), rejected.tolist())) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected)


def test_a_trained_reward_model_learns_the_labels_and_loads_as_a_pipeline_reward_model(tmp_path, tokenizer):
    """Real Bradley–Terry training of a tiny model on comparisons whose labels a tiny model can
    learn in seconds (the bare answer beats the same number in prose), saved in Hugging Face
    format and scored through `rewards.RewardModel`, as the pairs stage does."""
    from types import SimpleNamespace

    from bvpo.modeling import build_tiny_model, save_model
    from bvpo.rewards import RewardModel
    from bvpo.reward_training import train_reward_model

    base = tmp_path / "base"
    save_model(build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                max_length=96, seed=0), tokenizer, base)
    rng = random.Random(0)

    def rows(n):
        out = []
        for _ in range(n):
            a, b = rng.randint(10, 99), rng.randint(1, 9)
            answer = str(a + b)
            out.append({"prompt": f"Compute {a}+{b}.", "chosen": answer, "rejected": f"so {answer}",
                        "gold_margin": gold_reward(answer, answer) - gold_reward(f"so {answer}", answer)})
        return out

    config = SimpleNamespace(steps=60, batch_size=16, lr=3e-3, warmup_steps=5)
    metrics = train_reward_model(base, rows(400), rows(64), config, seed=0, out_dir=tmp_path / "rm")
    assert metrics["accuracy_vs_gold"] > 0.95 and metrics["loss_last_tenth"] < 0.5 * math.log(2)
    judge = RewardModel(str(tmp_path / "rm"))
    scores = judge.score(["Compute 12+5.", "Compute 12+5."], ["17", "so 17"])
    assert scores[0] > scores[1]


JUDGED = {"data": {"task": "judged"}, "pairs": {"reward": "model"},
          "promotion": {"metric": "gold_mean", "margin": -1.0}}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_judged_task_runs_the_whole_pipeline_with_its_own_reward_model(tmp_path, prefect_harness, monkeypatch):
    """data.task: judged end to end through the Prefect flow and `dvc repro`: the reward_model
    stage trains and saves a reward model, the pairs stage ranks samples with it (the gold grade
    is recorded, never used), evaluation reports the gold reward, the reward model's win rate
    against the starting model and the proxy-vs-gold gap, and the round promotes on gold_mean."""
    import subprocess
    import sys

    from datasets import load_from_disk

    from bvpo.flow import bvpo_pipeline
    from bvpo.rewards import RewardModel
    from bvpo.sequences import parse_completion
    from bvpo.tracking import tracking_uri
    from micro_params import MICRO, make_project

    overrides = {section: {**MICRO.get(section, {}), **values} for section, values in JUDGED.items()}
    project = make_project(tmp_path / "project", overrides)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(project))
    result = bvpo_pipeline(project_dir=str(project))

    trained = json.loads((project / "metrics/reward_model.json").read_text())
    assert trained["trained"] == 1 and 0.0 <= trained["accuracy_vs_gold"] <= 1.0
    judge = RewardModel(str(project / "data/reward_model"))
    pairs = {mode: load_from_disk(str(project / "data/pairs" / mode)).to_list() for mode in ("think", "nothink")}
    assert pairs["think"] or pairs["nothink"], "no pairs"

    def answer(completion: str, thinking: bool) -> str:
        for stop in ("<|im_end|>", "<|endoftext|>"):
            completion = completion.removesuffix(stop)
        return parse_completion(completion, thinking).answer

    # The pairs were ranked by the saved reward model (on the answer alone), not by the gold scorer.
    for mode, rows in pairs.items():
        for r in rows[:6]:
            texts = [answer(r["chosen"], mode == "think"), answer(r["rejected"], mode == "think")]
            scores = judge.score([r["prompt"]] * 2, texts)
            assert scores == pytest.approx([r["chosen_reward"], r["rejected_reward"]], abs=1e-4), (r, texts)
    stats = json.loads((project / "data/pairs/stats.json").read_text())
    assert 0.0 <= stats["think/mean_gold"] <= 1.0 and 0.0 <= stats["nothink/mean_gold"] <= 1.0

    results = json.loads((project / "metrics/eval.json").read_text())
    for name, entry in results.items():
        assert entry["gold_mean"] == pytest.approx((entry["gold_think"] + entry["gold_nothink"]) / 2)
        assert "reward_mean" in entry and "accuracy_mean" in entry
        if name != "base":
            for mode in ("think", "nothink"):
                assert entry[f"proxy_gold_gap_{mode}"] == pytest.approx(
                    entry[f"reward_win_rate_{mode}"] - entry[f"gold_win_rate_{mode}"])
    per_prompt = json.loads((project / "data/eval_prompts.json").read_text())["report"]["scores"]
    assert results["bvpo"]["gold_think"] == pytest.approx(sum(per_prompt["bvpo"]["gold_think"]) / len(per_prompt["bvpo"]["gold_think"]))
    assert result["decision"]["metric"] == "gold_mean"
    # dvc.lock records the new stage: a second `dvc repro` has nothing to do.
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=project, capture_output=True, text=True)
    assert "changed" not in status.stdout, status.stdout
