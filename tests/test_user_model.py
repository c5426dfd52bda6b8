"""The real-model path on the CPU: the micro pipeline with `model.path` pointing at a user's
model (byte-level BPE tokenizer, Qwen3-style or R1-Distill-style chat template), through the
same stage code a Qwen3 or DeepSeek-R1-Distill checkpoint takes. No embedded-only branch runs."""

from __future__ import annotations

import json

import pytest

from micro_params import make_project
from realistic_model import build_user_model, train_tokenizer

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("style", ["qwen3", "r1"])
def test_micro_pipeline_runs_on_a_users_model(style, tmp_path, monkeypatch, reward_model_dir):
    from datasets import load_from_disk

    from bvpo.config import load_params
    from bvpo.modeling import load_tokenizer, render_prompt
    from bvpo.sequences import encode
    from bvpo.stages import run_stage
    from bvpo.tracking import tracking_uri

    project = make_project(tmp_path / "project", {
        "train": {"steps": 2, "batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1, "lr": 1.0e-3,
                  "alpha_every": 2, "alpha_draws": 2, "alpha_draw_size": 2, "methods": {"bvpo": {"alpha": 0.5}}},
        "warmup": {"steps": 60, "batch_size": 32, "lr": 1.0e-2}})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(project))
    model_dir = build_user_model(tmp_path / f"user-{style}", style, load_params(project / "params.yaml"))
    (project / "data/chat.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                                                     ["Compute 12+30.", "Compute 45-7.", "Say hello."]))
    text = (project / "params.yaml").read_text().replace("path: null", f"path: {model_dir}")
    text = text.replace("win_rate_prompts: null", "win_rate_prompts: data/chat.jsonl").replace(
        "win_rate_reward_model: null", f"win_rate_reward_model: {reward_model_dir}")
    (project / "params.yaml").write_text(text)
    params = load_params(project / "params.yaml")

    for stage in ("prepare", "warmup", "policy", "sample", "pairs", "train", "evaluate"):
        run_stage(stage, params, project)

    # The base model is the user's directory, not a copy made by the project.
    assert json.loads((project / "data/base_model/bvpo_model_ref.json").read_text())["path"] == str(model_dir)
    samples = load_from_disk(str(project / "data/samples")).to_list()
    tokenizer = load_tokenizer(project / "data/policy")
    # R1 style: the prompt already opened the block and the model writes the trace directly.
    assert render_prompt(tokenizer, "Compute 1+2.", True).endswith("<think>\n") == (style == "r1")
    valid_think = [r for r in samples if r["mode"] == "think" and r["valid"] and r["trace"]]
    assert valid_think, "the SFT'd user model should close some think blocks"
    for r in valid_think[:5]:
        assert r["completion"].endswith(tokenizer.eos_token)
        # The scored completion holds the trace: decoding its tokens gives the trace back.
        e = encode(tokenizer, r["prompt"], r["completion"], thinking=True)
        scored = tokenizer.decode(e.input_ids[e.completion_start:])
        assert r["trace"] and r["trace"] in scored and "</think>" in scored
    # The training subprocess read the project's params (2 steps), not the
    # params.yaml of the directory pytest runs in.
    summary = json.loads((project / "data/models/bvpo/train_summary.json").read_text())
    assert summary["steps"] == 2
    stats = json.loads((project / "data/pairs/stats.json").read_text())
    assert stats["think/n_pairs"] > 0 and stats["nothink/n_pairs"] > 0
    results = json.loads((project / "metrics/eval.json").read_text())
    assert set(results) == {"base", "bvpo"} and results["bvpo"]["n_prompts"] == 12
    # The reward-model win rate against the starting model, over the three chat prompts.
    assert {results["bvpo"]["win_rate_think"] * 6, results["bvpo"]["win_rate_nothink"] * 6} <= set(range(7))
    assert "win_rate_think" not in results["base"]


@pytest.mark.parametrize("broken, message", [
    ("{{ messages[0].content }}", "does not honour enable_thinking"),
    ("{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' if add_generation_prompt }}",
     "does not honour enable_thinking"),
    ("{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
     "{%- else %}{{- '<think>\\nok\\n</think>\\n\\n' }}{%- endif %}", "already closes the think block"),
])
def test_templates_that_cannot_sample_a_trace_are_refused(broken, message):
    from bvpo.modeling import ModelError, check_thinking_template

    tokenizer = train_tokenizer("qwen3")
    tokenizer.chat_template = broken
    with pytest.raises(ModelError, match=message):
        check_thinking_template(tokenizer, "user-model")


def test_a_tokenizer_that_does_not_give_the_text_back_is_refused():
    from tokenizers import normalizers

    from bvpo.modeling import ModelError, check_thinking_template

    tokenizer = train_tokenizer("qwen3")
    # Like tokenizers that fold whitespace: the trace/answer boundary would be lost.
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace("\n", " ")
    with pytest.raises(ModelError, match="does not decode"):
        check_thinking_template(tokenizer, "user-model")
