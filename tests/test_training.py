"""The training recipe for real: `accelerate launch` subprocesses, 1 and 2 gloo processes,
checkpoints, a killed-and-resumed run, `auto` α."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from bvpo.chat import completion_text
from bvpo.config import load_params
from bvpo.modeling import resolve_precision, save_model
from bvpo.train import accelerate_command
from bvpo.tracking import tracking_uri
from micro_params import write_micro_params

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
FIXED = {"bvpo": {"alpha": 0.5}, "dpo_think": {"alpha": 1.0}, "dpo_nothink": {"alpha": 0.0}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer, tiny_model):
    root = tmp_path_factory.mktemp("train")
    save_model(tiny_model, tokenizer, root / "base")
    eos = tokenizer.eos_token
    for mode, thinking in (("think", True), ("nothink", False)):
        rows = []
        for i in range(16):
            a, b = 10 + i, 20 + 3 * i
            trace = f"{a}+{b}={a + b}" if thinking else None
            wrong = f"{a}+{b}={a + b + 1 + i % 3}" if thinking else None
            rows.append({"prompt_id": i, "prompt": f"Compute {a}+{b}.",
                         "chosen": completion_text(trace, str(a + b), eos),
                         "rejected": completion_text(wrong, str(a + b + 1 + i % 3), eos),
                         "chosen_reward": 1.0, "rejected_reward": 0.0})
        Dataset.from_list(rows).save_to_disk(str(root / "pairs" / mode))
    return root


def run_training(root: Path, tag: str, train: dict, extra_env: dict | None = None, params: dict | None = None,
                 pairs: Path | None = None) -> subprocess.CompletedProcess:
    methods = train.get("methods", FIXED)
    params_file = write_micro_params(root / f"params-{tag}.yaml", {
        "tracking": {"register_method": next(iter(methods))},
        "train": {"steps": 4, "batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1, "lr": 1e-3,
                  "alpha_every": 2, "alpha_draws": 2, "alpha_draw_size": 2, "checkpoint_every": 0,
                  "methods": FIXED, **train},
        "model": {"max_length": 96},
        **(params or {}),
    })
    loaded = load_params(params_file)
    cmd, env = accelerate_command(loaded, ["--params", str(params_file), "--pairs", str(pairs or root / "pairs"),
                                           "--base", str(root / "base"), "--work", str(root / f"work-{tag}"),
                                           "--cache", str(root / "cache"), "--project-dir", str(root)],
                                  threads_per_process=1)  # same float reduction order in every run
    env.update({"MLFLOW_TRACKING_URI": tracking_uri(root), "OMP_NUM_THREADS": "1", **(extra_env or {})})
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)


def final_weights(root: Path, tag: str, method: str) -> dict[str, torch.Tensor]:
    return load_file(root / f"work-{tag}" / method / "final" / "model.safetensors")


def history(root: Path, tag: str, method: str) -> list[dict]:
    return json.loads((root / f"work-{tag}" / method / "final" / "history.json").read_text())["history"]


def test_two_processes_match_one_process(inputs):
    one = run_training(inputs, "p1", {"num_processes": 1})
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_training(inputs, "p2", {"num_processes": 2})
    assert two.returncode == 0, two.stderr[-3000:]
    base = load_file(inputs / "base" / "model.safetensors")
    for method in FIXED:
        w1, w2 = final_weights(inputs, "p1", method), final_weights(inputs, "p2", method)
        moved = max((w1[k] - base[k]).abs().max().item() for k in base)
        assert moved > 1e-4, f"{method} did not train"
        for key in base:
            torch.testing.assert_close(w2[key], w1[key], atol=2e-6, rtol=1e-4)
        h1, h2 = history(inputs, "p1", method), history(inputs, "p2", method)
        assert [r["loss"] for r in h2] == pytest.approx([r["loss"] for r in h1], rel=1e-5)


def test_packed_rows_on_two_processes_train_like_micro_batches_on_one(inputs):
    """train.max_tokens_per_micro_batch changes how a step's pairs are laid out, not the
    update: 2 processes with packed rows end at the weights and losses of 1 process with
    padded micro-batches (fp32, every fixed-α method, precomputed reference in its layout)."""
    padded = run_training(inputs, "unpacked", {"num_processes": 1, "mixed_precision": "fp32"})
    assert padded.returncode == 0, padded.stderr[-3000:]
    packed = run_training(inputs, "packed", {"num_processes": 2, "mixed_precision": "fp32",
                                             "max_tokens_per_micro_batch": 200})
    assert packed.returncode == 0, packed.stderr[-3000:]
    base = load_file(inputs / "base" / "model.safetensors")
    for method in FIXED:
        w1, w2 = final_weights(inputs, "unpacked", method), final_weights(inputs, "packed", method)
        moved = torch.cat([(w1[k] - base[k]).abs().flatten() for k in base])
        diff = torch.cat([(w2[k] - w1[k]).abs().flatten() for k in base])
        assert moved.median() > 1e-4, f"{method} did not train"
        # Summation order differs between the layouts; Adam turns that noise into a visible step
        # in the few weights whose gradient is near zero (measured: up to 9 of 21,888 past 1e-6,
        # at most 4e-5; the median 1e-8). A wrong mask or position would move every weight by
        # about the training's step (median 2e-3), so the bulk is what is checked.
        assert diff.median() < 1e-6 and torch.quantile(diff, 0.99) < 1e-5, \
            (method, diff.median().item(), torch.quantile(diff, 0.99).item(), diff.max().item())
        h1, h2 = history(inputs, "unpacked", method), history(inputs, "packed", method)
        assert [r["loss"] for r in h2] == pytest.approx([r["loss"] for r in h1], rel=1e-5)
        logratios = [h2[0][f"{mode}/abs_logratio"] for mode in ("think", "nothink") if f"{mode}/abs_logratio" in h2[0]]
        assert logratios and max(logratios) < 1e-5  # the reference was scored in the packed layout


def test_flex_attention_is_refused_on_a_cpu(inputs):
    result = run_training(inputs, "flexcpu", {"steps": 1, "attention": "flex_attention",
                                              "max_tokens_per_micro_batch": 200})
    assert result.returncode != 0
    assert "train.attention flex_attention needs a GPU" in result.stderr, result.stderr[-2000:]
    assert not (inputs / "work-flexcpu").exists() or not any((inputs / "work-flexcpu").rglob("final"))


def test_reference_precompute_is_sharded_over_processes(inputs):
    """With 2 processes each scores half the pairs; the merged cache equals 1 process's."""
    cache = inputs / "cache"
    caches = {}
    for processes in (1, 2):
        for old in cache.glob("reference-*.pt"):
            old.unlink()
        result = run_training(inputs, f"reference{processes}", {"num_processes": processes, "steps": 1})
        assert result.returncode == 0, result.stderr[-3000:]
        [written] = cache.glob("reference-*.pt")
        caches[processes] = torch.load(written)
        output = result.stdout + result.stderr
        for rank in range(processes):
            assert f"reference log-probs (think): process {rank} of {processes} scored" in output, output[-3000:]
    for mode in ("think", "nothink"):
        for one, two in zip(caches[1][mode], caches[2][mode]):
            assert one.shape == two.shape and len(one) > 0
            torch.testing.assert_close(two, one, atol=1e-4, rtol=1e-5)


