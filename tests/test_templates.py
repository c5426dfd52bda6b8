"""Chat templates as the models ship them (tests/fixtures/templates, verbatim copies; sources in
SOURCES.md there): both modes render, the completion/loss boundary falls where the model starts
writing, and a template that cannot run both modes is refused with the reason."""

from __future__ import annotations

import pytest

from bvpo.chat import (
    EMPTY_THINK, ModelError, check_thinking_template, completion_text, opens_think_block, render_prompt)
from bvpo.sequences import encode, parse_completion
from realistic_model import template, train_tokenizer

# (style, template file, what the thinking-on generation prompt ends with)
REAL = [
    ("qwen3", "qwen3", "<|im_start|>assistant\n"),
    ("qwen3-thinking", "qwen3-thinking-2507", "<|im_start|>assistant\n<think>\n"),
    ("r1", "deepseek-r1-distill-qwen", "<｜Assistant｜><think>\n"),
    ("r1", "deepseek-r1-distill-qwen-hf", "<｜Assistant｜><think>\n"),
]


@pytest.fixture(scope="module")
def tokenizers():
    return {style: train_tokenizer(style) for style in ("qwen3", "qwen3-thinking", "r1")}


@pytest.mark.parametrize("style, name, on_end", REAL)
def test_real_templates_run_both_modes(tokenizers, style, name, on_end):
    tokenizer = tokenizers[style]
    tokenizer.chat_template = template(name)
    check_thinking_template(tokenizer, name)  # DeepSeek-R1-Distill's and Thinking-2507's were refused
    on = render_prompt(tokenizer, "Compute 1+2.", thinking=True)
    off = render_prompt(tokenizer, "Compute 1+2.", thinking=False)
    assert on.endswith(on_end)
    assert off.endswith(EMPTY_THINK)
    always_open = on_end.endswith("<think>\n")
    assert opens_think_block(tokenizer) == always_open
    if always_open:  # thinking off closes the block the template opened: <think>\n + \n</think>\n\n
        assert off == on + "\n</think>\n\n"
    else:  # Qwen3's own switch
        assert off == on + EMPTY_THINK


@pytest.mark.parametrize("style, name", [("r1", "deepseek-r1-distill-qwen"), ("qwen3", "qwen3"),
                                         ("qwen3-thinking", "qwen3-thinking-2507")])
def test_the_scored_completion_holds_the_trace_and_thinking_off_scores_the_answer_only(tokenizers, style, name):
    """R1-Distill's template strips `<think>...</think>` from assistant turns: completions are
    appended as text after the generation prompt, so the trace is still what is scored."""
    tokenizer = tokenizers[style]
    tokenizer.chat_template = template(name)
    opened = opens_think_block(tokenizer)
    with_trace = completion_text("12+30=42", "42", tokenizer.eos_token, opened)
    e = encode(tokenizer, "Compute 12+30.", with_trace, thinking=True)
    assert tokenizer.decode(e.input_ids[e.completion_start:]) == with_trace
    assert "12+30=42" in tokenizer.decode(e.input_ids[e.completion_start:])
    assert tokenizer.decode(e.input_ids[:e.completion_start]) == render_prompt(tokenizer, "Compute 12+30.", True)
    parsed = parse_completion(with_trace.removesuffix(tokenizer.eos_token), thinking=True)
    assert (parsed.trace, parsed.answer, parsed.malformed) == ("12+30=42", "42", False)
    answer_only = completion_text(None, "42", tokenizer.eos_token, opened)
    e = encode(tokenizer, "Compute 12+30.", answer_only, thinking=False)
    assert tokenizer.decode(e.input_ids[e.completion_start:]) == "42" + tokenizer.eos_token
    assert tokenizer.decode(e.input_ids[:e.completion_start]).endswith(EMPTY_THINK)


def test_chat_prompts_and_system_prompts_render_through_the_real_templates(tokenizers):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "<think>\nsay hi\n</think>\n\nHello."},
            {"role": "user", "content": "Compute 1+2."}]
    qwen3 = tokenizers["qwen3"]
    qwen3.chat_template = template("qwen3")
    text = render_prompt(qwen3, chat, thinking=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi.<|im_end|>\n")
    assert text.endswith("<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n" + EMPTY_THINK)
    r1 = tokenizers["r1"]
    r1.chat_template = template("deepseek-r1-distill-qwen")
    text = render_prompt(r1, chat, thinking=True)
    # R1-Distill puts the system prompt first, bare, and drops the earlier turn's trace.
    assert text == ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi.<｜Assistant｜>\n\nHello.<｜end▁of▁sentence｜>"
                    "<｜User｜>Compute 1+2.<｜Assistant｜><think>\n")


def test_a_chat_template_without_thinking_is_refused_with_the_reason(tokenizers):
    tokenizer = tokenizers["qwen3"]
    tokenizer.chat_template = template("llama3")  # Llama-3.1-Instruct: no think block at all
    with pytest.raises(ModelError, match="neither honours enable_thinking nor opens a think block"):
        check_thinking_template(tokenizer, "llama-3.1")
