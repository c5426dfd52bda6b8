"""The warmup SFT: each problem in both modes as one prefix-sharing sequence, in fp32 or bf16."""

import pytest
import torch

from bvpo.config import Params
from bvpo.modeling import SDPA_FP32, build_tiny_model, resolve_precision, sdpa_in_fp32
from bvpo.sequences import score_pairs, shares_prompt
from bvpo.warmup import both_modes, sft


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, "bf16"), (False, True, "bf16"),
                                                        (False, False, "fp32")])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == expected
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"


def problems(tokenizer):
    import random

    chains = [("Compute 12+3-4.", "11", [12, ("+", 3), ("-", 4)]), ("Compute 50-7.", "43", [50, ("-", 7)])]
    return both_modes(chains, random.Random(0), tokenizer, opened=False)


def test_attention_in_fp32_under_bf16_autocast(tokenizer, monkeypatch):
    """Under bf16 autocast the attention kernel itself runs in fp32 (plain SDPA's inputs are
    cast to bf16 by autocast at dispatch); without autocast the fp32 attention is the same computation as SDPA's; under
    autocast the log-probs stay within bf16 rounding of fp32 and gradients flow. The model
    keeps sharing prompts inside, and is back on SDPA after."""
    kernel, seen = torch.nn.functional.scaled_dot_product_attention, []

    def spy(query, *args, **kwargs):  # the precision the kernel runs in, autocast included
        seen.append(torch.bfloat16 if torch.is_autocast_enabled("cpu") else query.dtype)
        return kernel(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = build_tiny_model(tokenizer, 32, 2, 4, 64, 192, seed=0)
    with_trace, without_trace = problems(tokenizer)
    plain, _ = score_pairs(model, with_trace, without_trace, tokenizer.pad_token_id)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        score_pairs(model, with_trace, without_trace, tokenizer.pad_token_id)
    assert seen == [torch.float32] * 2 + [torch.bfloat16] * 2  # 2 layers without, 2 under autocast
    seen.clear()
    with sdpa_in_fp32(model):
        assert model.config._attn_implementation == SDPA_FP32 and shares_prompt(model)
        same, _ = score_pairs(model, with_trace, without_trace, tokenizer.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed, _ = score_pairs(model, with_trace, without_trace, tokenizer.pad_token_id)
        mixed.sum().backward()
    assert seen and set(seen) == {torch.float32}
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(same, plain, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(mixed, plain, rtol=0.03, atol=0.3)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_warmup_learns_the_same_in_fp32_and_bf16(tokenizer):
    """A short SFT from the same initial weights: both precisions bring the loss down by the
    same amount, and the model comes back on plain SDPA attention."""
    params = Params()
    params.data.n_warmup, params.data.min_operand, params.data.max_operand = 300, 10, 99
    params.warmup.steps, params.warmup.lr = 40, 1e-2
    finals = {}
    for precision in ("fp32", "bf16"):
        params.warmup.mixed_precision = precision
        model = build_tiny_model(tokenizer, 32, 2, 4, 64, 192, seed=0)
        history, _ = sft(model, tokenizer, params, set(), progress=False)
        first, last = history[0]["loss"], sum(h["loss"] for h in history[-5:]) / 5
        assert last < 0.6 * first, (precision, first, last)
        assert model.config._attn_implementation == "sdpa" and not model.training
        finals[precision] = last
    assert finals["bf16"] != finals["fp32"]  # bf16 did run: its rounding moves the curve a little
    assert finals["bf16"] == pytest.approx(finals["fp32"], rel=0.1)
