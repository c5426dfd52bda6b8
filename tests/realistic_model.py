"""Users' models, built offline the way the real ones are shaped: a byte-level BPE tokenizer
trained here with `tokenizers`, the chat template as the model ships it (tests/fixtures/templates,
copied verbatim; SOURCES.md there), and a tiny random model of the real architecture.

- `qwen3`: Qwen3's template (an `enable_thinking` switch), Qwen3ForCausalLM, Qwen3's special
  tokens and its two stop tokens (generation_config eos_token_id = [<|im_end|>, <|endoftext|>]).
- `r1`: DeepSeek-R1-Distill-Qwen's template (the generation prompt always opens `<think>\\n`, no
  switch; assistant turns lose their trace), Qwen2ForCausalLM (what R1-Distill-Qwen is), its
  begin/end-of-sentence tokens, pad = eos as it ships.
- `qwen3-thinking`: Qwen3-*-Thinking-2507's always-open template on Qwen3.

A custom-code reward model (`build_custom_reward_model`) stands in for ArmoRM: its modeling
file sits next to its config (auto_map), it returns several objectives and a gated `score`.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

TEMPLATES = Path(__file__).with_name("fixtures") / "templates"
CUSTOM_REWARD_MODEL = Path(__file__).with_name("fixtures") / "custom_reward_model"


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


QWEN3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
R1_SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
STYLES = {
    "qwen3": {"template": "qwen3", "arch": "qwen3", "specials": QWEN3_SPECIALS, "eos": "<|im_end|>",
              "pad": "<|endoftext|>", "bos": None, "stops": ["<|im_end|>", "<|endoftext|>"]},
    "qwen3-thinking": {"template": "qwen3-thinking-2507", "arch": "qwen3", "specials": QWEN3_SPECIALS,
                       "eos": "<|im_end|>", "pad": "<|endoftext|>", "bos": None,
                       "stops": ["<|im_end|>", "<|endoftext|>"]},
    "r1": {"template": "deepseek-r1-distill-qwen", "arch": "qwen2", "specials": R1_SPECIALS,
           "eos": "<｜end▁of▁sentence｜>", "pad": "<｜end▁of▁sentence｜>", "bos": "<｜begin▁of▁sentence｜>",
           "stops": ["<｜end▁of▁sentence｜>"]},
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
                                        bos_token=spec["bos"], chat_template=template(spec["template"]),
                                        model_max_length=4096)
    tokenizer.add_tokens(["<think>", "</think>"])
    return tokenizer


def tiny_decoder(arch: str, vocab_size: int, max_length: int, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A tiny random causal LM of a real architecture (GQA: 4 query heads, 2 key/value heads)."""
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    config_class, model_class = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
                                 "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    config = config_class(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=hidden // 4, max_position_embeddings=max_length, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return model_class(config)


def build_user_model(path: Path, style: str, params) -> Path:
    """Tokenizer + tiny random model of the style's architecture + a short SFT (the project's
    warmup code), saved at `path` with the real model's stop tokens in its generation config."""
    from bvpo.modeling import save_model
    from bvpo.warmup import sft

    spec = STYLES[style]
    tokenizer = train_tokenizer(style)
    model = tiny_decoder(spec["arch"], len(tokenizer), max_length=1024)
    for key in ("bos", "eos", "pad"):
        setattr(model.config, f"{key}_token_id", tokenizer.convert_tokens_to_ids(spec[key]) if spec[key] else None)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(spec["stops"])
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    sft(model, tokenizer, params, set(), progress=False)
    save_model(model, tokenizer, path)
    return path


def build_custom_reward_model(path: Path, tokenizer, objectives: int = 3, seed: int = 0) -> Path:
    """A tiny reward model with its own modeling code, saved like ArmoRM's folder: config.json
    naming the custom classes (auto_map), the .py files beside it, weights, tokenizer."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path.mkdir(parents=True, exist_ok=True)
    for source in CUSTOM_REWARD_MODEL.glob("*.py"):
        shutil.copy(source, path / source.name)
    (path / "config.json").write_text(json.dumps({
        "model_type": "tiny_gated_rm", "vocab_size": len(tokenizer), "num_objectives": objectives,
        "pad_token_id": tokenizer.pad_token_id,
        "auto_map": {"AutoConfig": "configuration_tiny_gated_rm.TinyGatedRMConfig",
                     "AutoModelForSequenceClassification": "modeling_tiny_gated_rm.TinyGatedRewardModel"}}))
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
