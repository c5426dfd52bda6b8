"""Scoring many sequences in few, padding-free rows: prompt sharing and packing in one layout.

A *group* is sequences that begin with the same prompt tokens (a DPO pair; the k samples of
one prompt). It is laid out once as [prefix, rest_1, rest_2, ...]: the prefix runs once, each
rest attends to the prefix and to itself only, with positions continuing from the prefix, so
every sequence is scored exactly as on its own. Groups are packed side by side into rows of at
most `max_tokens`, and a group never attends to another. Every scored token is read from the
logits of the column that holds its predecessor (the prefix's last column for a rest's first
token), and only those columns reach the output head where the model allows it
(`logits_to_keep`): with a 150k vocabulary the logits of prompt columns are most of the memory.

Attention: SDPA takes the layout as a dense [W, W] boolean mask (it computes masked blocks
too, so rows should stay short there), eager attention as the same mask made additive (it adds
the mask to the scores: a boolean one would mask nothing); FlexAttention
(`attn_implementation="flex_attention"`) gets a block mask and skips the blocks no query may
see, which is what makes long packed rows pay on a GPU. Kernels that take no custom mask
(flash-attention 2) are refused.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .losses import completion_token_logps
from .modeling import SDPA_FP32
from .sequences import Encoded, shared_prefix


@dataclass
class Group:
    sequences: list[Encoded]
    prefix: int
    """Tokens all sequences share at their start (at most the shortest prompt)."""

    @property
    def n_tokens(self) -> int:
        return self.prefix + sum(len(s.input_ids) - self.prefix for s in self.sequences)


def make_group(sequences: list[Encoded]) -> Group:
    """The sequences with the longest prompt prefix they all share (at least one token)."""
    first = sequences[0]
    prefix = first.completion_start
    for other in sequences[1:]:
        prefix = min(prefix, shared_prefix(first, other))
    if prefix < 1:
        raise ValueError("packing: the sequences of a group share no prompt token")
    return Group(sequences, prefix)


def pack(groups: list[Group], max_tokens: int) -> list[list[int]]:
    """Group indices per row, first fit over groups longest first; a group longer than
    `max_tokens` gets a row of its own (a group is never split: its rests need its prefix)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for g in sorted(range(len(groups)), key=lambda i: -groups[i].n_tokens):
        size = groups[g].n_tokens
        row = next((r for r, free in enumerate(room) if free >= size), None)
        if row is None:
            rows.append([g])
            room.append(max_tokens - size)
        else:
            rows[row].append(g)
            room[row] -= size
    return rows


