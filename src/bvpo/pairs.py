"""Preference pairs from scored samples: D_t (thinking on) and D_e (thinking off).

Within each prompt and mode, valid samples are ranked by reward; the i-th best is paired with
the i-th worst while it is strictly better. Invalid samples (unclosed think block, a think
block written with thinking off, length limit hit) are not answers and never enter a pair; ties make no pair.
"""

from __future__ import annotations

from collections import defaultdict


def build_pairs(samples: list[dict], max_pairs_per_prompt: int) -> dict[str, list[dict]]:
    """`samples` rows need prompt_id, prompt, mode, completion, reward, valid.

    Returns {"think": [...], "nothink": [...]} rows of prompt_id, prompt, chosen, rejected,
    chosen_reward, rejected_reward; completions are the exact text the model wrote.
    """
    groups: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for row in samples:
        if row["valid"]:
            groups[(row["prompt_id"], row["mode"])].append(row)
    out: dict[str, list[dict]] = {"think": [], "nothink": []}
    for (prompt_id, mode), rows in sorted(groups.items()):
        # Stable sort: among equal rewards the earlier sample wins, so pairs are reproducible.
        ranked = sorted(rows, key=lambda r: -r["reward"])
        for i in range(min(max_pairs_per_prompt, len(ranked) // 2)):
            best, worst = ranked[i], ranked[-1 - i]
            if best["reward"] <= worst["reward"]:
                break
            out[mode].append({
                "prompt_id": prompt_id,
                "prompt": best["prompt"],
                "chosen": best["completion"],
                "rejected": worst["completion"],
                "chosen_reward": best["reward"],
                "rejected_reward": worst["reward"],
            })
    return out
