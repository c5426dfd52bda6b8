"""The real-model path on the CPU, as the README walks it: `bvpo init --recipe` for a user's
model, a micro overlay, `bvpo check`, then every stage. The models are tiny random ones of the
real architectures (Qwen3; Qwen2, which DeepSeek-R1-Distill-Qwen is) with a byte-level BPE
tokenizer and the chat templates as the models ship them; the reward model ships its own
modeling code (as ArmoRM does); a MATH-500 slice is the benchmark. No embedded-only branch runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from micro_params import make_project
from realistic_model import STYLES, build_custom_reward_model, build_user_model, train_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
CHAT = [[{"role": "user", "content": "Compute 12+30."}],
        [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "Compute 45-7."}],
        [{"role": "user", "content": "Say hello."}]]
# The scenarios: Qwen3 on prompts with answers (verified reward, the reward model breaks ties, a
# win rate on chat prompts); R1-Distill on chat prompts without answers (the
# reward model ranks samples and judges the held-out answers).
CASES = {
    "qwen3": {"recipe": "qwen3-0.6b", "answers": True, "output": "rewards[1]",
              "overlay": {"pairs": {"reward": "verified_model"},
                          "evaluate": {"win_rate_prompts": "data/benchmarks/chat.jsonl"}}},
    "r1": {"recipe": "r1-distill-qwen-1.5b", "answers": False, "output": "score", "overlay": {}},
}


def micro_overlay(path: Path, case: dict, reward_model: Path) -> None:
    """A recipe's params.yaml cut down to seconds: short generations, two steps, one method."""
    raw = yaml.safe_load(path.read_text())
    overlay = {
        "model": {"max_length": 128, "max_length_nothink": None},
        "sample": {"k": 3, "max_new_tokens": 40},
        "pairs": {"reward_model_output": case["output"], "reward_model_trust_remote_code": True,
                  "reward_model": str(reward_model)},
        "train": {"steps": 2, "batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1, "alpha_every": 2,
                  "alpha_draws": 2, "alpha_draw_size": 2, "checkpoint_every": 0, "methods": {"bvpo": {"alpha": 0.5}}},
        "evaluate": {"max_new_tokens": 40, "benchmarks": {"math500": "data/benchmarks/math500_slice.jsonl"}},
    }
    for source in (overlay, case["overlay"]):
        for section, values in source.items():
            raw[section].update(values)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.mark.parametrize("style", list(CASES))
