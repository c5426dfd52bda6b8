"""Turning (prompt, completion) text into scored token sequences, and generating completions.

Sequences are right-padded for scoring (the completion mask marks the scored tokens) and
left-padded for generation (so every row's next token sits in the last column).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .chat import THINK_CLOSE, THINK_OPEN, render_prompt, stop_token_ids
from .losses import completion_token_logps, sequence_logps
from .modeling import SDPA_FP32


@dataclass
class Encoded:
    input_ids: list[int]
    completion_start: int


def encode(tokenizer, prompt: str, completion: str, thinking: bool) -> Encoded:
    """Prompt via the chat template + completion as raw text, whole. Nothing is truncated: a
    completion scored without its prompt is a different sequence, so callers skip (and count)
    what does not fit `model.max_length` (`fits`)."""
    prompt_ids = tokenizer(render_prompt(tokenizer, prompt, thinking), add_special_tokens=False).input_ids
    completion_ids = tokenizer(completion, add_special_tokens=False).input_ids
    return Encoded(prompt_ids + completion_ids, len(prompt_ids))


def fits(encoded: Encoded, max_length: int) -> bool:
    return len(encoded.input_ids) <= max_length


def collate(encoded: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and completion mask for a list of sequences."""
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    completion = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        attention[row, :n] = 1
        completion[row, e.completion_start:n] = 1
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