RESUME = {"steps": 6, "checkpoint_every": 2, "methods": {"bvpo": {"alpha": 0.5}, "bvpo_auto": {"alpha": "auto"},
                                                        "dpo_think": {"alpha": 1.0}, "dpo_nothink": {"alpha": 0.0}}}


@pytest.fixture(scope="module")
def uninterrupted(inputs):
    """Four methods, 1 and 2 processes, run to the end without interruption."""
    for processes in (1, 2):
        result = run_training(inputs, f"full{processes}", {**RESUME, "num_processes": processes})
        assert result.returncode == 0, result.stderr[-3000:]
    return inputs


@pytest.mark.parametrize("processes", [1, 2])
def test_killed_run_resumes_every_method_to_the_same_weights(uninterrupted, processes):
    """SIGKILL while the second method trains, after its first checkpoint; the rerun reuses the
    finished first method, resumes the second (α state included) and trains the rest: every
    method ends bit for bit where an uninterrupted run ends."""
    inputs, tag = uninterrupted, f"resume{processes}"
    settings = {**RESUME, "num_processes": processes}
    killed = run_training(inputs, tag, settings, {"BVPO_KILL_AFTER_CHECKPOINT": "bvpo_auto:3"})
    assert killed.returncode != 0
    assert (inputs / f"work-{tag}" / "bvpo" / "final").is_dir()
    checkpoint = inputs / f"work-{tag}" / "bvpo_auto" / "checkpoints" / "step-000003"
    assert [c.name for c in checkpoint.parent.glob("step-*")] == ["step-000003"]
    saved = sorted(p.name for p in checkpoint.iterdir())
    # This method's model and optimizer only, not the first method's beside them.
    assert [n for n in saved if n.startswith("model")] == ["model.safetensors"], saved
    assert [n for n in saved if n.startswith("optimizer")] == ["optimizer.bin"], saved
    assert not (inputs / f"work-{tag}" / "bvpo_auto" / "final").exists()
    resumed = run_training(inputs, tag, settings)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert "train bvpo: already trained in an earlier, interrupted run" in output
    assert "train bvpo_auto: resuming from step-000003" in output
    for method in RESUME["methods"]:
        a, b = final_weights(inputs, f"full{processes}", method), final_weights(inputs, tag, method)
        for key in a:
            assert torch.equal(a[key], b[key]), (method, key)
        assert history(inputs, tag, method) == history(inputs, f"full{processes}", method)


