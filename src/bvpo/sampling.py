"""k completions per prompt in each mode, cut into shards that resume and spread over processes.

The work is a list of shards: `sample.shard_prompts` prompts in one mode. Each shard is sampled
with a seed of its own (from the sample seed, the mode and the shard's index), so what a shard
holds does not depend on which process sampled it or on what ran before it; each finished
shard is written at once (atomically) to a folder under data/cache whose name is a digest of
everything that decides the samples, so a killed stage restarts from the shards it has. With
the `hf` backend, processes take shards round robin (`python -m bvpo.sampling` under
`accelerate launch`, one GPU each); the stage then merges the shards in prompt order.

Two backends, one contract (`Sampler`): Hugging Face `generate` (default) and vLLM's offline
engine (optional extra, imported only when chosen). Both render the prompt with the model's chat
template and `enable_thinking`, stop at the tokenizer's EOS, keep special tokens in the text
(it is re-tokenised and scored as written), and flag a completion that hit `max_new_tokens`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from .config import Params
from .errors import BvpoError
from .modes import MODES
from .sequences import Generated, parse_completion

PROMPTS_FILE = "prompts.json"


class SamplingError(BvpoError, RuntimeError):
    """Sampling cannot run as configured, or its shards do not add up. The message says why."""


@dataclass(frozen=True)
class Shard:
    mode: str
    index: int
    start: int  # first prompt index
    stop: int  # one past the last

    @property
    def file_name(self) -> str:
        return f"{self.mode}-{self.index:05d}.jsonl"

    @property
    def thinking(self) -> bool:
        return self.mode == "think"


def plan(n_prompts: int, shard_prompts: int) -> list[Shard]:
    """Every mode's shards, thinking first: the order the merged samples keep."""
    return [Shard(mode, i, start, min(start + shard_prompts, n_prompts))
            for mode in MODES for i, start in enumerate(range(0, n_prompts, shard_prompts))]


