import pytest

from bvpo.pairs import build_pairs
from bvpo.rewards import verified_reward


@pytest.mark.parametrize(
    "response, reference, reward",
    [("66", "66", 1.0), ("-12", "-12", 1.0), ("65", "66", 0.0), ("", "66", 0.0),
     ("The answer is 66.", "66", 1.0), ("\\frac{1}{2}", "0.5", 1.0), ("banana", "0.5", 0.0)],
)
def test_verified_reward(response, reference, reward):
    assert verified_reward(response, reference) == reward


def sample(pid, mode, completion, reward, valid=True):
    return {"prompt_id": pid, "prompt": f"p{pid}", "mode": mode, "completion": completion,
            "reward": reward, "valid": valid}


def test_best_against_worst_per_prompt_and_mode():
    samples = [
        sample(0, "think", "a", 1.0), sample(0, "think", "b", 0.0), sample(0, "think", "c", 1.0),
        sample(0, "think", "d", 0.0), sample(0, "nothink", "e", 1.0), sample(0, "nothink", "f", 1.0),
        sample(1, "nothink", "g", 0.0), sample(1, "nothink", "h", 1.0), sample(1, "nothink", "i", 0.0, valid=False),
    ]
    pairs = build_pairs(samples, max_pairs_per_prompt=2)
    assert [(p["chosen"], p["rejected"]) for p in pairs["think"]] == [("a", "d"), ("c", "b")]
    # Prompt 0 no-thinking: all tied, no pair. Prompt 1: the invalid sample never pairs.
    assert [(p["prompt_id"], p["chosen"], p["rejected"]) for p in pairs["nothink"]] == [(1, "h", "g")]


def test_pairs_stop_at_ties_and_respect_the_cap():
    samples = [sample(0, "think", c, r) for c, r in zip("abcd", (1.0, 1.0, 1.0, 0.0))]
    assert len(build_pairs(samples, 2)["think"]) == 1
    samples = [sample(0, "think", c, r) for c, r in zip("abcd", (1.0, 1.0, 0.0, 0.0))]
    assert len(build_pairs(samples, 1)["think"]) == 1


def test_graded_reward_prefers_close_numbers():
    from bvpo.rewards import graded_reward

    assert graded_reward("66", "66") == 1.0
    assert graded_reward("65", "66") == pytest.approx(0.25)
    assert graded_reward("56", "66") == pytest.approx(0.5 / 11)
    assert graded_reward("no idea", "66") == 0.0


# ----------------------------------------------------------------------------- a reward model
def scored(reward: str, reward_model_dir, rows: list[dict]) -> list[dict]:
    from bvpo.config import Params
    from bvpo.rewards import score_samples

    params = Params()
    params.pairs.reward, params.pairs.reward_model, params.pairs.reward_batch_size = reward, str(reward_model_dir), 2
    score_samples(rows, params)
    return rows


def row(prompt, mode, completion, response, answer="66", valid=True):
    return {"prompt_id": 0, "prompt": prompt, "mode": mode, "completion": completion, "response": response,
            "answer": answer, "valid": valid}


def test_reward_model_scores_the_prompt_and_final_answer_only(reward_model_dir, tokenizer):
    import torch
    from transformers import AutoModelForSequenceClassification

    rows = scored("model", reward_model_dir, [
        row("Compute 60+6.", "think", "<think>\n60+6=66\n</think>\n\n66<|im_end|>", "66"),
        row("Compute 60+6.", "nothink", "66<|im_end|>", "66"),
        row("Compute 60+6.", "think", "<think>\n60+6=67\nso 67\n</think>\n\n67<|im_end|>", "67"),
        row("Compute 9+9.", "nothink", "18 and some more words<|im_end|>", "18 and some more words"),
        row("Compute 60+6.", "think", "<think>\n60+", "", valid=False),
    ])
    # Same prompt and answer, different trace and mode: the same score.
    assert rows[0]["reward"] == pytest.approx(rows[1]["reward"], abs=1e-5)
    assert rows[4]["reward"] == 0.0
    # Each batched score equals the model run on that one text alone (no padding involved).
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    for r in rows[:4]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                              {"role": "assistant", "content": r["response"]}], tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            assert r["reward"] == pytest.approx(model(**ids).logits[0, 0].item(), abs=1e-4)
    assert len({round(r["reward"], 6) for r in rows[1:4]}) == 3


def test_verified_first_then_the_reward_model_breaks_ties(reward_model_dir):
    rows = scored("verified_model", reward_model_dir, [
        row("Compute 60+6.", "nothink", "66<|im_end|>", "66"),
        row("Compute 60+6.", "nothink", "The answer is 66<|im_end|>", "The answer is 66"),
        row("Compute 60+6.", "nothink", "67<|im_end|>", "67"),
        row("Compute 60+6.", "nothink", "65<|im_end|>", "65"),
    ])
    rewards = [r["reward"] for r in rows]
    assert min(rewards[:2]) > 1.0 > 0.5 > max(rewards[2:]) > 0.0  # every correct above every wrong
    assert rewards[0] != rewards[1] and rewards[2] != rewards[3]  # ties broken by the model
    pairs = build_pairs(rows, max_pairs_per_prompt=2)["nothink"]
    assert len(pairs) == 2 and all(p["chosen_reward"] > 1.0 > p["rejected_reward"] for p in pairs)