def kill_then_resume_with(inputs: Path, tag: str, setting: dict, says: str) -> None:
    """Kill a 1-process run of RESUME's methods after bvpo_auto's step-3 checkpoint, rerun it with
    `setting` (outside the fingerprint): the finished method is reused, bvpo_auto resumes, and
    the rerun `says` the setting took effect."""
    killed = run_training(inputs, tag, {**RESUME, "num_processes": 1}, {"BVPO_KILL_AFTER_CHECKPOINT": "bvpo_auto:3"})
    assert killed.returncode != 0
    resumed = run_training(inputs, tag, {**RESUME, "num_processes": 1, **setting})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert "train bvpo: already trained in an earlier, interrupted run" in output
    assert says in output
    assert "train bvpo_auto: resuming from step-000003" in output


def test_a_run_killed_without_gradient_checkpointing_resumes_with_it_to_the_same_weights(uninterrupted):
    """What a user does after running out of memory: turn on train.gradient_checkpointing and
    rerun. The setting is not part of the fingerprint, so the finished method is reused and the
    interrupted one resumes from its checkpoint, and recomputing the activations changes no
    gradient: every method ends bit for bit where the uninterrupted run (without it) ends."""
    inputs, tag = uninterrupted, "resume-ckpt"
    kill_then_resume_with(inputs, tag, {"gradient_checkpointing": True},
                          "train bvpo_auto: gradient checkpointing, 2 decoder layers recomputed in the backward")
    for method in RESUME["methods"]:
        a, b = final_weights(inputs, "full1", method), final_weights(inputs, tag, method)
        for key in a:
            assert torch.equal(a[key], b[key]), (method, key)
        assert history(inputs, tag, method) == history(inputs, "full1", method)


def test_a_run_killed_without_compile_resumes_with_compiled_layers_to_the_uninterrupted_weights(uninterrupted):
    """Turning train.compile on for a rerun (say, after the first run showed how slow a step
    is), on 2 processes (DDP around the compiled layers): neither is part of the fingerprint, so
    the finished method is reused and the killed one resumes from its checkpoint, and ends where
    the uninterrupted uncompiled 1-process run ends, to float rounding (fused kernels and the
    processes' gradient average sum in another order)."""
    inputs, tag = uninterrupted, "resume-compile"
    kill_then_resume_with(inputs, tag, {"compile": True, "num_processes": 2},
                          "train bvpo_auto: torch.compile on 2 decoder layers")
    base = load_file(inputs / "base" / "model.safetensors")
    a, b = final_weights(inputs, "full1", "bvpo_auto"), final_weights(inputs, tag, "bvpo_auto")
    assert a.keys() == b.keys()  # compiled in place: the saved names are the model's own
    for key in a:
        moved = (a[key] - base[key]).norm()
        assert (a[key] - b[key]).norm() <= 1e-3 * moved + 1e-6, key
    for one, other in zip(history(inputs, "full1", "bvpo_auto"), history(inputs, tag, "bvpo_auto")):
        assert other["step"] == one["step"] and other["alpha"] == pytest.approx(one["alpha"], rel=1e-3)
        assert other["loss"] == pytest.approx(one["loss"], rel=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_auto_alpha_is_the_same_with_one_and_two_processes(uninterrupted, precision):
    """A draw's pairs do not depend on the process count. In fp32 the statistics agree to
    float rounding; under `auto` (bf16 where the CPU has it, as users run) to bf16's: two
    processes split a draw into other micro-batches, and bf16 rounds each one's gradient."""
    tags = ["full1", "full2"]
    if precision == "fp32":
        tags = ["fp32-1", "fp32-2"]
        for processes, tag in enumerate(tags, 1):
            result = run_training(uninterrupted, tag, {**RESUME, "num_processes": processes, "mixed_precision": "fp32",
                                                       "methods": {"bvpo_auto": {"alpha": "auto"}}})
            assert result.returncode == 0, result.stderr[-3000:]
    bf16 = precision == "auto" and resolve_precision("auto", torch.device("cpu")) == "bf16"
    rel = 3e-2 if bf16 else 1e-3
    one, two = history(uninterrupted, tags[0], "bvpo_auto"), history(uninterrupted, tags[1], "bvpo_auto")
    assert [r["step"] for r in one if "alpha_star" in r] == [0, 2, 4]
    for a, b in zip(one, two):
        assert b["alpha"] == pytest.approx(a["alpha"], rel=rel / 10, abs=1e-6)
        if "alpha_star" in a:
            for key in ("alpha_star", "alpha_star_draw", "grad/var_think", "grad/var_nothink", "grad/bias_gap_sq_raw"):
                assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-9), key
    assert len({round(r["alpha"], 6) for r in one}) > 1  # it did move


@pytest.mark.parametrize("precision,reference,compiled", [
    ("fp32", "precomputed", False), ("fp32", "live", False), ("bf16", "precomputed", False), ("bf16", "live", False),
    ("bf16", "precomputed", True), ("bf16", "live", True)])