def score(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and completion token counts, one forward pass."""
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
    return sequence_logps(logits, input_ids, batch["completion_mask"].to(device))


def shares_prompt(model) -> bool:
    """Whether `model` can score a pair as one prompt-sharing sequence: that needs a custom 4D
    boolean attention mask, which SDPA attention takes as given (flash attention does not)."""
    model = getattr(model, "module", model)  # DDP
    return getattr(model.config, "_attn_implementation", None) in ("sdpa", SDPA_FP32)


def shared_prefix(first: Encoded, second: Encoded) -> int:
    """Length of the longest common prefix of the two prompts (all of it for a DPO pair; the
    chat template's head and the problem for one problem written in both thinking modes)."""
    limit = min(first.completion_start, second.completion_start)
    n = 0
    while n < limit and first.input_ids[n] == second.input_ids[n]:
        n += 1
    return n


def collate_pairs(first: list[Encoded], second: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Each pair as one right-padded sequence [shared prefix, first's rest, second's rest] that
    runs the prompts' common prefix once. The second's rest attends to the prefix and itself
    only, with positions continuing from the prefix, so each sequence is scored exactly as on
    its own; where the second's completion starts right at the branch, its first token is
    predicted by the prefix's last position (`branch_scored`)."""
    rows = []
    for a, b in zip(first, second):
        prefix = shared_prefix(a, b)
        if prefix < 1 or len(a.input_ids) == a.completion_start or len(b.input_ids) == b.completion_start:
            raise ValueError("collate_pairs: every pair needs a shared prompt prefix and non-empty completions")
        rows.append((a, b, prefix))
    width = max(len(a.input_ids) + len(b.input_ids) - prefix for a, b, prefix in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    # Every query may see itself, so padding rows never softmax over nothing (NaN).
    allowed = torch.eye(width, dtype=torch.bool).repeat(n, 1, 1)
    first_mask = torch.zeros((n, width), dtype=torch.long)
    second_mask = torch.zeros((n, width), dtype=torch.long)
    prefix_last = torch.empty(n, dtype=torch.long)
    branch_first = torch.empty(n, dtype=torch.long)
    branch_scored = torch.zeros(n)
    for row, (a, b, prefix) in enumerate(rows):
        tail = b.input_ids[prefix:]
        split, end = len(a.input_ids), len(a.input_ids) + len(tail)
        ids[row, :end] = torch.tensor(a.input_ids + tail)
        positions[row, :split] = torch.arange(split)
        positions[row, split:end] = torch.arange(prefix, prefix + len(tail))
        allowed[row, :end, :end] = torch.ones(end, end, dtype=torch.bool).tril()
        allowed[row, split:end, prefix:split] = False
        first_mask[row, a.completion_start:split] = 1
        # b's token j sits at split + j - prefix; the one at the branch is not predicted by its
        # left neighbour (the end of a), so it is scored from the prefix instead.
        second_mask[row, split + max(b.completion_start, prefix + 1) - prefix:end] = 1
        branch_scored[row] = float(b.completion_start == prefix)
        prefix_last[row] = prefix - 1
        branch_first[row] = tail[0]
    return {"input_ids": ids, "position_ids": positions, "attention_mask": allowed[:, None],
            "first_mask": first_mask, "second_mask": second_mask, "prefix_last": prefix_last,
            "branch_first": branch_first, "branch_scored": branch_scored}


def score_pairs(model, chosen: list[Encoded], rejected: list[Encoded], pad_id: int,
                shared_prompt: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and completion token counts of the chosen then the rejected
    sequences ([2n] each, the layout of `score` over chosen + rejected), in one forward pass.
    With `shared_prompt` (and a model that supports it) the prompts' common prefix is run once
    per pair: the whole prompt of a DPO pair, the shared head of one problem in both modes."""
    if not (shared_prompt and shares_prompt(model)):
        if shared_prompt:  # shown once per process by Python's default warning filter
            warnings.warn("train.shared_prompt: the model does not run SDPA attention, so chosen and "
                          "rejected are scored as separate sequences (each runs the prompt)", stacklevel=2)
        return score(model, collate(chosen + rejected, pad_id))
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate_pairs(chosen, rejected, pad_id).items()}
    input_ids = batch["input_ids"]
    # No KV cache when scoring: under activation checkpointing (FSDP's) the recomputed layers
    # would append their keys to the cache a second time and attend over both copies.
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], use_cache=False).logits
    token_logps = completion_token_logps(logits[:, :-1], input_ids[:, 1:])
    first_mask, second_mask = batch["first_mask"][:, 1:].float(), batch["second_mask"][:, 1:].float()
    rows = torch.arange(len(chosen), device=device)
    scored = batch["branch_scored"]
    branch = completion_token_logps(logits[rows, batch["prefix_last"]][:, None], batch["branch_first"][:, None])[:, 0]
    logps = torch.cat([(token_logps * first_mask).sum(-1), (token_logps * second_mask).sum(-1) + branch * scored])
    counts = torch.cat([first_mask.sum(-1), second_mask.sum(-1) + scored])
    return logps, counts


@dataclass
class Generated:
    text: str
    n_tokens: int
    truncated: bool
    stop: str = ""
    """The stop token the model ended with, as text ("" when truncated): appended to `text`, it
    gives the completion that is scored (Qwen3 may end with <|im_end|> or <|endoftext|>)."""


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    thinking: bool,
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    desc: str | None = None,
    top_k: int = 0,
    kv_cache: str = "dynamic",
    max_cache_len: int | None = None,
) -> list[Generated]:
    """One completion per prompt (repeat a prompt to sample it several times), batched with
    the KV cache. A completion ends at the first stop token (`chat.stop_token_ids`);
    `truncated` marks completions that hit `max_new_tokens` without one.

    `kv_cache="static"`: a preallocated cache, with which transformers compiles the decode step
    on a GPU. Every batch gets a cache of one length, `max_cache_len` (default: this call's
    longest prompt + max_new_tokens), so the compiled step is reused; a caller that generates
    over several calls passes its longest overall."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rendered = [render_prompt(tokenizer, p, thinking) for p in prompts]
    # Longest prompts first keeps padding small inside each batch.
    order = sorted(range(len(rendered)), key=lambda i: -len(rendered[i]))
    results: list[Generated | None] = [None] * len(rendered)
    stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    if kv_cache == "static" and max_cache_len is None:
        longest = max(len(ids) for ids in tokenizer(rendered, add_special_tokens=False).input_ids)
        max_cache_len = longest + max_new_tokens
    saved_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        n_batches = math.ceil(len(order) / batch_size)
        for b in tqdm(range(n_batches), desc=desc, disable=desc is None, unit="batch"):
            idx = order[b * batch_size:(b + 1) * batch_size]
            enc = tokenizer([rendered[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                          pad_token_id=tokenizer.pad_token_id)
            if kv_cache == "static":
                kwargs.update(cache_implementation="static", max_cache_len=max_cache_len)
            if greedy:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            else:
                kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
            out = model.generate(**enc, **kwargs)
            new_tokens = out[:, enc["input_ids"].shape[1]:].tolist()
            for row, i in enumerate(idx):
                results[i] = finish(new_tokens[row], stop_ids, tokenizer)
    finally:
        tokenizer.padding_side = saved_side
        model.train(was_training)
    return results  # type: ignore[return-value]


def finish(tokens: list[int], stop_ids: list[int], tokenizer) -> Generated:
    """A generated token list cut at its first stop token. Special tokens stay in the text: it
    is re-tokenised and scored as written."""
    end = next((j for j, t in enumerate(tokens) if t in stop_ids), None)
    if end is None:
        kept = [t for t in tokens if t != tokenizer.pad_token_id]
        return Generated(tokenizer.decode(kept, skip_special_tokens=False), len(kept), True)
    return Generated(tokenizer.decode(tokens[:end], skip_special_tokens=False), end + 1, False,
                     tokenizer.decode(tokens[end:end + 1], skip_special_tokens=False))


@dataclass
class Parsed:
    trace: str | None
    answer: str
    malformed: bool
    """Not a valid answer in its mode: thinking on and the think block never closed, or
    thinking off and the model wrote a think block of its own."""


def parse_completion(text: str, thinking: bool) -> Parsed:
    """Split a completion into trace and answer. With thinking on, a completion that never
    closes its think block has no answer; with thinking off (the template already closed an
    empty block), a completion that opens or closes one is not a no-thinking answer."""
    if not thinking:
        stray = THINK_OPEN in text or THINK_CLOSE in text
        return Parsed(None, "" if stray else text.strip(), stray)
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN):
        stripped = stripped[len(THINK_OPEN):]
    if THINK_CLOSE not in stripped:
        return Parsed(stripped.strip(), "", True)
    trace, answer = stripped.split(THINK_CLOSE, 1)
    return Parsed(trace.strip(), answer.strip(), False)

