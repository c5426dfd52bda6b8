"""The frozen reference: its log-probs of every pair, computed once and cached.

The reference scores each pair exactly as the policy's forward pass does at step 0 (fp32
weights under the same autocast, or FSDP's parameter cast; the same prompt sharing), so the
log-ratio starts at 0. `precomputed_reference` scores once per (pairs, reference model, code,
precision) and caches the result under data/cache/, sharded over processes; the trainer then
holds no reference model in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import torch

from .modeling import SDPA_FP32, compile_decoder_layers, load_model, resolve_model_dir
from .runtime import files_digest
from .packing import pair_rows, score_pairs_packed
from .sequences import Encoded, score_pairs

# The code that turns pairs into scored log-probs: a change to it invalidates cached references.
SCORING_MODULES = ("sequences.py", "packing.py", "chat.py", "modeling.py", "losses.py", "reference.py")


def model_digest(model_dir: str | Path) -> str:
    resolved = resolve_model_dir(model_dir)
    return files_digest(Path(resolved)) if Path(resolved).is_dir() else hashlib.sha256(resolved.encode()).hexdigest()[:16]


def code_digest(modules: tuple[str, ...], package_dir: Path = Path(__file__).parent) -> str:
    """Hash of these modules of the package and of the library versions under them."""
    import accelerate
    import transformers

    h = hashlib.sha256(f"{torch.__version__}-{transformers.__version__}-{accelerate.__version__}".encode())
    for name in modules:
        h.update((package_dir / name).read_bytes())
    return h.hexdigest()[:16]


def scoring_code_digest(package_dir: Path = Path(__file__).parent) -> str:
    """Hash of the modules that encode and score sequences, and of the library versions under
    them: cached reference log-probs are only valid for the code that computed them."""
    return code_digest(SCORING_MODULES, package_dir)


def attention_implementation() -> str:
    """Which SDPA kernels torch may pick here: a reference scored with another kernel differs in
    its last bits, so the cache key names them."""
    backends = torch.backends.cuda
    return "sdpa-" + "".join(str(int(f())) for f in (backends.flash_sdp_enabled, backends.mem_efficient_sdp_enabled,
                                                        backends.math_sdp_enabled))


@torch.no_grad()
def reference_logps(model, chosen: list[Encoded], rejected: list[Encoded], pad_id: int, batch_size: int = 32,
                    autocast=contextlib.nullcontext, shared_prompt: bool = True,
                    max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of every pair under the frozen reference, scored the way the
    policy's are (same pairing, same packing, same autocast), so that the log-ratio is 0 at step 0."""
    model.eval()
    out = torch.empty(2, len(chosen))
    if max_tokens:
        batches = pair_rows(chosen, rejected, list(range(len(chosen))), max_tokens)
    else:
        order = sorted(range(len(chosen)), key=lambda i: len(chosen[i].input_ids) + len(rejected[i].input_ids))
        batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    for idx in batches:
        c, r = [chosen[i] for i in idx], [rejected[i] for i in idx]
        with autocast():
            logps, _ = score_pairs_packed(model, c, r, pad_id) if max_tokens else \
                score_pairs(model, c, r, pad_id, shared_prompt)
        out[:, idx] = logps.float().cpu().view(2, len(idx))
    return out[0], out[1]


def reference_param_dtype(accelerator) -> torch.dtype | None:
    """The dtype FSDP computes the policy's parameters in, or None where they are used as they are.
    FSDP's mixed precision casts every parameter to bf16/fp16 for the forward pass (its
    MixedPrecisionPolicy.param_dtype; buffers such as the rotary frequencies stay fp32), so the
    embeddings and the whole residual stream are low-precision; under DDP autocast casts only
    matmul inputs. A reference scored the DDP way is off the FSDP policy at step 0 by tenths of
    a nat on long pairs (docs/scaling.md); with its parameters cast the same way the two agree.
    A policy given in the accelerate config wins over `mixed_precision` (accelerate keeps a
    user's policy and fills one in only where there is none), so it is read first."""
    if accelerator.distributed_type.name != "FSDP":
        return None
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    policy = getattr(plugin, "mixed_precision_policy", None)
    if policy is not None:
        return policy.param_dtype
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))