def test_policy_and_reference_agree_at_step_zero(inputs, precision, reference, compiled):
    """The reference is scored under the policy's autocast: the log-ratio starts at 0. With
    train.compile the reference's layers are compiled too: under bf16 compiled kernels round
    otherwise than eager ones (if only the policy's were: 1e-3 here, 0.04 per sequence on the
    embedded model)."""
    tag = f"logratio-{precision}-{reference}-{compiled}"
    result = run_training(inputs, tag, {"steps": 1, "mixed_precision": precision, "reference": reference,
                                        "compile": compiled, "methods": {"bvpo": {"alpha": 0.5}}})
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("torch.compile on 2 decoder layers" in result.stdout + result.stderr) == compiled
    first = history(inputs, tag, "bvpo")[0]
    assert first["think/abs_logratio"] < 1e-6 and first["nothink/abs_logratio"] < 1e-6, first
    assert abs(first["think/chosen_reward"]) < 1e-6


def test_pairs_that_do_not_fit_are_skipped_and_counted(tokenizer):
    from bvpo.train import encode_pairs

    eos = tokenizer.eos_token
    rows = [{"prompt": "Compute 1+1.", "chosen": completion_text("1+1=2 " * i, "2", eos),
             "rejected": completion_text("1+1=3 " * (i % 3), "3", eos)} for i in range(1, 9)]
    lengths = [len(x.input_ids) for x in encode_pairs(tokenizer, rows, True, 10_000)[0]]
    limit = sorted(lengths)[3]  # the 4 shortest chosen fit; their rejected are shorter still
    chosen, rejected, skipped = encode_pairs(tokenizer, rows, True, limit)
    assert (len(chosen), len(rejected), skipped) == (4, 4, 4)
    assert all(len(c.input_ids) <= limit and len(r.input_ids) <= limit for c, r in zip(chosen, rejected))
    assert all(c.completion_start == chosen[0].completion_start for c in chosen)  # prompts kept whole


def test_too_many_long_pairs_stop_with_a_clear_error(inputs):
    result = run_training(inputs, "toolong", {"methods": {"bvpo": {"alpha": 0.5}}},
                          params={"model": {"max_length": 45}, "sample": {"max_new_tokens": 1},
                                  "evaluate": {"max_new_tokens": 1}})
    assert result.returncode != 0
    message = [line for line in result.stderr.splitlines() if line.startswith("bvpo train: error:")]
    assert message and "16 of 16 pairs do not fit model.max_length=45" in message[0], result.stderr[-2000:]
    assert "train.max_skipped_fraction" in message[0]


@pytest.mark.parametrize("telemetry, methods, expected", [
    (True, {"bvpo": {"alpha": 1.0}}, "train.telemetry"),
    (False, {"bvpo": {"alpha": 0.5}}, "train.methods.bvpo (alpha: 0.5)"),
    (False, {"bvpo": {"alpha": "auto"}}, "train.methods.bvpo (alpha: auto)"),
])
def test_empty_empty_trace_pairs_are_a_clear_error(inputs, tmp_path, telemetry, methods, expected):
    shutil.copytree(inputs / "pairs" / "think", tmp_path / "pairs" / "think")
    Dataset.from_dict({c: [] for c in ("prompt_id", "prompt", "chosen", "rejected")}).save_to_disk(
        str(tmp_path / "pairs" / "nothink"), num_shards=1)  # as the pairs stage writes an empty set
    result = run_training(inputs, f"empty-{telemetry}-{len(expected)}", {"telemetry": telemetry, "methods": methods},
                          pairs=tmp_path / "pairs")
    assert result.returncode != 0, result.stderr[-2000:]
    message = [line for line in result.stderr.splitlines() if line.startswith("bvpo train: error:")]
    assert message and "no usable empty-trace pairs" in message[0] and expected in message[0], result.stderr[-2000:]


def test_gradient_telemetry_only_watches(inputs):
    """Telemetry (gradient draws every alpha_every steps, the step's per-estimator norms) reads
    gradients and never changes the update: a fixed-α method trains to the same weights without
    it, so experiments can turn it off for speed."""
    for tag, telemetry in (("watched", True), ("unwatched", False)):
        result = run_training(inputs, tag, {"telemetry": telemetry, "methods": {"bvpo": {"alpha": 0.5}}})
        assert result.returncode == 0, result.stderr[-3000:]
    watched, unwatched = final_weights(inputs, "watched", "bvpo"), final_weights(inputs, "unwatched", "bvpo")
    assert all(torch.equal(watched[k], unwatched[k]) for k in watched)
    rows = history(inputs, "watched", "bvpo")
    assert any("grad/var_think" in r for r in rows) and not any("grad/var_think" in r
                                                                for r in history(inputs, "unwatched", "bvpo"))
    assert [r["loss"] for r in rows] == [r["loss"] for r in history(inputs, "unwatched", "bvpo")]


