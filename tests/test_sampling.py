"""Sampling that scales, on the CPU: the sample stage's shards spread over 2 processes
(`accelerate launch`, gloo) cover every prompt exactly k times per mode, a rerun reproduces the
samples, and a stage killed mid-way resumes from the shards it had written. The vLLM backend
runs where vLLM and a GPU are; elsewhere choosing it is a clear error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from micro_params import MICRO, make_project

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def project(tmp_path_factory, monkeypatch_module) -> Path:
    from bvpo.config import load_params
    from bvpo.stages import run_stage
    from bvpo.tracking import tracking_uri

    project = make_project(tmp_path_factory.mktemp("sampling"), {"sample": {**MICRO["sample"], "shard_prompts": 5}})
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", tracking_uri(project))
    params = load_params(project / "params.yaml")
    for stage in ("prepare", "warmup", "policy"):
        run_stage(stage, params, project)
    return project


def with_sample(project: Path, name: str, **sample) -> Path:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["sample"].update(sample)
    path = project / f"params-{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def sample(project: Path, params_file: Path) -> list[dict]:
    from datasets import load_from_disk

    from bvpo.config import load_params
    from bvpo.stages import run_stage

    shutil.rmtree(project / "data" / "samples", ignore_errors=True)
    run_stage("sample", load_params(params_file), project, params_file)
    return load_from_disk(str(project / "data" / "samples")).to_list()


def shard_dirs(project: Path) -> list[Path]:
    return sorted((project / "data" / "cache").glob("samples-*"))


def test_two_processes_sample_every_prompt_k_times_per_mode_reproducibly(project):
    from datasets import load_from_disk

    params_file = with_sample(project, "two", num_processes=2)
    stale = project / "data" / "cache" / "samples-0123456789abcdef"  # left by a killed run with other settings
    stale.mkdir(parents=True)
    (stale / "think-00000.jsonl").write_text("{}\n")
    rows = sample(project, params_file)
    prompts = load_from_disk(str(project / "data" / "prompts"))["train"]["prompt"]
    k = yaml.safe_load(params_file.read_text())["sample"]["k"]
    assert [r["mode"] for r in rows] == ["think"] * (len(prompts) * k) + ["nothink"] * (len(prompts) * k)
    for mode in ("think", "nothink"):
        mine = [r for r in rows if r["mode"] == mode]
        assert Counter(r["prompt_id"] for r in mine) == {i: k for i in range(len(prompts))}
        assert [r["prompt_id"] for r in mine] == sorted(r["prompt_id"] for r in mine)  # merged in prompt order
        assert all(r["prompt"] == prompts[r["prompt_id"]] for r in mine)
    assert len({r["completion"] for r in rows}) > len(prompts)  # sampled, not one text repeated
    assert not shard_dirs(project)  # shards are removed once merged, stale ones too

    again = sample(project, params_file)
    assert again == rows
    # A shard's seed is its own, so one process writes the same samples (on a GPU, kernels that
    # differ with batch layout could still move a float; here they do not).
    assert sample(project, with_sample(project, "one", num_processes=1)) == rows


def test_a_killed_sample_stage_resumes_from_the_shards_it_wrote(project):
    params_file = with_sample(project, "kill", shard_prompts=1)
    env = {**os.environ, "PYTHONPATH": str(project / "src")}
    child = subprocess.Popen([sys.executable, "-m", "bvpo.cli", "--project-dir", str(project), "stage", "sample",
                              "--params", str(params_file)], cwd=project, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(project / "data" / "samples", ignore_errors=True)
    deadline = time.time() + 300
    written: list[Path] = []
    while time.time() < deadline and child.poll() is None:
        written = [p for d in shard_dirs(project) for p in d.glob("*.jsonl")]
        if len(written) >= 3:
            os.killpg(child.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    child.wait()
    assert len(written) >= 3 and not (project / "data" / "samples").exists(), "the stage was not killed mid-way"
    (shard_dir,) = shard_dirs(project)
    kept = {p.name: p.read_text() for p in shard_dir.glob("*.jsonl")}
    from datasets import load_from_disk

    n_shards = 2 * len(load_from_disk(str(project / "data" / "prompts"))["train"])  # one prompt per shard

    resumed = subprocess.run([sys.executable, "-m", "bvpo.cli", "--project-dir", str(project), "stage", "sample",
                              "--params", str(params_file)], cwd=project, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"sample: resuming, {len(kept)} of {n_shards} shards already in" in resumed.stdout
    rows = load_from_disk(str(project / "data" / "samples")).to_list()
    # The kept shards' samples are in the result as they were written, and the result is what an
    # uninterrupted run gives.
    for name, text in kept.items():
        mode, index = name.removesuffix(".jsonl").split("-")
        assert [r for r in rows if r["mode"] == mode and r["prompt_id"] == int(index)] == \
            [json.loads(line) for line in text.splitlines()]
    assert sample(project, params_file) == rows


def test_vllm_backend_samples_like_the_hf_backend(project):
    pytest.importorskip("vllm", reason="the vLLM backend needs the bvpo[vllm] extra (and a GPU)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("the vLLM backend needs a GPU")
    from bvpo.modeling import load_tokenizer

    rows = sample(project, with_sample(project, "vllm", backend="vllm", vllm_gpu_memory_utilization=0.3))
    hf = sample(project, project / "params.yaml")
    assert [(r["prompt_id"], r["mode"], r["prompt"]) for r in rows] == [(r["prompt_id"], r["mode"], r["prompt"])
                                                                         for r in hf]
    eos = load_tokenizer(project / "data" / "policy").eos_token
    for r in rows:  # the same conventions: an EOS-terminated text unless truncated
        assert r["completion"].endswith(eos) != r["truncated"]
        assert r["valid"] == (not r["truncated"] and not r["malformed"])
    assert sum(r["valid"] for r in rows) > 0


def test_choosing_vllm_where_it_is_not_installed_is_a_clear_error(project):
    try:
        import vllm  # noqa: F401  (only whether it imports)

        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    from bvpo.stages import StageError

    with pytest.raises(StageError, match=r"vLLM is not installed here: install the extra \(pip install 'bvpo\[vllm\]'\)"):
        sample(project, with_sample(project, "novllm", backend="vllm"))
    assert not (project / "data" / "samples").exists()


def test_vllm_with_several_processes_is_refused(tmp_path):
    from bvpo.config import ConfigError, load_params
    from micro_params import write_micro_params

    path = write_micro_params(tmp_path / "params.yaml", {"sample": {**MICRO["sample"], "backend": "vllm",
                                                                    "num_processes": 2}})
    with pytest.raises(ConfigError, match="sample.num_processes: expected 1 with sample.backend vllm"):
        load_params(path)


@pytest.fixture
def vllm_standin(monkeypatch):
    """vLLM's API on the CPU (tests/fixtures/vllm_standin): the VLLMSampler code runs unchanged."""
    monkeypatch.syspath_prepend(str(Path(__file__).with_name("fixtures") / "vllm_standin"))
    sys.modules.pop("vllm", None)
    import vllm

    yield vllm
    sys.modules.pop("vllm", None)


