"""Warmup: SFT the embedded tiny model from scratch into a small reasoning model.

It learns the task in both modes, every problem written once with a stochastic trace and
once without, so that thinking beats not thinking (the answer is hard to produce without
writing the steps) while both leave room for preference optimisation to improve.
"""

from __future__ import annotations

import random
import time

import torch
from tqdm.auto import tqdm

from .chat import build_tokenizer, completion_text, opens_think_block
from .config import Params
from .data import make_trace, warmup_examples
from .modeling import build_tiny_model, resolve_precision, sdpa_in_fp32
from .sequences import encode, score_pairs, shares_prompt


def cosine_schedule(optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup to the peak learning rate, then cosine decay to zero."""
    import math

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def sft_tiny_model(params: Params, test_prompts: set[str], progress: bool = True):
    """Build and SFT the embedded model. Returns (model, tokenizer, per-step loss history, seconds)."""
    m = params.model
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, m.hidden_size, m.num_layers, m.num_heads,
                             m.intermediate_size, m.max_length, params.seed)
    return (model, tokenizer, *sft(model, tokenizer, params, test_prompts, progress))


def both_modes(problems: list, rng: random.Random, tokenizer, opened: bool) -> tuple[list, list]:
    """Each problem encoded with a fresh stochastic trace, and with the empty think block."""
    with_trace, without_trace = [], []
    for prompt, answer, chain in problems:
        completion = completion_text(make_trace(rng, chain), answer, tokenizer.eos_token, opened)
        with_trace.append(encode(tokenizer, prompt, completion, True))
        without_trace.append(encode(tokenizer, prompt, completion_text(None, answer, tokenizer.eos_token, opened),
                                    False))
    return with_trace, without_trace


def sft(model, tokenizer, params: Params, test_prompts: set[str], progress: bool = True):
    """SFT any causal LM and thinking-template tokenizer on the embedded task in both modes
    (`warmup` params). Returns (per-step loss history, seconds)."""
    w = params.warmup
    device = next(model.parameters()).device
    bf16 = resolve_precision(w.mixed_precision, device) == "bf16"
    opened = opens_think_block(tokenizer)
    # params.data spelled out: dvc.yaml lists exactly these keys for the warmup stage.
    problems = warmup_examples(params.data.n_warmup, test_prompts, params.data.min_ops, params.data.max_ops,
                               params.seed, (params.data.min_operand, params.data.max_operand),
                               params.data.small_operand_fraction)
    rng = random.Random(f"bvpo-warmup-batches-{params.seed}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=w.lr, weight_decay=0.01, betas=(0.9, 0.98))
    scheduler = cosine_schedule(optimizer, max(1, w.steps // 20), w.steps)
    model.train()
    history = []
    start = time.perf_counter()
    bar = tqdm(range(w.steps), desc="warmup (SFT)", disable=not progress, unit="step")
    shared = shares_prompt(model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    with sdpa_in_fp32(model, bf16):
        for step in bar:
            with_trace, without_trace = both_modes(rng.sample(problems, w.batch_size // 2), rng, tokenizer, opened)
            optimizer.zero_grad(set_to_none=True)
            # One sequence per problem: the no-thinking prompt branches off the thinking one
            # after their common head, which is most of a no-thinking example's tokens.
            with autocast:
                logps, counts = score_pairs(model, with_trace, without_trace, tokenizer.pad_token_id, shared)
            loss = -logps.sum() / counts.sum()
            loss.backward()
            loss_value = loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            history.append({"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0]})
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    return history, time.perf_counter() - start