def test_a_trace_only_method_trains_without_empty_pairs(inputs, tmp_path):
    shutil.copytree(inputs / "pairs" / "think", tmp_path / "pairs" / "think")
    Dataset.from_dict({c: [] for c in ("prompt_id", "prompt", "chosen", "rejected")}).save_to_disk(
        str(tmp_path / "pairs" / "nothink"), num_shards=1)  # as the pairs stage writes an empty set
    result = run_training(inputs, "traceonly", {"telemetry": False, "steps": 2, "methods": {"dpo_think": {"alpha": 1.0}}},
                          pairs=tmp_path / "pairs")
    assert result.returncode == 0, result.stderr[-2000:]


def test_auto_alpha_estimates_logs_and_clips(inputs):
    import mlflow

    result = run_training(inputs, "auto", {"num_processes": 2, "alpha_min": 0.2, "alpha_max": 0.9,
                                           "methods": {"auto": {"alpha": "auto"}}})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = history(inputs, "auto", "auto")
    estimates = [r for r in rows if "alpha_star" in r]
    assert [r["step"] for r in estimates] == [0, 2]
    for r in rows:
        assert 0.2 <= r["alpha"] <= 0.9
    first = estimates[0]
    assert first["alpha"] == pytest.approx(min(max(first["alpha_star"], 0.2), 0.9))
    second = estimates[1]
    assert second["alpha"] == pytest.approx(min(max(0.8 * first["alpha"] + 0.2 * second["alpha_star"], 0.2), 0.9))
    for key in ("grad/var_think", "grad/var_nothink", "grad/bias_gap_sq", "grad/var_mixed", "alpha_sq",
                "grad/step_cos_think_nothink", "grad/step_norm_think"):
        assert key in first
    client = mlflow.MlflowClient(tracking_uri(inputs))
    run = client.search_runs([client.get_experiment_by_name("bvpo").experiment_id],
                             "tags.method = 'auto'")[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "alpha_star")] == [0, 2]


def test_live_reference_matches_precomputed(inputs):
    pre = run_training(inputs, "pre", {"methods": {"bvpo": {"alpha": 0.5}}, "steps": 2})
    live = run_training(inputs, "live", {"methods": {"bvpo": {"alpha": 0.5}}, "steps": 2, "reference": "live"})
    assert pre.returncode == 0 and live.returncode == 0, live.stderr[-3000:]
    a, b = final_weights(inputs, "pre", "bvpo"), final_weights(inputs, "live", "bvpo")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    assert list((inputs / "cache").glob("reference-*.pt"))


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(inputs):
    result = run_training(inputs, "nan", {"steps": 8, "lr": 1e12, "checkpoint_every": 1, "max_grad_norm": 1e12,
                                          "methods": {"bvpo": {"alpha": 0.5}}})
    assert result.returncode != 0, result.stderr[-2000:]
    message = [line for line in result.stderr.splitlines() if line.startswith("bvpo train: error:")]
    assert message and "non-finite" in message[0] and "last good checkpoint is kept" in message[0]
    assert list((inputs / "work-nan" / "bvpo" / "checkpoints").glob("step-*/bvpo_state.json"))
    assert not (inputs / "work-nan" / "bvpo" / "final").exists()


def shifted_reference_pairs(inputs: Path, tokenizer, model, rows: dict | None = None) -> dict:
    """The fixture's pairs (or `rows`, per mode) encoded per mode, with reference log-probs of
    `model` shifted apart, so the DPO term has a non-trivial gradient (a reference equal to the
    policy would not)."""
    from bvpo.reference import reference_logps
    from bvpo.sequences import encode
    from bvpo.train import PairSet, load_pair_rows

    rows = rows or load_pair_rows(inputs / "pairs")
    data = {}
    for mode in ("think", "nothink"):
        chosen = [encode(tokenizer, r["prompt"], r["chosen"], mode == "think") for r in rows[mode]]
        rejected = [encode(tokenizer, r["prompt"], r["rejected"], mode == "think") for r in rows[mode]]
        ref_chosen, ref_rejected = reference_logps(model, chosen, rejected, tokenizer.pad_token_id)
        data[mode] = PairSet(chosen, rejected, ref_chosen - 0.3, ref_rejected + 0.2)
    return data


@pytest.mark.parametrize("cut", [{"micro_batch_size": 2}, {"max_tokens_per_micro_batch": 200}],
                         ids=["micro-batches", "packed-rows"])