def test_micro_pipeline_runs_on_a_users_model(style, tmp_path, monkeypatch):
    from datasets import load_from_disk

    from bvpo.chat import opens_think_block
    from bvpo.cli import main
    from bvpo.config import load_params
    from bvpo.modeling import load_tokenizer
    from bvpo.rounds import decide
    from bvpo.sequences import encode
    from bvpo.stages import run_stage
    from bvpo.tracking import tracking_uri

    case = CASES[style]
    project = make_project(tmp_path / "project", {"warmup": {"steps": 200, "batch_size": 32, "lr": 1.0e-2}})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(project))
    model_dir = build_user_model(tmp_path / f"user-{style}", style, load_params(project / "params.yaml"))
    reward_model = build_custom_reward_model(tmp_path / "reward-model", train_tokenizer("qwen3"))
    rows = [{"prompt": f"Compute {10 + i}+{20 + 2 * i}.", "answer": str(30 + 3 * i)} for i in range(40)]
    if not case["answers"]:
        rows = [{"messages": [{"role": "user", "content": r["prompt"]}]} for r in rows]
    (project / "data/inputs/prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    math500 = (project / "data/benchmarks/math500.jsonl").read_text().splitlines()
    shortest = sorted(math500, key=lambda line: len(json.loads(line)["problem"]))[:3]
    (project / "data/benchmarks/math500_slice.jsonl").write_text("\n".join(shortest) + "\n")
    (project / "data/benchmarks/chat.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHAT))

    init = ["--project-dir", str(project), "init", "--model", str(model_dir), "--recipe", case["recipe"],
            "--prompts", "data/inputs/prompts.jsonl", "--force"]
    assert main(init + ([] if case["answers"] else ["--reward-model", str(reward_model)])) == 0
    micro_overlay(project / "params.yaml", case, reward_model)
    assert main(["--project-dir", str(project), "check"]) == 0
    params = load_params(project / "params.yaml")
    for stage in ("prepare", "warmup", "policy", "sample", "pairs", "train", "evaluate", "analyze"):
        run_stage(stage, params, project)

    # The base model is the user's directory, not a copy made by the project.
    assert json.loads((project / "data/base_model/bvpo_model_ref.json").read_text())["path"] == str(model_dir)
    tokenizer = load_tokenizer(project / "data/policy")
    assert opens_think_block(tokenizer) == (style == "r1")
    samples = load_from_disk(str(project / "data/samples")).to_list()
    stops = STYLES[style]["stops"]
    for r in samples:
        assert r["truncated"] or any(r["completion"].endswith(stop) for stop in stops)
    valid_think = [r for r in samples if r["mode"] == "think" and r["valid"] and r["trace"]]
    assert valid_think, "the SFT'd user model should close some think blocks"
    for r in valid_think[:5]:
        # The scored completion holds the trace: decoding its tokens gives the trace back.
        e = encode(tokenizer, r["prompt"], r["completion"], thinking=True)
        scored = tokenizer.decode(e.input_ids[e.completion_start:])
        assert r["trace"] in scored and "</think>" in scored
    stats = json.loads((project / "data/pairs/stats.json").read_text())
    assert stats["think/n_pairs"] > 0 and stats["nothink/n_pairs"] > 0
    summary = json.loads((project / "data/models/bvpo/train_summary.json").read_text())
    assert summary["steps"] == 2
    # Stored in the recipe's model.dtype; trained on fp32 masters.
    assert json.loads((project / "data/models/bvpo/config.json").read_text())["dtype"] == "bfloat16"

    results = json.loads((project / "metrics/eval.json").read_text())
    assert set(results) == {"base", "bvpo"}
    for entry in results.values():
        assert 0 <= entry["math500/accuracy_think"] <= 1 and 0 <= entry["benchmarks/accuracy_nothink"] <= 1
    per_prompt = json.loads((project / "data/eval_prompts.json").read_text())["scores"]
    if case["answers"]:
        assert 0 <= results["bvpo"]["accuracy_think"] <= 1
        # The reward-model win rate against the starting model, over the three chat prompts.
        assert {results["bvpo"]["win_rate_think"] * 6, results["bvpo"]["win_rate_nothink"] * 6} <= set(range(7))
        decision = decide(per_prompt, "bvpo", "accuracy_mean", 0.0, False)
    else:  # no answers: the reward model's mean score and win rate, no accuracy
        assert "accuracy_think" not in results["bvpo"]
        entry = results["bvpo"]
        assert entry["reward_mean"] == pytest.approx((entry["reward_think"] + entry["reward_nothink"]) / 2)
        halves = 2 * entry["n_prompts"]  # a win rate over the report prompts moves in half-prompt steps
        assert {entry["reward_win_rate_think"] * halves, entry["reward_win_rate_nothink"] * halves} <= \
            set(range(halves + 1))
        # The held-out prompts split: some select (per_prompt), the others report (eval.json).
        reported = json.loads((project / "data/eval_prompts.json").read_text())["report"]["scores"]
        assert len(reported["bvpo"]["reward_think"]) == entry["n_prompts"]
        assert len(per_prompt["bvpo"]["reward_think"]) + entry["n_prompts"] == 4
        decision = decide(per_prompt, "bvpo", "reward_mean", 0.0, False)
    assert decision["n_prompts"] == len(per_prompt["base"][next(iter(per_prompt["base"]))])


def test_users_files_are_dvc_dependencies(tmp_path):
    """A prompts file under data/inputs/ and a benchmark under data/benchmarks/ are followed by
    DVC through params.yaml alone: editing one makes its stage stale, dvc.yaml untouched."""
    project = make_project(tmp_path / "project")
    (project / "data/inputs/prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": f"Compute {i}+1.", "answer": str(i + 1)}) + "\n" for i in range(10, 30)))
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["data"]["source"] = "data/inputs/prompts.jsonl"
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    dvc = [sys.executable, "-m", "dvc"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # `bvpo` for dvc
    result = subprocess.run([*dvc, "repro", "--single-item", "prepare"], cwd=project, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    def stale() -> str:
        return subprocess.run([*dvc, "status", "prepare", "evaluate"], cwd=project, check=True,
                              capture_output=True, text=True).stdout

    assert "prepare:" not in stale()
    with open(project / "data/inputs/prompts.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "Compute 99+1.", "answer": "100"}) + "\n")
    assert "prepare:" in stale() and "modified:           data/inputs" in stale()
    (project / "data/benchmarks/extra.jsonl").write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n")
    assert "evaluate:" in stale() and "data/benchmarks" in stale()


def test_a_system_prompt_reaches_every_prompt(tmp_path):
    """data.system_prompt goes before every prompt of a user's file (train and held-out), and a
    chat that has a system turn of its own keeps it."""
    from datasets import load_from_disk

    from bvpo.config import load_params
    from bvpo.stages import run_stage

    project = make_project(tmp_path / "project")
    rows = [{"prompt": f"Compute {i}+1.", "answer": str(i + 1)} for i in range(10, 30)]
    rows.append({"messages": [{"role": "system", "content": "Mine."}, {"role": "user", "content": "Compute 5+5."}],
                 "answer": "10"})
    (project / "data/inputs/mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    (project / "data/inputs/chat.jsonl").write_text(json.dumps(rows[-1]) + "\n")
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["data"].update(source="data/inputs/mixed.jsonl", test_source="data/inputs/chat.jsonl",
                       system_prompt="Be brief.")
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run_stage("prepare", load_params(project / "params.yaml"), project)
    prompts = load_from_disk(str(project / "data/prompts"))
    assert [p[0] for p in prompts["train"]["prompt"]] == [{"role": "system", "content": "Be brief."}] * 20
    assert prompts["train"]["prompt"][0][1] == {"role": "user", "content": "Compute 10+1."}
    assert prompts["test"]["prompt"] == [rows[-1]["messages"]]