def test_vllm_sampler_context_stops_and_seeds(project, tmp_path, vllm_standin):
    """What the vLLM backend asks of vLLM: a context of the longest prompt + max_new_tokens (it
    was model.max_length, which refused longer prompts), the same stop tokens as the HF backend
    (the generation config's EOS ids too: Qwen3 stops at <|im_end|> and <|endoftext|>), one seed
    per prompt (every prompt of a shard shared one), and the inference dtype."""
    from transformers import GenerationConfig

    from bvpo.chat import render_prompt
    from bvpo.config import load_params
    from bvpo.modeling import load_tokenizer
    from bvpo.sampling import VLLMSampler, prompt_seed

    model = tmp_path / "two-stops"
    shutil.copytree(project / "data" / "policy", model)
    tokenizer = load_tokenizer(model)
    stops = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    GenerationConfig(eos_token_id=stops, pad_token_id=tokenizer.pad_token_id).save_pretrained(model)
    params = load_params(with_sample(project, "standin", backend="vllm"))
    prompts = ["Compute 12+30.", "Compute 45-7+3.", "Compute 90-1."]
    sampler = VLLMSampler(model, params, prompts)
    [engine] = vllm_standin.ENGINES[-1:]
    longest = max(len(tokenizer(render_prompt(tokenizer, p, t), add_special_tokens=False).input_ids)
                  for p in prompts for t in (True, False))
    assert engine.engine_args["max_model_len"] == longest + params.sample.max_new_tokens
    assert engine.engine_args["dtype"] == "float32"  # auto, on a machine without a CUDA GPU
    assert engine.engine_args["generation_config"] == "vllm"
    first = sampler(prompts, thinking=True, seed=1234)
    requests = engine.requests[-len(prompts):]
    assert [r[1].stop_token_ids for r in requests] == [stops] * len(prompts)
    assert [r[1].seed for r in requests] == [prompt_seed(1234, i) for i in range(len(prompts))]
    assert len({r[1].seed for r in requests}) == len(prompts)
    assert len(first) == len(prompts) * params.sample.k
    # Per-prompt seeds: a prompt's samples do not depend on the prompts beside it.
    again = sampler([prompts[0], "Compute 11+11."], thinking=True, seed=1234)
    assert [g.text for g in again[:params.sample.k]] == [g.text for g in first[:params.sample.k]]
    for g in first:
        assert g.truncated == (g.stop == "") and g.stop in ("", "<|im_end|>", "<|endoftext|>")


def test_a_completion_ends_at_whichever_stop_token_the_model_wrote(tokenizer):
    """Qwen3 stops at <|im_end|> or <|endoftext|>: the completion that is scored keeps the one the
    model wrote (the tokenizer's EOS was appended whatever it was)."""
    from bvpo.chat import stop_token_ids
    from bvpo.sequences import finish
    from transformers import GenerationConfig

    im_end, endoftext = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
    stops = stop_token_ids(tokenizer, GenerationConfig(eos_token_id=[im_end, endoftext]))
    assert stops == [im_end, endoftext]
    assert stop_token_ids(tokenizer, None) == [im_end]
    ids = tokenizer("42", add_special_tokens=False).input_ids
    ended = finish(ids + [endoftext, im_end], stops, tokenizer)
    assert (ended.text, ended.stop, ended.truncated, ended.n_tokens) == ("42", "<|endoftext|>", False, len(ids) + 1)
    cut = finish(ids, stops, tokenizer)
    assert (cut.text, cut.stop, cut.truncated, cut.n_tokens) == ("42", "", True, len(ids))