def test_accumulated_update_gradient_is_the_bvpo_objective_gradient(inputs, tokenizer, tiny_model, cut):
    """The trainer's micro-batched (or packed), per-estimator backward passes give exactly the
    gradient of α·L_trace + (1−α)·L_empty computed in one autograd call over padded sequences."""
    from accelerate import Accelerator

    from bvpo.losses import bvpo_loss
    from bvpo.train import PairLoss

    params = load_params(write_micro_params(inputs / "params-grad.yaml", {
        "train": {**cut, "nll_weight": 0.7, "beta": 1.5}, "model": {"max_length": 96}}))
    data = shifted_reference_pairs(inputs, tokenizer, tiny_model)
    pair_loss = PairLoss(params, data, tokenizer.pad_token_id)
    accelerator = Accelerator(cpu=True)
    model = tiny_model.train()
    alpha, indices = 0.3, [0, 3, 5, 7, 9, 11]
    if "max_tokens_per_micro_batch" in cut:
        from bvpo.packing import pair_rows

        rows = pair_rows(data["think"].chosen, data["think"].rejected, indices, 200)
        assert 1 < len(rows) < len(indices), rows  # several pairs per row, several rows

    model.zero_grad(set_to_none=True)
    pair_loss.update_pass(model, "think", indices, len(indices), accelerator, sync_last=False, alpha=alpha)
    pair_loss.update_pass(model, "nothink", indices, len(indices), accelerator, sync_last=True, alpha=alpha)
    accumulated = [p.grad.clone() for p in model.parameters()]

    model.zero_grad(set_to_none=True)
    whole = PairLoss(load_params(write_micro_params(inputs / "params-grad1.yaml", {
        "train": {"micro_batch_size": 64, "nll_weight": 0.7, "beta": 1.5}, "model": {"max_length": 96}})),
        data, tokenizer.pad_token_id)
    trace, _, _ = whole.loss(model, "think", indices)
    empty, _, _ = whole.loss(model, "nothink", indices)
    bvpo_loss(trace.loss, empty.loss, alpha).backward()
    for a, b in zip(accumulated, (p.grad for p in model.parameters())):
        # Float noise scales with the tensor: packed rows sum in another order, and on an AVX2 CPU
        # the embedding's gradient (max 0.9) differed by 3e-6: the bound stays 1e-5 of each tensor's scale.
        torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=1e-4)
    model.zero_grad(set_to_none=True)


def test_gradient_checkpointing_recomputes_every_layer_and_keeps_the_update_gradient(inputs, tokenizer, tiny_model):
    """train.gradient_checkpointing: the trainer's update passes (both estimators, micro-batches
    of 2, under the autocast and attention switch the trainer uses) run every decoder layer
    twice, the forward and its recomputation in the backward, and give exactly the gradient
    of the same passes without it; under bf16 autocast too (the recomputation must run under the
    autocast of the forward it replays, not the fp32 of the backward)."""
    import copy

    from accelerate import Accelerator

    from bvpo.chat import ModelError
    from bvpo.modeling import sdpa_in_fp32
    from bvpo.train import PairLoss, enable_gradient_checkpointing

    params = load_params(write_micro_params(inputs / "params-ckpt.yaml", {
        "train": {"micro_batch_size": 2}, "model": {"max_length": 96}}))
    pair_loss = PairLoss(params, shifted_reference_pairs(inputs, tokenizer, tiny_model), tokenizer.pad_token_id)
    accelerator = Accelerator(cpu=True)  # fp32: one AcceleratorState per process; bf16 below
    indices = [0, 3, 5, 7, 9, 11]

    def gradient(checkpointing: bool, precision: str = "fp32"):
        model = copy.deepcopy(tiny_model)
        if checkpointing:
            assert enable_gradient_checkpointing(model) == len(model.model.layers) == 2
        model.train()
        calls = []
        # A module inside the layer (transformers checkpoints the layer's forward, not its hooks), and
        # a pre-hook: the recomputation stops inside the MLP once its last saved tensor is back.
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        if precision == "fp32":
            pair_loss.update_pass(model, "think", indices, len(indices), accelerator, sync_last=False, alpha=0.3)
            pair_loss.update_pass(model, "nothink", indices, len(indices), accelerator, sync_last=True, alpha=0.3)
        else:
            # As the trainer does: the backward (and so the recomputation) inside the attention switch.
            with sdpa_in_fp32(model):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = pair_loss.loss(model, "think", indices)[0].loss
                loss.backward()
        return [p.grad for p in model.parameters()], len(calls)

    (plain, plain_calls), (recomputed, recomputed_calls) = gradient(False), gradient(True)
    assert plain_calls == 6 and recomputed_calls == 12  # 3 micro-batches of 2 pairs per estimator
    for a, b in zip(recomputed, plain):
        assert torch.equal(a, b)
    (plain, plain_calls), (recomputed, recomputed_calls) = gradient(False, "bf16"), gradient(True, "bf16")
    assert plain_calls == 1 and recomputed_calls == 2
    for a, b in zip(recomputed, plain):
        assert torch.equal(a, b)
    tiny_model.supports_gradient_checkpointing = False
    try:
        with pytest.raises(ModelError, match="train.gradient_checkpointing: Qwen3ForCausalLM does not support"):
            enable_gradient_checkpointing(tiny_model)
    finally:
        del tiny_model.supports_gradient_checkpointing