def cpu_bf16(accelerator) -> bool:
    """bf16 autocast on a CPU: the policy and the reference then both run SDPA's attention in
    fp32 (`modeling.sdpa_in_fp32`), so their numerics still match, and a step is faster than in
    fp32 (docs/method.md)."""
    return accelerator.device.type == "cpu" and str(accelerator.mixed_precision) == "bf16"


def load_reference_model(base_dir: str, accelerator, attention: str = "sdpa", compile_layers: bool = False):
    """The frozen reference, with the same parameter numerics as the policy's forward pass: fp32
    weights (the policy's master weights) under the same autocast, or FSDP's parameter cast, and
    compiled layers when the policy's are (`train.compile`: under bf16 the compiled kernels round
    otherwise, and the step-0 log-ratio would not start at 0)."""
    model = load_model(base_dir, "fp32", accelerator.device).eval().requires_grad_(False)
    compute = reference_param_dtype(accelerator)
    if compute is not None:
        for parameter in model.parameters():
            parameter.data = parameter.data.to(compute)
    if attention != "sdpa":
        model.set_attn_implementation(attention)
    if cpu_bf16(accelerator) and model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(SDPA_FP32)  # scoring only, never saved
    if compile_layers:
        compile_decoder_layers(model, accelerator.device.type)
    return model


def precomputed_reference(cache_file: Path, load_reference, data: dict[str, tuple], pad_id: int, accelerator,
                          shared_prompt: bool = True, max_tokens: int | None = None):
    """Reference log-probs for every pair, computed once and cached on disk. Every process
    scores its share of the pairs (every N-th of each mode) and the main process writes the
    merged cache, so N GPUs precompute N times faster than one."""
    from accelerate.utils import broadcast_object_list, gather_object

    # One decision for all processes: the main process's view of the cache.
    missing = broadcast_object_list([accelerator.is_main_process and not cache_file.is_file()])[0]
    if missing:
        reference = load_reference()
        rank, world = accelerator.process_index, accelerator.num_processes
        computed = {}
        for mode, (chosen, rejected) in data.items():
            mine = list(range(rank, len(chosen), world))
            c, r = reference_logps(reference, [chosen[i] for i in mine], [rejected[i] for i in mine], pad_id,
                                   autocast=accelerator.autocast, shared_prompt=shared_prompt,
                                   max_tokens=max_tokens)
            merged = torch.empty(2, len(chosen))
            for indices, chosen_logps, rejected_logps in gather_object([(mine, c, r)]):
                merged[0, indices], merged[1, indices] = chosen_logps, rejected_logps
            computed[mode] = (merged[0], merged[1])
            print(f"reference log-probs ({mode}): process {rank} of {world} scored {len(mine)} of "
                  f"{len(chosen)} pairs", flush=True)
        del reference
        if accelerator.is_main_process:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            torch.save(computed, tmp)
            os.replace(tmp, cache_file)
    accelerator.wait_for_everyone()
    return torch.load(cache_file)


def cache_file(cache_dir: Path, pairs_digest: str, base_digest: str, params, accelerator) -> Path:
    """Where the reference log-probs of these pairs under this model are cached: the name hashes
    everything that changes them (pairs, model, scoring code and library versions, length limits,
    autocast, FSDP's parameter cast, prompt sharing, packing, attention kernel, compiled layers)."""
    key = "-".join([pairs_digest, base_digest, scoring_code_digest(), str(params.model.max_length),
                    str(params.model.max_length_nothink), str(accelerator.mixed_precision),
                    str(reference_param_dtype(accelerator)), str(params.train.shared_prompt), str(params.train.max_tokens_per_micro_batch), params.train.attention,
                    str(params.train.compile),
                    accelerator.device.type, attention_implementation()])
    return cache_dir / f"reference-{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"
