"""A user's model, built offline: a byte-level BPE tokenizer trained here with `tokenizers`, a
tiny random Qwen3, and a chat template written like Qwen3's or like DeepSeek-R1-Distill's.

The R1-style template opens the think block in the generation prompt (`<think>\\n`), strips
`<think>…</think>` from assistant turns and uses its own role and end-of-sentence tokens, so a
pipeline that assumed the embedded model's conventions would break on it. Both templates honour
`enable_thinking` (thinking off closes an empty think block), as the project requires. The
model is SFT'd for a few steps by the project's own warmup code so that it writes the format.
"""

from __future__ import annotations

import random
from pathlib import Path

QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}"
    "{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

R1_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}{{- '<｜User｜>' + message.content }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    "{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<｜Assistant｜>' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}"
    "{%- endif %}"
)

STYLES = {
    "qwen3": {"template": QWEN3_TEMPLATE, "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              "eos": "<|im_end|>", "pad": "<|endoftext|>", "bos": None},
    "r1": {"template": R1_TEMPLATE, "specials": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>",
                                                 "<｜Assistant｜>", "<｜▁pad▁｜>"],
           "eos": "<｜end▁of▁sentence｜>", "pad": "<｜▁pad▁｜>", "bos": "<｜begin▁of▁sentence｜>"},
}


def train_tokenizer(style: str, vocab_size: int = 320):
    """Byte-level BPE trained on the embedded task's prompts and traces, think tags added as
    ordinary (non-special) tokens as Qwen3 and R1-Distill have them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from bvpo.data import make_problem, make_trace, solve

    spec = STYLES[style]
    rng = random.Random(0)
    corpus = []
    for _ in range(2000):
        prompt, chain = make_problem(rng, 1, 2, (10, 99))
        corpus += [prompt, make_trace(rng, chain), str(solve(chain)[-1][3])]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=spec["specials"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=spec["eos"], pad_token=spec["pad"],
                                        bos_token=spec["bos"], chat_template=spec["template"], model_max_length=4096)
    tokenizer.add_tokens(["<think>", "</think>"])
    return tokenizer


def build_user_model(path: Path, style: str, params) -> Path:
    """Tokenizer + tiny random Qwen3 + a short SFT (the project's warmup code), saved at `path`."""
    from bvpo.modeling import build_tiny_model, save_model
    from bvpo.warmup import sft

    tokenizer = train_tokenizer(style)
    m = params.model
    model = build_tiny_model(tokenizer, m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size,
                             m.max_length, seed=0)
    sft(model, tokenizer, params, set(), progress=False)
    save_model(model, tokenizer, path)
    return path