def test_compiled_layers_keep_the_update_gradient(inputs, tokenizer, tiny_model):
    """train.compile: the trainer's update passes (both estimators, micro-batches of uneven
    lengths) run through compiled decoder layers and give the gradient of the same passes
    uncompiled, to float rounding; with gradient checkpointing on as well (the recomputation
    replays the compiled layer)."""
    import copy

    from accelerate import Accelerator
    from torch._dynamo.utils import counters

    from bvpo.modeling import compile_decoder_layers
    from bvpo.train import PairLoss, enable_gradient_checkpointing

    params = load_params(write_micro_params(inputs / "params-compile.yaml", {
        "train": {"micro_batch_size": 2}, "model": {"max_length": 96}}))
    # Sums of 1 to 6 terms: micro-batches of several lengths, which one dynamic graph must serve.
    eos, rows = tokenizer.eos_token, {"think": [], "nothink": []}
    for i in range(6):
        terms = [str(10 + 7 * j + i) for j in range(i + 1)]
        total = sum(map(int, terms))
        for mode in rows:
            trace, wrong = ("+".join(terms) + f"={total}", "+".join(terms) + f"={total + 1}") \
                if mode == "think" else (None, None)
            rows[mode].append({"prompt": "Compute " + "+".join(terms) + ".",
                               "chosen": completion_text(trace, str(total), eos),
                               "rejected": completion_text(wrong, str(total + 1), eos)})
    pair_loss = PairLoss(params, shifted_reference_pairs(inputs, tokenizer, tiny_model, rows), tokenizer.pad_token_id)
    accelerator = Accelerator(cpu=True)
    indices = list(range(6))
    assert len({len(pair_loss.data["think"].chosen[i].input_ids) for i in indices}) == 6

    def gradient(compiled: bool, checkpointing: bool = False):
        model = copy.deepcopy(tiny_model)
        if checkpointing:
            enable_gradient_checkpointing(model)
        if compiled:
            assert compile_decoder_layers(model, "cpu") == len(model.model.layers) == 2
        model.train()
        for mode, last in (("think", False), ("nothink", True)):
            pair_loss.update_pass(model, mode, indices, len(indices), accelerator, sync_last=last, alpha=0.3)
        assert model.state_dict().keys() == tiny_model.state_dict().keys()
        return [p.grad for p in model.parameters()]

    plain = gradient(False)
    for checkpointing in (False, True):
        counters.clear()
        compiled = gradient(True, checkpointing)
        assert counters["stats"]["unique_graphs"] >= 1  # the layers did run compiled
        for a, b in zip(compiled, plain):
            assert (a - b).norm() <= 1e-5 * b.norm() + 1e-9


def test_a_method_can_choose_its_own_preference_loss(inputs, tokenizer, tiny_model):
    """A method's `loss_type: ipo` trains under train.loss_type sigmoid exactly as train.loss_type
    ipo would: one run (or experiment) can hold a DPO and an IPO variant of the same mix."""
    from bvpo.sequences import encode, score_pairs
    from bvpo.reference import reference_logps
    from bvpo.train import PairLoss, PairSet, load_pair_rows

    rows = load_pair_rows(inputs / "pairs")["think"][:6]
    chosen = [encode(tokenizer, r["prompt"], r["chosen"], True) for r in rows]
    rejected = [encode(tokenizer, r["prompt"], r["rejected"], True) for r in rows]
    ref_chosen, ref_rejected = reference_logps(tiny_model, chosen, rejected, tokenizer.pad_token_id)
    data = {"think": PairSet(chosen, rejected, ref_chosen - 0.3, ref_rejected + 0.2)}

    def loss(loss_type_setting: str, method_loss_type: str | None) -> float:
        params = load_params(write_micro_params(inputs / f"params-{loss_type_setting}.yaml", {
            "train": {"loss_type": loss_type_setting, "beta": 1.5, "nll_weight": 0.0}, "model": {"max_length": 96}}))
        pair_loss = PairLoss(params, data, tokenizer.pad_token_id, None, 1.0, method_loss_type)
        with torch.no_grad():
            return pair_loss.loss(tiny_model.eval(), "think", list(range(6)))[0].loss.item()

    ipo = loss("sigmoid", "ipo")
    assert ipo == pytest.approx(loss("ipo", None), rel=1e-6)
    assert ipo == pytest.approx(loss("ipo", "ipo"), rel=1e-6)
    assert loss("ipo", "sigmoid") == pytest.approx(loss("sigmoid", None), rel=1e-6)
    assert abs(ipo - loss("sigmoid", None)) > 1e-3
    # And it is IPO's value: (h − 1/(2β))², h the per-token log-ratio margin, by hand.
    with torch.no_grad():
        logps, n_tokens = score_pairs(tiny_model, chosen, rejected, tokenizer.pad_token_id, True)
    h = (logps[:6] - ref_chosen + 0.3) / n_tokens[:6] - (logps[6:] - ref_rejected - 0.2) / n_tokens[6:]
    assert ipo == pytest.approx(((h - 1 / 3.0) ** 2).mean().item(), rel=1e-4)


