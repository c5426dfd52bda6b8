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
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_SPACE = re.compile(r"\s")
# Text wrappers and spacing that do not change an answer written as text (`\text{Evelyn}`, `\$32`).
_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_SPACING = re.compile(r"\\left|\\right|\\[,;:! ]|\\\$|\$|\s")


def _as_int(text: str) -> int | None:
    text = text.strip().rstrip(".")
    return int(text) if _INTEGER.fullmatch(text) else None


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if none."""
    found = None
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found = text[start:i]
                break
    return found


def final_answer(response: str) -> str:
    """What a response states as its answer: its last boxed expression when it has one (the
    usual instruction asks for `\\boxed{}`), else the whole response (the embedded task answers
    with a bare number)."""
    boxed = last_boxed(response)
    return (boxed if boxed is not None else response).strip()


def reference_answer(reference: str) -> str:
    """A data set's reference as the answer alone: GSM8K writes its worked solution, then
    `#### 72` (thousands separators and all)."""
    if "####" in reference:
        return reference.rsplit("####", 1)[1].strip().replace(",", "")
    return reference.strip()


def _plain(text: str) -> str:
    return _SPACING.sub("", _WRAPPER.sub(r"\1", text)).rstrip(".").lower()


def verified_reward(response: str, reference: str) -> float:
    """1.0 when `response` states the reference answer, else 0.0. Empty responses score 0.

    The response's final answer is its last `\\boxed{}` if it has one, else the whole response
    (so `\\boxed{5}. Check: 5^2 = 25` states 5). An integer reference and an integer answer are
    compared exactly and fast (the embedded task, GSM8K); everything else goes through
    math-verify with the reference read as LaTeX, as MATH writes it (`\\dfrac{14}{3}`,
    `2\\sqrt{3}`, `[-2,7]`, `\\pi`), and a plain-text comparison catches what is no formula
    (`\\text{Evelyn}`, `\\text{(C)}`). Without a box, a response that is one expression is the
    answer (`\\frac{1}{2}`); in prose only an answer the text states counts ("The answer is
    72."), never a number that merely appears in it."""
    response = response.strip()
    if not response:
        return 0.0
    reference = reference_answer(reference)
    answer = final_answer(response)
    gold, pred = _as_int(reference), _as_int(answer)
    if gold is not None and pred is not None:
        return float(pred == gold)
    if _plain(answer) == _plain(reference):
        return 1.0
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    try:
        gold_parsed = parse(f"\\boxed{{{reference}}}", [LatexExtractionConfig(boxed_match_priority=0)])
        if last_boxed(response) is not None or not _SPACE.search(answer):
            # The boxed answer, or a response that is one expression (`\\frac{1}{2}`), parsed alone.
            pred_parsed = parse(f"\\boxed{{{answer}}}", [LatexExtractionConfig(boxed_match_priority=0)])
        else:
            # Only an answer the text states ("the answer is 72", "Answer: 42"): math-verify's
            # unanchored fallback takes the last number anywhere, so "5. Check: 2 × 5 = 10" would
            # state 10.
            pred_parsed = parse(response, [LatexExtractionConfig(try_extract_without_anchor=False),
                                           ExprExtractionConfig(try_extract_without_anchor=False)])
        return float(bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed)))
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


