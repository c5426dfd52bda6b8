"""Tokenizer and chat template: how prompts are rendered and completions written, in both modes.

The one rule everything else relies on: a *scored completion* is the text the model wrote
after the chat template's generation prompt. With thinking on that is `<think>trace</think>
answer<|im_end|>`; with thinking off the template already closed an empty think block, so
that block is part of the prompt and the completion is the answer alone. Prompts are always
rendered by the tokenizer's own template; completions are appended as raw text, so a
template that strips `<think>` from assistant turns cannot silently drop the trace.

No torch and no model code here: validating params and the stages that handle only text
import this in about a second (`bvpo.modeling`, with transformers' model code, takes four).
"""

from __future__ import annotations

import re

from transformers import PreTrainedTokenizerFast

from .errors import BvpoError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
EMPTY_THINK = "<think>\n\n</think>\n\n"

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
