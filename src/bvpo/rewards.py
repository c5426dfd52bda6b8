"""Rewards for sampled answers.

`model` / `verified_model`: a sequence-classification reward model (RewardModel) scores the
prompt and the final answer; see PairsConfig.reward.

`verified`: 1 when the final answer equals the reference, else 0. Integers (the embedded task)
are compared exactly and fast; anything else goes through math-verify, which understands
LaTeX, fractions and equivalent forms.
`graded`: `verified`, plus partial credit below 0.5 for a wrong number that is close to a
numeric reference, so that even a weak policy's samples rarely tie (more pairs per prompt).
"""

from __future__ import annotations

import re

_INTEGER = re.compile(r"[-+]?\d+")
_LAST_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def _as_int(text: str) -> int | None:
    text = text.strip().rstrip(".")
    return int(text) if _INTEGER.fullmatch(text) else None


def verified_reward(response: str, reference: str) -> float:
    """1.0 when `response` states the reference answer, else 0.0. Empty responses score 0."""
    response = response.strip()
    if not response:
        return 0.0
    gold = _as_int(reference)
    if gold is not None:
        pred = _as_int(response)
        if pred is None:
            numbers = _LAST_NUMBER.findall(response)
            pred = _as_int(numbers[-1]) if numbers else None
        return float(pred == gold)
    from math_verify import parse, verify

    try:
        return float(bool(verify(parse(reference), parse(response))))
    except Exception:  # math-verify gives up on unparsable text; that is a wrong answer
        return 0.0


def _last_number(text: str) -> float | None:
    numbers = _LAST_NUMBER.findall(text)
    return float(numbers[-1]) if numbers else None


def graded_reward(response: str, reference: str) -> float:
    """1.0 for a verified answer; else 0.5 / (1 + |error|) for a numeric answer; else 0."""
    if verified_reward(response, reference) == 1.0:
        return 1.0
    gold, pred = _last_number(reference), _last_number(response)
    if gold is None or pred is None:
        return 0.0
    return 0.5 / (1.0 + abs(pred - gold))


REWARDS = {"verified": verified_reward, "graded": graded_reward}


class RewardModel:
    """A sequence-classification reward model (one output) that scores a prompt and the final
    answer shown to the user, rendered with the reward model's own chat template when it has one."""

    def __init__(self, path: str, device: str = "cpu", dtype: str = "float32", max_length: int = 4096):
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        from .modeling import ModelError

        try:
            num_labels = AutoConfig.from_pretrained(path).num_labels
        except (OSError, ValueError) as err:
            raise ModelError(f"{path}: cannot load a reward model config ({err})") from None
        if num_labels != 1:
            raise ModelError(f"{path}: a reward model has one output (num_labels=1), this one has {num_labels}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=getattr(torch, dtype))
        except (OSError, ValueError) as err:
            raise ModelError(f"{path}: cannot load a sequence-classification reward model ({err})") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Sequence classifiers read the score at the last non-pad token, found by pad_token_id.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.model.to(device).eval()
        self.device, self.max_length = device, max_length

    def render(self, prompt: str, answer: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False)
        return f"{prompt}\n\n{answer}"

    def score(self, prompts: list[str], answers: list[str], batch_size: int = 32) -> list[float]:
        """One score per (prompt, answer), batched by length so little is padding."""
        import torch

        texts = [self.render(p, a) for p, a in zip(prompts, answers)]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        scores = [0.0] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = self.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                                       max_length=self.max_length, add_special_tokens=False).to(self.device)
                logits = self.model(**batch).logits[:, 0].float().tolist()
                for i, value in zip(idx, logits):
                    scores[i] = value
        return scores


def combine_verified_and_model(verified: float, model_score: float) -> float:
    """Verified first, the reward model breaks ties: correct answers always rank above wrong ones."""
    import math

    return verified + 0.5 / (1.0 + math.exp(-model_score))
