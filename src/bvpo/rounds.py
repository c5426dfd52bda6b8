"""Rounds: every pipeline run starts from the registered `@champion` (the base model in round 1),
trains candidates, and promotes one only when it beats the champion on the held-out prompts.

Pure logic only; the flow (bvpo.flow) reads the registry and moves the alias through `tracking`.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

from .errors import BvpoError
from .experiment import interval
from .tracking import REPLACED_TAG

# What identifies a trained model's weights; summaries with wall times would differ on a rerun.
FINGERPRINT_FILES = ("config.json", "model.safetensors")
MEAN_METRICS = {"accuracy_mean": ("accuracy_think", "accuracy_nothink"),
                "accuracy_mean_sampled": ("accuracy_think_sampled", "accuracy_nothink_sampled"),
                "reward_mean": ("reward_think", "reward_nothink"),
                "gold_mean": ("gold_think", "gold_nothink")}


class PromotionError(BvpoError, RuntimeError):
    """The evaluation needed for a promotion decision is missing or broken: nothing is promoted."""


def model_fingerprint(model_dir: str | Path) -> str:
    """SHA-256 of a saved model's config and weights. Equal fingerprints mean the same model, so
    a rerun whose inputs did not change registers nothing new."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    shards = sorted(p.name for p in model_dir.glob("*.safetensors"))
    names = ["config.json", *shards] if shards else list(FINGERPRINT_FILES)
    for name in names:
        path = model_dir / name
        if not path.is_file():
            raise PromotionError(f"{path}: missing, cannot identify the model in {model_dir}")
        digest.update(name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def per_prompt_metric(scores: dict[str, list[float]], metric: str, model: str) -> list[float]:
    """One model's per-prompt values of `metric` (data/eval_prompts.json's `scores[model]`)."""
    parts = MEAN_METRICS.get(metric, (metric,))
    missing = [p for p in parts if p not in scores]
    if missing:
        hint = ("the held-out prompts have no answers, so evaluation judged them with the reward model: set "
                "promotion.metric: reward_mean" if metric.startswith("accuracy") and "reward_think" in scores
                else "sampled metrics need evaluate.n_samples > 0; reward metrics need held-out prompts without "
                "answers and a reward model")
        raise PromotionError(f"evaluation of {model!r} has no per-prompt {', '.join(missing)} (needed for "
                             f"promotion.metric {metric}; {hint})")
    columns = [scores[p] for p in parts]
    return [sum(values) / len(values) for values in zip(*columns)]


def decide(per_prompt: dict[str, dict[str, list[float]]], candidate: str, metric: str, margin: float,
           require_interval: bool, champion: str = "base") -> dict:
    """Promote `candidate` over `champion` (both evaluated on the same held-out prompts) when
    the mean per-prompt difference of `metric` exceeds `margin` (and, with `require_interval`,
    so does the lower end of its paired 95% interval). Refuses to decide on a missing, empty,
    mismatched or non-finite evaluation."""
    for model in (candidate, champion):
        if model not in per_prompt:
            raise PromotionError(f"no evaluation of {model!r} on the held-out prompts: nothing is promoted")
    new = per_prompt_metric(per_prompt[candidate], metric, candidate)
    old = per_prompt_metric(per_prompt[champion], metric, champion)
    if not new and not old:
        raise PromotionError("no held-out prompts were set aside to decide promotions (evaluate.selection_fraction "
                             "is 0, or the held-out set is empty): nothing is promoted")
    if not new or len(new) != len(old):
        raise PromotionError(f"{candidate!r} and {champion!r} were not scored on the same held-out prompts "
                             f"({len(new)} vs {len(old)}): nothing is promoted")
    if not all(math.isfinite(v) for v in new + old):
        raise PromotionError(f"non-finite per-prompt {metric} for {candidate!r} or {champion!r}: nothing is promoted")
    difference = interval([a - b for a, b in zip(new, old)])
    beats = difference["mean"] > margin
    if require_interval:
        beats = beats and difference["low"] > margin
    return {
        "metric": metric,
        "candidate": candidate,
        "candidate_score": sum(new) / len(new),
        "champion_score": sum(old) / len(old),
        "difference": difference["mean"],
        "interval_low": difference["low"],
        "interval_high": difference["high"],
        "n_prompts": len(new),
        "margin": margin,
        "require_interval": require_interval,
        "promoted": beats,
    }


def base_identity(params) -> str:
    """What a lineage of rounds is built on: the base model (a path or hub id, or the embedded
    model's shape, warmup and seed) and the task (the prompts file, or the embedded task's
    settings). A champion registered under another identity is not this lineage's."""
    import json

    d, m = params.to_dict()["data"], params.to_dict()["model"]
    model = m["path"] if m["path"] is not None else {
        "embedded": {k: m[k] for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_length")},
        "warmup": params.to_dict()["warmup"], "seed": params.seed}
    task = d["source"] if d["source"] != "synthetic" else {
        k: d[k] for k in ("min_ops", "max_ops", "min_operand", "max_operand", "small_operand_fraction")}
    return hashlib.sha256(json.dumps([model, task], sort_keys=True).encode()).hexdigest()[:16]


def decision_tags(decision: dict) -> dict[str, str]:
    """A candidate version's tags recording its promotion decision."""
    return {"promotion_decision": "promoted" if decision["promoted"] else "not promoted",
            **{f"promotion_{k}": str(v) for k, v in decision.items() if k not in ("candidate", "promoted")}}


def pending_promotion(candidate_tags: dict | None, champion: str | None, candidate_version: str,
                      identity: str) -> bool:
    """Whether `@champion` should move to the candidate now: its round decided to promote it,
    and the alias still points at the model that round started from (a run killed between the
    decision and the alias move leaves it there). Once the alias moved on (a later round, or a
    rollback that replaced this candidate) nothing moves. `champion`: the alias if it belongs
    to this lineage (`identity`, the base model and task), else None; a candidate of another
    lineage is never promoted."""
    if not candidate_tags or candidate_tags.get("promotion_decision") != "promoted":
        return False
    if candidate_tags.get("base_identity") != identity:
        return False
    if REPLACED_TAG in candidate_tags or champion == candidate_version:
        return False
    return (champion or "base") == candidate_tags.get("started_from_version")


def decision_summary(decision: dict) -> str:
    """One line for logs and the results table."""
    verb = "promoted" if decision["promoted"] else "not promoted"
    rule = "its 95% interval's lower end" if decision["require_interval"] else "the difference"
    return (f"{decision['candidate']} {verb}: {decision['metric']} {decision['candidate_score']:.4f} vs champion "
            f"{decision['champion_score']:.4f}, difference {decision['difference']:+.4f} "
            f"(95% interval [{decision['interval_low']:+.4f}, {decision['interval_high']:+.4f}] over "
            f"{decision['n_prompts']} selection prompts); promotion needs {rule} > {decision['margin']:+.4f}")


def next_round(version_tags: list[dict[str, str]]) -> int:
    """1 + the highest `round` tag among the registered versions (1 when there is none)."""
    rounds = [int(tags["round"]) for tags in version_tags if tags.get("round", "").isdigit()]
    return max(rounds, default=0) + 1