def test_reward_model_settings_are_checked(tmp_path, reward_model_dir):
    import yaml

    from bvpo.chat import ModelError
    from bvpo.config import ConfigError, load_params
    from bvpo.rewards import RewardModel

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"pairs": {"reward": "model"}}))
    with pytest.raises(ConfigError, match="pairs.reward_model: expected a reward model directory"):
        load_params(path)
    path.write_text(yaml.safe_dump({"pairs": {"reward": "verified_model", "reward_model": "missing/rm"}}))
    with pytest.raises(ConfigError, match="pairs.reward_model: expected an existing local model directory"):
        load_params(path)
    (tmp_path / "chat.jsonl").write_text('{"prompt": "Write a haiku."}\n')
    path.write_text(yaml.safe_dump({"evaluate": {"win_rate_prompts": "chat.jsonl"}}))
    with pytest.raises(ConfigError, match="evaluate.win_rate_reward_model: expected a reward model directory"):
        load_params(path)
    import json

    config = json.loads((reward_model_dir / "config.json").read_text())
    two = tmp_path / "two_labels"
    two.mkdir()
    for f in reward_model_dir.iterdir():
        (two / f.name).write_bytes(f.read_bytes())
    (two / "config.json").write_text(json.dumps({**config, "id2label": {"0": "a", "1": "b"},
                                                 "label2id": {"a": 0, "b": 1}}))
    with pytest.raises(ModelError, match="one output"):
        RewardModel(str(two))


def test_win_rate_against_the_starting_model(reward_model_dir):
    from bvpo.config import Params
    from bvpo.rewards import RewardModel
    from bvpo.evaluation import judge_answers, win_rates

    prompts = ["Compute 60+6.", "Compute 9+9.", "Compute 20-5.", "Compute 1+1."]
    answers = {"base": {"think": ["66", "18", None, "2"], "nothink": ["65", None, None, "3"]},
               "bvpo": {"think": ["66", "17", "15", None], "nothink": ["66", "18", None, "2"]}}
    params = Params()
    rates = win_rates(judge_answers(answers, prompts, str(reward_model_dir), params), list(answers))
    judge = RewardModel(str(reward_model_dir))

    def score(i, text):
        return judge.score([prompts[i]], [text])[0]

    # think: prompt 0 same answer (tie, 1/2); 1 judged; 2 valid vs invalid (win); 3 invalid vs valid (loss)
    expected_think = (0.5 + (score(1, "17") > score(1, "18")) + 1 + 0) / 4
    # no thinking: 0 judged; 1 valid vs invalid (win); 2 both invalid (tie); 3 judged
    expected_nothink = ((score(0, "66") > score(0, "65")) + 1 + 0.5 + (score(3, "2") > score(3, "3"))) / 4
    assert set(rates) == {"bvpo"}
    assert rates["bvpo"]["win_rate_think"] == pytest.approx(expected_think)
    assert rates["bvpo"]["win_rate_nothink"] == pytest.approx(expected_nothink)


@pytest.fixture(scope="module")
def custom_reward_model(tmp_path_factory):
    from realistic_model import build_custom_reward_model, train_tokenizer

    return build_custom_reward_model(tmp_path_factory.mktemp("custom_rm"), train_tokenizer("qwen3"), objectives=3)


def test_a_reward_model_with_its_own_code_needs_consent_and_names_its_output(custom_reward_model):
    """ArmoRM-style: the modeling code ships with the model (auto_map). Without
    trust_remote_code transformers would not run it (or a stock class would score with a random
    head); with it, the score is whichever output `pairs.reward_model_output` names."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from bvpo.chat import ModelError
    from bvpo.rewards import RewardModel

    with pytest.raises(ModelError, match="ships its own modeling code.*reward_model_trust_remote_code: true"):
        RewardModel(str(custom_reward_model))
    with pytest.raises(ModelError, match=r"output has no 'logits' \(it has \['rewards', 'gating_output', 'score'\]\)"):
        RewardModel(str(custom_reward_model), trust_remote_code=True).score(["Compute 1+2."], ["3"])
    with pytest.raises(ModelError, match=r"'rewards' has 3 values per sequence; name one .* rewards\[k\]"):
        RewardModel(str(custom_reward_model), trust_remote_code=True, output="rewards").score(["Compute 1+2."], ["3"])
    prompts, answers = ["Compute 1+2.", "Compute 10+20+30.", "Hi."], ["3", "60", "Hello there."]
    judge = RewardModel(str(custom_reward_model), trust_remote_code=True, output="score")
    objective = RewardModel(str(custom_reward_model), trust_remote_code=True, output="rewards[2]")
    model = AutoModelForSequenceClassification.from_pretrained(custom_reward_model, trust_remote_code=True).eval()
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        ids = judge.tokenizer(judge.render(prompt, answer), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model(**ids)
        # Batched (padded, sorted by length) scores equal each sequence scored alone.
        assert judge.score(prompts, answers, batch_size=2)[i] == pytest.approx(out.score[0].item(), abs=1e-5)
        assert objective.score(prompts, answers)[i] == pytest.approx(out.rewards[0, 2].item(), abs=1e-5)


def test_a_multi_label_classifier_needs_its_label_named(tmp_path, tokenizer):
    import torch
    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    from bvpo.chat import ModelError
    from bvpo.rewards import RewardModel

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_labels=3,
                         pad_token_id=tokenizer.pad_token_id)
    Qwen3ForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"logits\[0\]..logits\[2\]"):
        RewardModel(str(tmp_path))
    picked = RewardModel(str(tmp_path), output="logits[1]")
    all_logits = picked.model(**picked.tokenizer([picked.render("Compute 1+2.", "3")], return_tensors="pt",
                                                 add_special_tokens=False)).logits
    assert picked.score(["Compute 1+2."], ["3"])[0] == pytest.approx(all_logits[0, 1].item(), abs=1e-5)
