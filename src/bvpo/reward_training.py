"""Training a Bradley–Terry reward model on labelled comparisons (the judged task's reward_model
stage). As reward models usually are, it starts from the policy's own starting point: the base
model's backbone under a new one-output head (`AutoModelForSequenceClassification`), trained
to score the chosen answer above the rejected one, −log σ(r_chosen − r_rejected). It sees what
`rewards.RewardModel` will show it: the prompt and the final answer in the model's chat
template, and is saved in Hugging Face format for that class to load.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .warmup import cosine_schedule


def load_classifier(base_dir: str | Path):
    """The base model's tokenizer and its backbone with a fresh one-output score head."""
    from transformers import AutoModelForSequenceClassification

    from .modeling import hub_kwargs, load_tokenizer, resolve_model_dir

    tokenizer = load_tokenizer(base_dir)
    path = resolve_model_dir(base_dir)  # data/base_model may point at a user's model
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32,
                                                               **hub_kwargs(path))
    # Sequence classifiers read the score at the last token that is not padding.
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def reward_batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    saved = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = saved


def rewards_of(model, tokenizer, texts: list[str]) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in reward_batch(tokenizer, texts).items()}).logits[:, 0]


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean −log σ(r_chosen − r_rejected): the negative log-likelihood of the labels."""
    return -F.logsigmoid(chosen - rejected).mean()


@torch.no_grad()
def agreement(model, tokenizer, texts: list[tuple[str, str]], rows: list[dict], batch_size: int) -> dict[str, float]:
    """On `rows` (comparisons with `gold_margin`, rendered as `texts`): the share the model
    orders as the gold scorer does, which is what the proxy is good for (training labels are noisy)."""
    model.eval()
    gold = 0.0
    for start in range(0, len(rows), batch_size):
        chunk, rendered = rows[start:start + batch_size], texts[start:start + batch_size]
        scores = rewards_of(model, tokenizer, [c for c, _ in rendered] + [r for _, r in rendered])
        margin = scores[:len(chunk)] - scores[len(chunk):]
        gold += sum((m > 0) == (r["gold_margin"] > 0) for m, r in zip(margin.tolist(), chunk))
    model.train()
    return {"accuracy_vs_gold": gold / len(rows)}


def train_reward_model(base_dir: str | Path, train_rows: list[dict], held_out: list[dict], config,
                       seed: int, out_dir: Path) -> dict[str, float]:
    """Bradley–Terry training on `train_rows` (prompt, chosen, rejected), `config` being the
    `reward_model` params section; saves the model and tokenizer to `out_dir` and returns the
    held-out agreement before and after, and the last training loss."""
    from .modeling import pick_device
    from .rewards import render_for_reward

    torch.manual_seed(seed)
    tokenizer, model = load_classifier(base_dir)
    model.to(pick_device())  # fp32 throughout: a user's model on a GPU, the embedded one on the CPU

    def rendered(rows: list[dict]) -> list[tuple[str, str]]:  # once, not at every step
        return [(render_for_reward(tokenizer, r["prompt"], r["chosen"]),
                 render_for_reward(tokenizer, r["prompt"], r["rejected"])) for r in rows]

    train_texts, held_out_texts = rendered(train_rows), rendered(held_out)
    before = agreement(model, tokenizer, held_out_texts, held_out, config.batch_size)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = cosine_schedule(optimizer, config.warmup_steps, config.steps)
    rng = random.Random(f"bvpo-reward-model-{seed}")
    losses = []
    for _ in tqdm(range(config.steps), desc="reward model", unit="step"):
        chunk = [train_texts[i] for i in rng.sample(range(len(train_texts)), min(config.batch_size, len(train_texts)))]
        scores = rewards_of(model, tokenizer, [c for c, _ in chunk] + [r for _, r in chunk])
        loss = bradley_terry_loss(scores[:len(chunk)], scores[len(chunk):])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    after = agreement(model, tokenizer, held_out_texts, held_out, config.batch_size)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    tail = losses[-max(1, len(losses) // 10):]
    return {"loss_last_tenth": sum(tail) / len(tail), **after,
            **{f"{k}_untrained": v for k, v in before.items()}}
