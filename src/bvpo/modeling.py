"""Tokenizer, chat template, the embedded tiny model, and loading any HF causal LM.

The one rule everything else relies on: a *scored completion* is the text the model wrote
after the chat template's generation prompt. With thinking on that is `<think>trace</think>
answer<|im_end|>`; with thinking off the template already closed an empty think block, so
that block is part of the prompt and the completion is the answer alone. Prompts are always
rendered by the tokenizer's own template; completions are appended as raw text, so a
template that strips `<think>` from assistant turns cannot silently drop the trace.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

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


class ModelError(ValueError):
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


def build_tiny_model(tokenizer, hidden_size: int, num_layers: int, num_heads: int,
                     intermediate_size: int, max_length: int, seed: int):
    """A Qwen3-architecture causal LM from config, randomly initialised with `seed`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
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
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def render_prompt(tokenizer, prompt: str, thinking: bool) -> str:
    """The chat-templated prompt, ending where the model starts writing in that mode."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=thinking,
    )


def check_thinking_template(tokenizer, where: str) -> None:
    """Refuse a tokenizer whose chat template ignores `enable_thinking`, or whose thinking-on
    prompt already closes the think block, or that cannot write the think tags back as text."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"{where}: the tokenizer has no chat template (expected a Qwen3-style "
                         "template that honours enable_thinking)")
    marker = "Compute 1+2."  # the generation prompt is what follows the user's message
    on = render_prompt(tokenizer, marker, thinking=True).split(marker, 1)[-1]
    off = render_prompt(tokenizer, marker, thinking=False).split(marker, 1)[-1]
    if THINK_OPEN not in off or THINK_CLOSE not in off or on == off:
        raise ModelError(
            f"{where}: the chat template does not honour enable_thinking (expected thinking off "
            f"to end the prompt with an empty '{THINK_OPEN}...{THINK_CLOSE}' block, as Qwen3's does). "
            "Give the tokenizer a template that does (set `chat_template` in its tokenizer_config.json "
            "or a chat_template.jinja next to it)"
        )
    if THINK_CLOSE in on:
        raise ModelError(f"{where}: with enable_thinking=True the chat template already closes the think "
                         f"block ('{THINK_CLOSE}' in the generation prompt), so no trace could be sampled")
    probe = f"{THINK_OPEN}\n1+1=2\n{THINK_CLOSE}\n\n2"
    if tokenizer.decode(tokenizer(probe, add_special_tokens=False).input_ids) != probe:
        raise ModelError(f"{where}: the tokenizer does not decode '{THINK_OPEN}'/'{THINK_CLOSE}' back to "
                         "the same text, so sampled traces could not be told from answers")


def opens_think_block(tokenizer) -> bool:
    """True when the thinking-on generation prompt already opens the think block (DeepSeek-R1
    style, '...<think>\\n'): the model's completion then starts inside the trace."""
    return render_prompt(tokenizer, "x", thinking=True).rstrip().endswith(THINK_OPEN)


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
    model_dir = Path(model_dir)
    pointer = model_dir / POINTER_FILE
    if pointer.is_file():
        return json.loads(pointer.read_text())["path"]
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir}: no model here (expected config.json, or run the warmup stage)")
    return str(model_dir)


def load_tokenizer(model_dir: str | Path):
    path = resolve_model_dir(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: cannot load a tokenizer ({err})") from None
    check_thinking_template(tokenizer, path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_dir: str | Path, dtype: str = "float32", device: str | torch.device = "cpu"):
    path = resolve_model_dir(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: cannot load a causal LM ({err})") from None
    return model.to(device)


def save_model(model, tokenizer, out_dir: str | Path) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def write_model_pointer(path: str, out_dir: str | Path) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / POINTER_FILE).write_text(json.dumps({"path": path}, indent=2) + "\n")


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
