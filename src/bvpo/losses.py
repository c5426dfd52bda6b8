"""Preference losses and the BVPO mixture. Pure tensor functions, no model code.

`dpo_loss` has TRL's semantics (sigmoid DPO with label smoothing, rewards = β·log-ratio), so
numbers are comparable with TRL runs. `sequence_logps` scores exactly the completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO per example: (losses, chosen_rewards, rejected_rewards).

    label_smoothing is conservative DPO's ε: the probability that the label is flipped.
    """
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    losses = (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing)
        - F.logsigmoid(-beta * logits) * label_smoothing
    )
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO per example (Azar et al., eq. 17): (h − 1/(2β))², on length-normalised log-probs."""
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    losses = (logits - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


# fp32 elements of one chunk of logits in `completion_token_logps` (16 MiB): bounds the
# upcast copy whatever the vocabulary and sequence length.
LOGPS_CHUNK_ELEMENTS = 1 << 22


class _CompletionTokenLogps(torch.autograd.Function):
    """log_softmax(logits)[label] with O(chunk) extra memory: the forward keeps only the
    logits (already alive as the model's output), the backward recomputes each chunk's
    softmax and writes its gradient straight into one logits-sized buffer."""

    @staticmethod
    def forward(ctx, logits, labels, chunk):
        out = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[1], chunk):
            part = logits[:, start:start + chunk].float()
            picked = part.gather(-1, labels[:, start:start + chunk, None]).squeeze(-1)
            out[:, start:start + chunk] = picked - part.logsumexp(-1)
        ctx.save_for_backward(logits, labels)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[1], ctx.chunk):
            window = slice(start, start + ctx.chunk)
            scale = grad_out[:, window, None].float()
            part = torch.softmax(logits[:, window].float(), -1).mul_(-scale)
            part.scatter_add_(-1, labels[:, window, None], scale)
            grad[:, window] = part
        return grad, None, None


def completion_token_logps(
    logits: torch.Tensor, labels: torch.Tensor, chunk_elements: int = LOGPS_CHUNK_ELEMENTS
) -> torch.Tensor:
    """log p(labels[b, t] | logits[b, t]) per position ([B, T]), computed in fp32.

    A full fp32 `log_softmax` over [B, T, V] costs 4·B·T·V bytes forward and again for its
    saved output and gradient; with a 150k vocabulary and 2k-token traces that dominates
    training memory. Here at most a [B, chunk, V] fp32 slice exists besides the logits and
    their gradient, whatever the vocabulary and length.
    """
    batch, _, vocab = logits.shape
    chunk = max(1, chunk_elements // max(1, batch * vocab))
    return _CompletionTokenLogps.apply(logits, labels, chunk)


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probs of the completion tokens, and their count, per row.

    `completion_mask[i, j]` is 1 where token j of row i belongs to the scored completion;
    prompt and padding tokens contribute nothing. Token j is predicted by logits at j−1.
    """
    mask = completion_mask[:, 1:].float()
    token_logps = completion_token_logps(logits[:, :-1], input_ids[:, 1:])
    return (token_logps * mask).sum(-1), mask.sum(-1)


@dataclass
class EstimatorLoss:
    """One estimator's (trace or empty-trace) loss on a batch, and what to log about it."""

    loss: torch.Tensor
    preference: torch.Tensor
    nll: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def estimator_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    loss_type: str,
    beta: float,
    label_smoothing: float,
    nll_weight: float,
    preference_weight: float = 1.0,
) -> EstimatorLoss:
    """`preference_weight` × mean preference loss + `nll_weight` × per-token NLL of the chosen
    completions (preference_weight 0: the NLL-only control)."""
    if loss_type == "ipo":
        losses, cr, rr = ipo_loss(
            chosen_logps / chosen_tokens, rejected_logps / rejected_tokens,
            ref_chosen_logps / chosen_tokens, ref_rejected_logps / rejected_tokens, beta,
        )
    else:
        losses, cr, rr = dpo_loss(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, label_smoothing
        )
    preference = losses.mean()
    # Per-sequence mean NLL, averaged over pairs: unlike a batch-wide token mean it splits
    # exactly over micro-batches and processes, so accumulation and DDP change nothing.
    nll = -(chosen_logps / chosen_tokens).mean()
    return EstimatorLoss(preference_weight * preference + nll_weight * nll, preference, nll, cr, rr)


def bvpo_loss(trace_loss: torch.Tensor | None, empty_loss: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """The BVPO objective α·L_trace + (1−α)·L_empty.

    A term the method does not use (α ∈ {0, 1}) is dropped, not multiplied by 0, so a NaN in it
    cannot poison the gradient. Either term may be None: the objective is linear, so the
    trainer, which runs each estimator's forward/backward separately (their sequences differ
    threefold in length), calls this once per pass with the other term None, and the passes'
    gradients add up to exactly the objective's."""
    total = None
    for weight, term in ((alpha, trace_loss), (1.0 - alpha, empty_loss)):
        if weight <= 0.0 or term is None:
            continue
        part = term if weight >= 1.0 else weight * term
        total = part if total is None else total + part
    if total is None:
        raise ValueError(f"bvpo_loss: no term with a positive weight (alpha={alpha})")
    return total