def render_for_reward(tokenizer, prompt, answer: str) -> str:
    """What a reward model reads: the prompt and the final answer as a chat in its tokenizer's
    template (joined by blank lines without one). Training and scoring both render with this."""
    from .chat import as_messages

    messages = as_messages(prompt) + [{"role": "assistant", "content": answer}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n\n".join(m["content"] for m in messages)


class RewardModel:
    """A sequence-classification reward model that scores a prompt and the final answer shown
    to the user, rendered with the reward model's own chat template when it has one.

    `output` names the score in the model's output (`pairs.reward_model_output`): `logits`
    for a standard one-output classifier, `score` for ArmoRM's preference score, `rewards[k]`
    for one objective of several. `trust_remote_code` runs modeling code shipped in the
    model's directory (ArmoRM's custom class)."""

    def __init__(self, path: str, device: str = "cpu", precision: str = "fp32", max_length: int = 4096,
                 output: str = "logits", trust_remote_code: bool = False):
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        from .chat import ModelError
        from .config import REWARD_OUTPUT
        from .modeling import TORCH_DTYPES, hub_kwargs

        spec = REWARD_OUTPUT.fullmatch(output)
        if spec is None:
            raise ModelError(f"{path}: reward model output {output!r} is not a field with an optional index "
                             "(e.g. logits[0], score, rewards[3])")
        self.field, self.index = spec["field"], None if spec["index"] is None else int(spec["index"])
        kwargs = {"trust_remote_code": trust_remote_code, **hub_kwargs(path)}
        custom_code = (f"{path}: this reward model ships its own modeling code (auto_map in config.json), which "
                       "transformers runs only when allowed; without it a stock class would score with a random "
                       "head. Review the code, then set pairs.reward_model_trust_remote_code: true")
        try:
            config = AutoConfig.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as err:
            if "trust_remote_code" in str(err):
                raise ModelError(custom_code) from None
            raise ModelError(f"{path}: cannot load a reward model config ({err})") from None
        custom = bool(getattr(config, "auto_map", None))
        if custom and not trust_remote_code:
            raise ModelError(custom_code)
        if not custom and self.field == "logits" and (self.index is None and config.num_labels != 1
                                       or self.index is not None and self.index >= config.num_labels):
            raise ModelError(f"{path}: a reward model has one output (num_labels=1) unless pairs.reward_model_output "
                             f"names one of several (logits[0]..logits[{config.num_labels - 1}]); this one has "
                             f"{config.num_labels} and the output is {output!r}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=TORCH_DTYPES[precision],
                                                                            **kwargs)
        except (OSError, ValueError) as err:
            raise ModelError(f"{path}: cannot load a sequence-classification reward model ({err})") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Sequence classifiers read the score at the last non-pad token, found by pad_token_id.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.model.to(device).eval()
        self.device, self.max_length, self.path = device, max_length, path

    def render(self, prompt, answer: str) -> str:
        return render_for_reward(self.tokenizer, prompt, answer)

    def _pick(self, outputs) -> list[float]:
        from .chat import ModelError

        value = getattr(outputs, self.field, None)
        if value is None and hasattr(outputs, "get"):
            value = outputs.get(self.field)
        if value is None:
            fields = list(outputs.keys()) if hasattr(outputs, "keys") else []
            raise ModelError(f"{self.path}: the reward model's output has no {self.field!r} (it has {fields}); "
                             "set pairs.reward_model_output")
        value = value.float()
        if value.dim() == 2 and self.index is None and value.shape[1] == 1:
            value = value[:, 0]
        elif value.dim() == 2:
            if self.index is None or self.index >= value.shape[1]:
                raise ModelError(f"{self.path}: the reward model's {self.field!r} has {value.shape[1]} values per "
                                 f"sequence; name one as pairs.reward_model_output: {self.field}[k]")
            value = value[:, self.index]
        elif value.dim() != 1:
            raise ModelError(f"{self.path}: the reward model's {self.field!r} has shape {tuple(value.shape)}; "
                             "expected one score per sequence")
        return value.tolist()

    def score(self, prompts: list, answers: list[str], batch_size: int = 32) -> list[float]:
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
                for i, value in zip(idx, self._pick(self.model(**batch))):
                    scores[i] = value
        return scores


def load_reward_model(path: str, params, device: str) -> RewardModel:
    """The reward model `params` configure (output field, remote code), in the inference dtype."""
    from .modeling import resolve_dtype

    p = params.pairs
    return RewardModel(path, device, resolve_dtype(params.model.dtype, device), output=p.reward_model_output,
                       trust_remote_code=p.reward_model_trust_remote_code)


def combine_verified_and_model(verified: float, model_score: float) -> float:
    """Verified first, the reward model breaks ties: correct answers always rank above wrong ones."""
    import math

    return verified + 0.5 / (1.0 + math.exp(-model_score))


def score_samples(samples: list[dict], params, judge: str | None = None) -> None:
    """Set each sample's `reward` (invalid samples: 0, and they never enter a pair); `judge`:
    the reward model directory for `pairs.reward` model / verified_model (default
    `pairs.reward_model`). The judged task's samples also get their hidden `gold` grade, for the
    record only: nothing ranks by it."""
    kind = params.pairs.reward
    for r in samples:  # accuracy is reported whatever ranks the samples, when answers exist
        r["correct"] = verified_reward(r["response"], r["answer"]) if r["valid"] and r["answer"] else 0.0
    if params.data.task == "judged":
        from .judged import gold_reward

        for r in samples:
            r["gold"] = gold_reward(r["response"], r["answer"]) if r["valid"] else 0.0
    if kind in REWARDS:
        for r in samples:
            r["reward"] = REWARDS[kind](r["response"], r["answer"]) if r["valid"] else 0.0
        return
    from .modeling import pick_device  # torch and model code: only a reward model needs them

    valid = [r for r in samples if r["valid"]]
    model = load_reward_model(judge or params.pairs.reward_model, params, str(pick_device()))
    # The prompt and the final answer only: the reward model judges what the user sees.
    scores = model.score([r["prompt"] for r in valid], [r["response"] for r in valid],
                         params.pairs.reward_batch_size)
    for r in samples:
        r["reward"] = 0.0
    for r, score in zip(valid, scores):
        r["reward"] = score if kind == "model" else combine_verified_and_model(r["correct"], score)