def collate_packed(groups: list[Group], rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Ids, positions, per-column group and segment ids of the packed rows, and for every
    scored token (sequence order: the groups' sequences in `groups` order) its row, the column
    that predicts it, its id and its sequence index."""
    width = max(sum(groups[g].n_tokens for g in row) for row in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    # Padding columns get a group of their own each, so they attend to themselves only (a query
    # that may see nothing would softmax over nothing: NaN).
    group_id = torch.arange(width).repeat(n, 1) + len(groups)
    segment = torch.zeros((n, width), dtype=torch.long)
    first_sequence = [0]
    for g in groups:
        first_sequence.append(first_sequence[-1] + len(g.sequences))
    row_of, source, target, sequence_of = [], [], [], []
    for r, row in enumerate(rows):
        col = 0
        for g in row:
            group = groups[g]
            p = group.prefix
            head = group.sequences[0].input_ids[:p]
            ids[r, col:col + p] = torch.tensor(head)
            positions[r, col:col + p] = torch.arange(p)
            group_id[r, col:col + p] = g
            prefix_col, col = col, col + p
            for j, seq in enumerate(group.sequences):
                rest = seq.input_ids[p:]
                ids[r, col:col + len(rest)] = torch.tensor(rest, dtype=torch.long)
                positions[r, col:col + len(rest)] = torch.arange(p, p + len(rest))
                group_id[r, col:col + len(rest)] = g
                segment[r, col:col + len(rest)] = j + 1
                # Scored tokens t = lo..k-1, each predicted by the column of token t-1: in the
                # prefix (t-1 < p) or in this rest (ranges, not a loop per token).
                lo, k = max(seq.completion_start, 1), len(seq.input_ids)
                row_of.extend([r] * (k - lo))
                source.extend(range(prefix_col + lo - 1, prefix_col + min(p, k - 1)))
                source.extend(range(col + max(lo - 1, p) - p, col + k - 1 - p))
                target.extend(seq.input_ids[lo:])
                sequence_of.extend([first_sequence[g] + j] * (k - lo))
                col += len(rest)
    return {"input_ids": ids, "position_ids": positions, "group_id": group_id, "segment": segment,
            "row": torch.tensor(row_of, dtype=torch.long), "source": torch.tensor(source, dtype=torch.long),
            "target": torch.tensor(target, dtype=torch.long),
            "sequence": torch.tensor(sequence_of, dtype=torch.long)}


def dense_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[rows, 1, W, W] boolean: same group, not later, and the prefix or the query's own rest."""
    group, segment = batch["group_id"], batch["segment"]
    width = group.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=group.device).tril()
    same_group = group[:, :, None] == group[:, None, :]
    visible = (segment[:, None, :] == 0) | (segment[:, :, None] == segment[:, None, :])
    return (same_group & visible & causal)[:, None]


def flex_block_mask(batch: dict[str, torch.Tensor]):
    """The same layout as `dense_mask`, as a FlexAttention block mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    group, segment = batch["group_id"], batch["segment"]

    def allowed(b, h, q, kv):
        return (group[b, q] == group[b, kv]) & (kv <= q) & ((segment[b, kv] == 0) | (segment[b, kv] == segment[b, q]))

    rows, width = group.shape
    # Uncompiled, building the mask materialises [rows, W, W]; compiled it stays blockwise (on a
    # CPU torch has no FlexAttention backward anyway, and compiling there costs more than it saves).
    return create_block_mask(allowed, rows, None, width, width, device=group.device,
                             _compile=group.device.type == "cuda")


def _attention_implementation(model) -> str | None:
    model = getattr(model, "module", model)  # DDP
    return getattr(model.config, "_attn_implementation", None)


PACKING_ATTENTION = ("sdpa", SDPA_FP32, "eager", "flex_attention")


def attention_mask_for(model, batch: dict[str, torch.Tensor]):
    """The packed layout in the form `model`'s attention takes it (see the module doc)."""
    kind = _attention_implementation(model)
    if kind not in PACKING_ATTENTION:
        raise ValueError(f"packed scoring needs a custom attention mask, which {kind!r} attention does not take: "
                         f"load the model with one of {', '.join(PACKING_ATTENTION)}")
    if kind == "flex_attention":
        return flex_block_mask(batch)
    mask = dense_mask(batch)
    if kind == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def _keeps_logits(model) -> bool:
    model = getattr(model, "module", model)
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def packed_token_logps(model, groups: list[Group], rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of every completion token of every sequence of `groups`, from one forward pass
    over the packed `rows`, and the index of the sequence each belongs to. Tokens come in
    sequence order (the groups' sequences in `groups` order), each sequence's in text order."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate_packed(groups, rows, pad_id).items()}
    mask = attention_mask_for(model, batch)
    source = batch["source"]
    kwargs = {}
    if _keeps_logits(model):
        # Only the columns that predict a scored token go through the output head.
        kept = torch.unique(source)
        kwargs["logits_to_keep"] = kept
        source = torch.searchsorted(kept, source)
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                   use_cache=False, **kwargs).logits
    picked = completion_token_logps(logits[batch["row"], source][None], batch["target"][None])[0]
    return picked, batch["sequence"]


def score_packed(model, groups: list[Group], rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and completion token counts of every sequence of `groups`
    (in order), from one forward pass over the packed `rows`."""
    picked, sequence = packed_token_logps(model, groups, rows, pad_id)
    n = sum(len(g.sequences) for g in groups)
    logps = torch.zeros(n, dtype=picked.dtype, device=picked.device).index_add(0, sequence, picked)
    counts = torch.zeros(n, dtype=picked.dtype, device=picked.device).index_add(0, sequence, torch.ones_like(picked))
    return logps, counts


@torch.no_grad()
def grouped_token_logps(model, encoded: list[Encoded], keys: list, batch_size: int, pad_id: int) -> list[torch.Tensor]:
    """Completion-token log-probs of every sequence (input order; fp32 on the CPU). Sequences
    with the same key (a prompt's k samples in one mode) form one group whose prompt runs once;
    about `batch_size` sequences per forward pass, one group per row, similar sizes together."""
    members: dict = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    groups = sorted(((m, make_group([encoded[i] for i in m])) for m in members.values()), key=lambda g: g[1].n_tokens)
    batches, batch, n_batch = [], [], 0
    for member, group in groups:
        batch.append((member, group))
        n_batch += len(member)
        if n_batch >= batch_size:
            batches.append(batch)
            batch, n_batch = [], 0
    batches += [batch] if batch else []
    out: list[torch.Tensor] = [torch.empty(0)] * len(encoded)
    for batch in batches:
        picked, _ = packed_token_logps(model, [g for _, g in batch], [[j] for j in range(len(batch))], pad_id)
        order = [i for member, _ in batch for i in member]
        sizes = [len(encoded[i].input_ids) - max(encoded[i].completion_start, 1) for i in order]
        for i, values in zip(order, picked.float().cpu().split(sizes)):
            out[i] = values
    return out


def pair_rows(chosen: list[Encoded], rejected: list[Encoded], indices: list[int], max_tokens: int) -> list[list[int]]:
    """`indices` (pairs) cut into packed rows of at most `max_tokens` tokens, longest first."""
    groups = [make_group([chosen[i], rejected[i]]) for i in indices]
    return [[indices[g] for g in row] for row in pack(groups, max_tokens)]


def score_pairs_packed(model, chosen: list[Encoded], rejected: list[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequences.score_pairs` as one padding-free row: log-probs and token counts of the
    chosen then the rejected sequences ([2n] each)."""
    groups = [make_group([c, r]) for c, r in zip(chosen, rejected)]
    logps, counts = score_packed(model, groups, [list(range(len(groups)))], pad_id)
    # Sequence order is c0, r0, c1, r1, ...: regroup as chosen then rejected.
    return logps.view(-1, 2).T.reshape(-1), counts.view(-1, 2).T.reshape(-1)