def test_no_thinking_pairs_have_their_own_length_limit(inputs):
    """model.max_length_nothink applies to the no-thinking pairs alone: the thinking pairs fit
    max_length, every no-thinking pair is past its own limit, and the error names that limit."""
    result = run_training(inputs, "nothinklimit", {"methods": {"bvpo": {"alpha": 0.5}}},
                          params={"model": {"max_length": 96, "max_length_nothink": 20}})
    assert result.returncode != 0
    message = [line for line in result.stderr.splitlines() if line.startswith("bvpo train: error:")]
    assert message and "nothink: 16 of 16 pairs do not fit model.max_length_nothink=20" in message[0], \
        result.stderr[-2000:]


def run_fp16(root: Path, tag: str, scaler: dict, train: dict) -> subprocess.CompletedProcess:
    """The trainer in one process with fp16 autocast and a GradScaler on the CPU (fp16_worker.py)."""
    params_file = write_micro_params(root / f"params-{tag}.yaml", {
        "tracking": {"register_method": "bvpo"},
        "train": {"steps": 4, "batch_size": 4, "micro_batch_size": 2, "warmup_steps": 2, "lr": 1e-3,
                  "alpha_every": 2, "alpha_draws": 2, "alpha_draw_size": 2, "checkpoint_every": 0,
                  "methods": {"bvpo": {"alpha": 0.5}}, **train},
        "model": {"max_length": 96}})
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(root), "OMP_NUM_THREADS": "1",
           "ACCELERATE_MIXED_PRECISION": "fp16", "BVPO_TEST_GRAD_SCALER": json.dumps(scaler)}
    cmd = [sys.executable, str(Path(__file__).with_name("fp16_worker.py")), "--params", str(params_file),
           "--pairs", str(root / "pairs"), "--base", str(root / "base"), "--work", str(root / f"work-{tag}"),
           "--cache", str(root / "cache"), "--project-dir", str(root)]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)


def test_fp16_skips_overflow_steps_as_a_grad_scaler_does(inputs):
    """A loss scale of 2^24 overflows fp16 at step 0: the step is skipped (no update, no
    schedule step) and the scale drops, then training goes on. It used to stop the run."""
    result = run_fp16(inputs, "fp16-overflow", {"init_scale": 2.0**24, "backoff_factor": 2.0**-12,
                                                "growth_interval": 10**6}, {})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = history(inputs, "fp16-overflow", "bvpo")
    assert [r.get("overflow_skipped", 0.0) for r in rows] == [1.0, 0.0, 0.0, 0.0]
    assert rows[0].get("grad/estimate_skipped") == 1.0  # the step-0 draws overflowed too: α keeps its value
    # The schedule waited: step 1 ran at step 0's (first warmup) rate, then it moved on.
    assert rows[0]["lr"] == rows[1]["lr"] < rows[2]["lr"]
    base = load_file(inputs / "base" / "model.safetensors")
    trained = final_weights(inputs, "fp16-overflow", "bvpo")
    assert max((trained[k] - base[k]).abs().max().item() for k in base) > 1e-4


def test_fp16_gradient_statistics_are_unscaled(inputs):
    """The same run with a loss scale of 2^12 and of 1: gradient telemetry and α* agree (fp16
    rounds the two differently); read from scaled gradients they differed by 2^24 in variance."""
    runs = {}
    for scale in (2.0**12, 1.0):
        tag = f"fp16-scale{int(scale)}"
        result = run_fp16(inputs, tag, {"init_scale": scale, "growth_interval": 10**6}, {"steps": 3})
        assert result.returncode == 0, result.stderr[-3000:]
        runs[scale] = history(inputs, tag, "bvpo")
    for a, b in zip(runs[2.0**12], runs[1.0]):
        assert a.get("overflow_skipped", 0.0) == b.get("overflow_skipped", 0.0) == 0.0
        if "grad/var_think" in a:
            for key in ("grad/var_think", "grad/var_nothink", "alpha_star", "grad/step_norm_think"):
                assert a[key] == pytest.approx(b[key], rel=0.05), key


def test_training_keeps_fp32_masters_and_stores_the_model_dtype(inputs):
    """model.dtype bf16 is the storage and inference dtype: training still runs on fp32
    master weights (it used to load and update them in pure bf16), and the saved model is their
    bf16 cast, equal to an fp32 run's weights cast to bf16."""
    methods = {"methods": {"bvpo": {"alpha": 0.5}}, "mixed_precision": "fp32", "telemetry": False}
    for tag, dtype in (("store-fp32", "fp32"), ("store-bf16", "bf16")):
        result = run_training(inputs, tag, methods, params={"model": {"max_length": 96, "dtype": dtype}})
        assert result.returncode == 0, result.stderr[-3000:]
    fp32, bf16 = final_weights(inputs, "store-fp32", "bvpo"), final_weights(inputs, "store-bf16", "bvpo")
    assert {t.dtype for t in bf16.values()} == {torch.bfloat16}
    for key in fp32:
        assert torch.equal(bf16[key], fp32[key].to(torch.bfloat16)), key
    config = json.loads((inputs / "work-store-bf16" / "bvpo" / "final" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
