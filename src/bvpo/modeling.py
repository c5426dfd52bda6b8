"""The embedded tiny model, loading and saving any Hugging Face causal LM and its tokenizer,
precision and device choices. Prompts and completions are `bvpo.chat`'s."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

from .chat import ModelError, check_thinking_template

POINTER_FILE = "bvpo_model_ref.json"


def tiny_config(tokenizer, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
                max_length: int):
    """The embedded model's Qwen3 config: GQA with half as many key/value heads."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads // 2,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_length,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_model(tokenizer, hidden_size: int, num_layers: int, num_heads: int,
                     intermediate_size: int, max_length: int, seed: int):
    """A Qwen3-architecture causal LM from config, randomly initialised with `seed`."""
    from transformers import Qwen3ForCausalLM

    config = tiny_config(tokenizer, hidden_size, num_layers, num_heads, intermediate_size, max_length)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def resolve_model_dir(model_dir: str | Path) -> str:
    """The directory or hub id to load: the warmup stage writes either a model or a pointer."""
    if not is_local(str(model_dir)):
        return str(model_dir)  # a hub id: the Hugging Face cache or the hub resolves it
    model_dir = Path(model_dir)
    pointer = model_dir / POINTER_FILE
    if pointer.is_file():
        return json.loads(pointer.read_text())["path"]
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir}: no model here (expected config.json, or run the warmup stage)")
    return str(model_dir)


def is_local(path: str) -> bool:
    """A local directory, as opposed to a hub id such as `Qwen/Qwen3-0.6B`."""
    return path.startswith((".", "/", "~")) or Path(path).exists()


def hub_kwargs(path: str) -> dict:
    """`from_pretrained` arguments: a local directory never touches the network; a hub id is
    fetched (or read from the user's HF cache) as the user's environment allows."""
    return {"local_files_only": True} if is_local(path) else {}


def _load_error(path: str, what: str, err: Exception) -> ModelError:
    hint = ""
    if not is_local(path):
        import os

        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = (" HF_HUB_OFFLINE is set, so only the local Hugging Face cache is read: unset it (or "
                "HF_HUB_OFFLINE=0) to download the model once, or set model.path to a local directory"
                if offline else " (a hub id: check the name, your network and HF_TOKEN for gated models)")
    return ModelError(f"{path}: cannot load {what} ({type(err).__name__}: {err}).{hint}")


def load_tokenizer(model_dir: str | Path):
    path = resolve_model_dir(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs(path))
    except (OSError, ValueError) as err:
        raise _load_error(path, "a tokenizer", err) from None
    check_thinking_template(tokenizer, path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# The project's precision names (params.yaml, metrics) and the torch dtypes they stand for.
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_model(model_dir: str | Path, precision: str = "fp32", device: str | torch.device = "cpu"):
    path = resolve_model_dir(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[precision], **hub_kwargs(path))
    except (OSError, ValueError) as err:
        raise _load_error(path, "a causal LM", err) from None
    return model.to(device)


def save_model(model, tokenizer, out_dir: str | Path) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def write_model_pointer(path: str, out_dir: str | Path) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / POINTER_FILE).write_text(json.dumps({"path": path}, indent=2) + "\n")


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls natively: a CUDA GPU with bf16, or a CPU with
    AVX512-BF16 or AMX (elsewhere bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_dtype(setting: str, device: str | torch.device) -> str:
    """The weights precision (fp32, bf16, fp16) for inference (sampling, evaluation, analysis) and
    for the saved model: `auto` is bf16 on a CUDA GPU with bf16 and fp32 elsewhere (on a CPU bf16
    inference would change the embedded model's samples). Training always keeps fp32 masters."""
    if setting != "auto":
        return setting
    device = torch.device(device)
    return "bf16" if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def resolve_precision(setting: str, device: torch.device) -> str:
    """fp32 or bf16 for a `mixed_precision` setting of fp32, bf16 or auto (bf16 where native)."""
    if setting == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return setting


# Registered with transformers' attention functions; selected by `sdpa_in_fp32`.
SDPA_FP32 = "bvpo_sdpa_fp32"


def _sdpa_fp32_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(query.dtype), weights


AttentionInterface.register(SDPA_FP32, _sdpa_fp32_attention)


def check_training_support(model, gradient_checkpointing: bool, compile_layers: bool, device_type: str) -> None:
    """Whether this model class (a meta-device instance will do) and machine can run
    `train.gradient_checkpointing` / `train.compile`: the train stage asks at setup, `bvpo check`
    before any sampling."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelError(f"train.gradient_checkpointing: {type(model).__name__} does not support gradient "
                         "checkpointing in transformers; set it to false (and lower train.micro_batch_size or "
                         "train.max_tokens_per_micro_batch if memory is short)")
    if compile_layers and not any(isinstance(m, GradientCheckpointingLayer) for m in model.modules()):
        raise ModelError(f"train.compile: {type(model).__name__} has no decoder layers transformers marks as "
                         "such (GradientCheckpointingLayer), so there is nothing to compile per layer; set it to "
                         "false")
    if compile_layers and device_type == "cpu":
        check_cpu_compiler()


def compile_decoder_layers(model, device_type: str) -> int:
    """`torch.compile` each decoder layer in place (regional compilation: the layers share one
    graph, so the compile is paid once, not per layer; the parameter names do not change, so
    checkpoints and the saved model are as without it). Dynamic shapes: micro-batch lengths
    change every step. `device_type`: where the layers will run. Returns how many layers."""
    import torch._dynamo
    from transformers.modeling_layers import GradientCheckpointingLayer

    check_training_support(model, False, True, device_type)
    # Every in-place compiled module shares one code object (Module._call_impl) and so one
    # cache of graphs: the policy's (grad, train mode), the reference's (no grad), their size
    # specialisations and attention switches. Past dynamo's default of 8 it would run the layers
    # eagerly with only a warning, losing the speed and, under bf16, the reference's match.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def check_cpu_compiler() -> None:
    """inductor's CPU kernels are C++ built against Python's headers: say so before the first
    step rather than in a compiler traceback."""
    import sysconfig

    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        compiler = get_cpp_compiler()
    except Exception as err:  # torch's own search; its error names what it looked for
        raise ModelError(f"train.compile on a CPU needs a C++ compiler for torch's inductor ({err}): install g++ "
                         "(apt-get install g++), point CXX at one, or set train.compile: false") from None
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.is_file():
        raise ModelError(f"train.compile on a CPU builds C++ kernels against Python's headers, but {headers} is "
                         f"missing: install them (apt-get install python3-dev) or set train.compile: false "
                         f"(compiler found: {compiler})")


@contextlib.contextmanager
def sdpa_in_fp32(model, enabled: bool = True):
    """Run an SDPA model's attention in fp32 inside a bf16 autocast region. On a CPU, bf16
    speeds the linear layers up, but the flash kernel's bf16 backward is slower than its fp32
    one, so this mix beats both all-fp32 and all-bf16 (docs/method.md has the timings).
    Anything but SDPA is left as it is."""
    switch = enabled and getattr(model.config, "_attn_implementation", None) == "sdpa"
    if switch:
        model.set_attn_implementation(SDPA_FP32)
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation("sdpa")
