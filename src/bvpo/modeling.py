"""Tokenizer, chat template, the embedded tiny model, and loading any HF causal LM.

The one rule everything else relies on: a *scored completion* is the text the model wrote
after the chat template's generation prompt. With thinking on that is `<think>trace</think>
answer<|im_end|>`; with thinking off the template already closed an empty think block, so
that block is part of the prompt and the completion is the answer alone. Prompts are always
rendered by the tokenizer's own template; completions are appended as raw text, so a
template that strips `<think>` from assistant turns cannot silently drop the trace.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from .errors import BvpoError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
EMPTY_THINK = "<think>\n\n</think>\n\n"
POINTER_FILE = "bvpo_model_ref.json"

# Qwen3's template, reduced to what the embedded model needs; it honours `enable_thinking`
# exactly as Qwen3's does (off => the generation prompt ends with an empty think block).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


class ModelError(BvpoError, ValueError):
    """A model or tokenizer cannot be used (missing, or no thinking chat template)."""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer with Qwen3's chat and think special tokens."""
    from tokenizers import Tokenizer, decoders, models

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    # Think tags are ordinary added tokens (as in Qwen3): decoding keeps them.
    tokenizer.add_tokens([THINK_OPEN, THINK_CLOSE])
    return tokenizer


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


def as_messages(prompt: str | list[dict]) -> list[dict]:
    """A prompt as chat messages: a text is one user turn; a conversation is used as it is."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


# The end of a generation prompt whose think block is already open: always-open templates
# (DeepSeek-R1-Distill, Qwen3-*-Thinking-2507) end with it whatever `enable_thinking` says.
_OPEN_BLOCK = re.compile(re.escape(THINK_OPEN) + r"\s*$")
_EMPTY_BLOCK = re.compile(re.escape(THINK_OPEN) + r"\s*" + re.escape(THINK_CLOSE) + r"\s*$")


def render_prompt(tokenizer, prompt: str | list[dict], thinking: bool) -> str:
    """The chat-templated prompt, ending where the model starts writing in that mode.

    Thinking off always ends with a closed, empty think block: a template with an
    `enable_thinking` switch (Qwen3) writes it itself; a template that always opens the block
    (DeepSeek-R1-Distill: `...<｜Assistant｜><think>\\n`) gets the block closed here, which is
    how those models are run without a trace (NoThinking)."""
    text = tokenizer.apply_chat_template(as_messages(prompt), tokenize=False, add_generation_prompt=True,
                                         enable_thinking=thinking)
    if not thinking and not _EMPTY_BLOCK.search(text) and _OPEN_BLOCK.search(text):
        text = _OPEN_BLOCK.sub("", text) + EMPTY_THINK
    return text


def check_thinking_template(tokenizer, where: str) -> None:
    """Refuse a tokenizer whose chat template cannot run both modes: thinking off must end the
    prompt with an empty think block (an `enable_thinking` switch as in Qwen3, or a block the
    template always opens, as in DeepSeek-R1-Distill, which is then closed), thinking on must not
    close the block, and the tokenizer must write the think tags back as the same text."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"{where}: the tokenizer has no chat template (expected a reasoning model's template: "
                         "one that honours enable_thinking, like Qwen3's, or opens a think block in its "
                         "generation prompt, like DeepSeek-R1-Distill's)")
    marker = "Compute 1+2."  # the generation prompt is what follows the user's message
    try:
        on = render_prompt(tokenizer, marker, thinking=True).split(marker, 1)[-1]
        off = render_prompt(tokenizer, marker, thinking=False).split(marker, 1)[-1]
    except Exception as err:  # jinja raises many kinds; all mean the template cannot render a user turn
        raise ModelError(f"{where}: the chat template cannot render a user message ({type(err).__name__}: "
                         f"{err})") from None
    if THINK_CLOSE in on:
        raise ModelError(f"{where}: with enable_thinking=True the chat template already closes the think "
                         f"block ('{THINK_CLOSE}' in the generation prompt), so no trace could be sampled")
    if not _EMPTY_BLOCK.search(off) or on == off:
        raise ModelError(
            f"{where}: the chat template neither honours enable_thinking nor opens a think block in its "
            f"generation prompt, so a trace cannot be turned on and off (expected thinking off to end with an "
            f"empty '{THINK_OPEN}...{THINK_CLOSE}' block, as Qwen3's does, or the generation prompt to end "
            f"with '{THINK_OPEN}', as DeepSeek-R1-Distill's does). Is this a reasoning model? Give the "
            "tokenizer such a template (`chat_template` in tokenizer_config.json or a chat_template.jinja)")
    probe = f"{THINK_OPEN}\n1+1=2\n{THINK_CLOSE}\n\n2"
    if tokenizer.decode(tokenizer(probe, add_special_tokens=False).input_ids) != probe:
        raise ModelError(f"{where}: the tokenizer does not decode '{THINK_OPEN}'/'{THINK_CLOSE}' back to "
                         "the same text, so sampled traces could not be told from answers")


def opens_think_block(tokenizer) -> bool:
    """True when the thinking-on generation prompt already opens the think block (DeepSeek-R1
    style, '...<think>\\n'): the model's completion then starts inside the trace."""
    return bool(_OPEN_BLOCK.search(render_prompt(tokenizer, "x", thinking=True)))


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Token ids that end a completion: the tokenizer's EOS and every EOS id of the model's
    generation config (Qwen3 stops at both <|im_end|> and <|endoftext|>). Both sampling backends
    and evaluation stop on the same set."""
    ids = [tokenizer.eos_token_id]
    config_ids = getattr(generation_config, "eos_token_id", None)
    for token in (config_ids if isinstance(config_ids, (list, tuple)) else [config_ids]):
        if token is not None and token not in ids:
            ids.append(int(token))
    return ids


def completion_text(trace: str | None, answer: str, eos: str, opened: bool = False) -> str:
    """What the model writes after the generation prompt: trace block (thinking on) + answer.
    `opened`: the prompt already wrote the opening tag (`opens_think_block`)."""
    if trace is None:
        return f"{answer}{eos}"
    if opened:
        return f"{trace}\n{THINK_CLOSE}\n\n{answer}{eos}"
    return f"{THINK_OPEN}\n{trace}\n{THINK_CLOSE}\n\n{answer}{eos}"


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