def shard_seed(seed: int, mode: str, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{mode}/{index}".encode()).digest()[:4], "little")


def work_key(params: Params, policy_digest: str, prompts: list[str], answers: list[str]) -> str:
    """Names the shard folder: the policy, the prompts and every setting that decides a sample.
    The process count is left out: a shard is the same whichever process sampled it."""
    settings = {k: v for k, v in params.to_dict()["sample"].items() if k != "num_processes"}
    blob = json.dumps([policy_digest, prompts, answers, settings, params.sample_seed, params.model.dtype],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Sampler(Protocol):
    tokenizer: object

    def __call__(self, prompts: list[str], thinking: bool, seed: int) -> list[Generated]:
        """k completions per prompt, prompt-major (prompt 0's k, then prompt 1's, ...)."""


class HFSampler:
    """Hugging Face `generate`, batched with the KV cache (`sequences.generate`)."""

    def __init__(self, model_dir: Path, params: Params, device, prompts: list):
        from .modeling import load_model, load_tokenizer, resolve_dtype
        from .preflight import Sizes, free_memory, prompt_tokens, sampling_batch

        s = params.sample
        dtype = resolve_dtype(params.model.dtype, device)
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_model(model_dir, dtype, device)
        self.sample = s
        longest = max(max(prompt_tokens(self.tokenizer, prompts, thinking)) for thinking in (True, False))
        # The weights are loaded: what is free now is what the KV cache can have.
        # One static cache length for every shard this process samples: one compiled shape.
        self.max_cache_len = longest + s.max_new_tokens
        self.batch_size = sampling_batch(s.batch_size, Sizes.of(self.model.config), self.max_cache_len, dtype,
                                         free_memory(device))

    def __call__(self, prompts: list, thinking: bool, seed: int) -> list[Generated]:
        import torch

        from .sequences import generate

        s = self.sample
        torch.manual_seed(seed)
        repeated = [p for p in prompts for _ in range(s.k)]
        return generate(self.model, self.tokenizer, repeated, thinking, s.max_new_tokens, self.batch_size,
                        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, kv_cache=s.kv_cache,
                        max_cache_len=self.max_cache_len)


def prompt_seed(shard_seed_value: int, position: int) -> int:
    """The vLLM request seed of the shard's `position`-th prompt: each prompt its own stream."""
    return int.from_bytes(hashlib.sha256(f"{shard_seed_value}/{position}".encode()).digest()[:4], "little")


def vllm_context_length(tokenizer, prompts: list, max_new_tokens: int) -> int:
    """vLLM's max_model_len: the longest rendered prompt (either mode) plus the generation budget,
    so no prompt is refused and no KV cache is reserved for lengths that never occur."""
    from .chat import render_prompt

    longest = max(len(tokenizer(render_prompt(tokenizer, p, thinking), add_special_tokens=False).input_ids)
                  for p in prompts for thinking in (True, False))
    return longest + max_new_tokens


class VLLMSampler:
    """vLLM's offline engine. Prompts go in as token ids rendered by the project's tokenizer (so
    no second BOS is added) and completions come back as token ids cut by `sequences.finish`, so
    the text, the stop tokens and the truncation flag are exactly what the HF backend gives for
    the same tokens. Every prompt has its own seed (`prompt_seed`)."""

    def __init__(self, model_dir: Path, params: Params, prompts: list):
        try:
            import vllm
        except ImportError:
            raise SamplingError("sample.backend is vllm, but vLLM is not installed here: install the extra "
                                "(pip install 'bvpo[vllm]') on a machine with a GPU, or set sample.backend: hf") from None
        from transformers import GenerationConfig

        from .chat import stop_token_ids
        from .modeling import hub_kwargs, load_tokenizer, resolve_dtype, resolve_model_dir

        s = params.sample
        path = resolve_model_dir(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        try:
            generation_config = GenerationConfig.from_pretrained(path, **hub_kwargs(path))
        except OSError:  # no generation_config.json: the tokenizer's EOS alone
            generation_config = None
        self.stop_ids = stop_token_ids(self.tokenizer, generation_config)
        self.sample = s
        # generation_config="vllm": vLLM's neutral defaults, not the model's (which would override
        # top_k/temperature the user set); the stop ids are passed explicitly instead.
        dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[resolve_dtype(params.model.dtype, "cuda")]
        self.llm = vllm.LLM(model=path, dtype=dtype, seed=params.sample_seed,
                            tensor_parallel_size=s.vllm_tensor_parallel_size,
                            gpu_memory_utilization=s.vllm_gpu_memory_utilization,
                            max_model_len=vllm_context_length(self.tokenizer, prompts, s.max_new_tokens),
                            enable_prefix_caching=True, generation_config="vllm")

    def __call__(self, prompts: list, thinking: bool, seed: int) -> list[Generated]:
        from vllm import SamplingParams

        from .chat import render_prompt
        from .sequences import finish

        s, tokenizer = self.sample, self.tokenizer
        settings = [SamplingParams(n=s.k, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or -1,
                                   max_tokens=s.max_new_tokens, seed=prompt_seed(seed, i),
                                   stop_token_ids=self.stop_ids, skip_special_tokens=False)
                    for i in range(len(prompts))]
        requests = [{"prompt_token_ids": tokenizer(render_prompt(tokenizer, p, thinking),
                                                   add_special_tokens=False).input_ids} for p in prompts]
        generated = []
        for request in self.llm.generate(requests, settings, use_tqdm=False):
            for completion in request.outputs:
                generated.append(finish(list(completion.token_ids), self.stop_ids, tokenizer))
        return generated


def make_sampler(params: Params, model_dir: Path, device, prompts: list) -> Sampler:
    if params.sample.backend == "vllm":
        return VLLMSampler(model_dir, params, prompts)
    return HFSampler(model_dir, params, device, prompts)


def shard_rows(shard: Shard, generated: list[Generated], prompts: list, answers: list[str], k: int) -> list[dict]:
    rows = []
    for j, g in enumerate(generated):
        prompt_id = shard.start + j // k
        parsed = parse_completion(g.text, shard.thinking)
        rows.append({
            "prompt_id": prompt_id,
            "prompt": prompts[prompt_id],
            "answer": answers[prompt_id],
            "mode": shard.mode,
            "completion": g.text + g.stop,
            "trace": parsed.trace or "",
            "response": parsed.answer,
            "n_tokens": g.n_tokens,
            "truncated": g.truncated,
            "malformed": parsed.malformed,
            "valid": not (g.truncated or parsed.malformed),
        })
    return rows


def run_shards(new_sampler: Callable[[], Sampler], params: Params, prompts: list[str], answers: list[str],
               shard_dir: Path, rank: int = 0, world: int = 1, progress: bool = True) -> int:
    """Sample this process's shards (every `world`-th, from `rank`) that are not written yet;
    returns how many it sampled. The model is loaded only if there is work left."""
    from tqdm.auto import tqdm

    shard_dir.mkdir(parents=True, exist_ok=True)
    mine = plan(len(prompts), params.sample.shard_prompts)[rank::world]
    todo = [shard for shard in mine if not (shard_dir / shard.file_name).is_file()]
    if not todo:
        return 0
    sampler = new_sampler()
    k = params.sample.k
    for shard in tqdm(todo, desc=f"sample (process {rank} of {world})" if world > 1 else "sample",
                      unit="shard", disable=not progress):
        generated = sampler(prompts[shard.start:shard.stop], shard.thinking,
                            shard_seed(params.sample_seed, shard.mode, shard.index))
        rows = shard_rows(shard, generated, prompts, answers, k)
        tmp = shard_dir / f"{shard.file_name}.tmp-{rank}"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, shard_dir / shard.file_name)
    return len(todo)


def merge_shards(shard_dir: Path, n_prompts: int, params: Params) -> list[dict]:
    """Every shard's rows in plan order, checked: each prompt sampled exactly k times per mode."""
    k = params.sample.k
    rows = []
    for shard in plan(n_prompts, params.sample.shard_prompts):
        path = shard_dir / shard.file_name
        if not path.is_file():
            raise SamplingError(f"{path}: shard missing after sampling (a process failed?); rerun the stage "
                                "to sample what is missing")
        part = [json.loads(line) for line in path.read_text().splitlines()]
        expected = [i for i in range(shard.start, shard.stop) for _ in range(k)]
        if [r["prompt_id"] for r in part] != expected or {r["mode"] for r in part} != {shard.mode}:
            raise SamplingError(f"{path}: holds other samples than prompts {shard.start}..{shard.stop - 1} × "
                                f"k={k} in mode {shard.mode}; delete {shard_dir} and rerun the stage")
        rows += part
    return rows


def main(argv: list[str] | None = None) -> int:
    """One process of a sharded `hf` sampling run (started by the sample stage)."""
    parser = argparse.ArgumentParser(prog="python -m bvpo.sampling", description=main.__doc__)
    parser.add_argument("--params", required=True)
    parser.add_argument("--policy", required=True, help="model directory to sample from")
    parser.add_argument("--shard-dir", required=True, help=f"where shards go; holds {PROMPTS_FILE}")
    args = parser.parse_args(argv)

    from accelerate import Accelerator

    from .config import load_params
    from .runtime import configure_environment

    configure_environment()
    params = load_params(args.params)
    accelerator = Accelerator()
    shard_dir = Path(args.shard_dir)
    work = json.loads((shard_dir / PROMPTS_FILE).read_text())
    run_shards(lambda: make_sampler(params, Path(args.policy), accelerator.device, work["prompts"]), params,
               work["prompts"],
               work["answers"], shard_dir, accelerator.process_index, accelerator.num_processes,
               progress=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BvpoError as err:
        print(f"bvpo sample: error: {err}", file=sys.stderr)
        sys.exit(2)
