"""Figures: where a picture beats a table (method comparison, training curves)."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def eval_bar_chart(results: dict[str, dict], out: str | Path) -> None:
    """Grouped bars per model, thinking on and off: greedy accuracy, or (held-out prompts
    without answers) the reward model's mean score."""
    names = list(results)
    accuracy = all("accuracy_think" in results[n] for n in names)
    key, scale = ("accuracy", 100) if accuracy else ("reward", 1)
    width = 0.38
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 3.6), dpi=120)
    for k, (mode, label) in enumerate((("think", "thinking"), ("nothink", "no thinking"))):
        values = [scale * results[n][f"{key}_{mode}"] for n in names]
        xs = [i + (k - 0.5) * width for i in range(len(names))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.1f" if accuracy else "%.2f", fontsize=7)
    ax.set_xticks(range(len(names)), names)
    if accuracy:
        ax.set_ylabel("greedy accuracy (%)")
        ax.set_ylim(0, 105)
        ax.set_title("Held-out accuracy by method")
    else:
        ax.set_ylabel("mean reward-model score (greedy)")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title("Held-out reward by method")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)


def experiment_chart(result: dict, out: str | Path) -> None:
    """Grouped bars with 95% intervals over seeds: each model's accuracy (the judged task: gold
    reward), thinking on, off and their mean (greedy; sampled too when evaluated)."""
    names = list(result["models"])
    kind = "gold" if "gold_mean" in result["metrics"] else "accuracy"
    metrics = [m for m in (f"{kind}_think", f"{kind}_nothink", f"{kind}_mean") if m in result["metrics"]]
    sampled = [m + "_sampled" for m in metrics if m + "_sampled" in result["metrics"]]
    panels = [("greedy", metrics)] + ([("sampled, T=1", sampled)] if sampled else [])
    fig, axes = plt.subplots(len(panels), 1, figsize=(2.0 + 1.2 * len(names), 3.4 * len(panels)), dpi=120,
                             squeeze=False)
    width = 0.8 / len(metrics)
    for ax, (title, keys) in zip(axes[:, 0], panels):
        for k, key in enumerate(keys):
            stats = [result["models"][n][key] for n in names]
            means = [100 * s["mean"] for s in stats]
            errors = [[100 * (s["mean"] - s["low"]) for s in stats], [100 * (s["high"] - s["mean"]) for s in stats]]
            xs = [i + (k - (len(keys) - 1) / 2) * width for i in range(len(names))]
            label = key.replace(f"{kind}_", "").replace("_sampled", "")
            ax.bar(xs, means, width, yerr=errors, capsize=2, label=label)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_ylabel(f"{'gold reward (x100)' if kind == 'gold' else 'accuracy (%)'}, {title}")
        ax.set_ylim(0, 100)
        ax.legend(loc="upper right", fontsize=7, ncols=3)
    axes[0, 0].set_title(f"Mean over {len(result['seeds'])} seeds, 95% intervals")
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)


def _read_csv(path: Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def training_curves(csv_dir: str | Path, out: str | Path,
                    keys: tuple[str, ...] = ("loss", "think/dpo", "nothink/dpo", "think/margin", "nothink/margin",
                                             "think/nll", "nothink/nll", "grad_norm", "alpha")) -> None:
    """One panel per metric, one line per method, from the train stage's per-method CSVs."""
    files = sorted(Path(csv_dir).glob("*.csv"))
    histories = {f.stem: _read_csv(f) for f in files}
    keys = tuple(k for k in keys if any(k in row for h in histories.values() for row in h))
    cols = 3
    rows = max(1, -(-len(keys) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), dpi=110, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, history in histories.items():
            points = [(r["step"], r[key]) for r in history if key in r]
            if points:
                ax.plot(*zip(*points), label=name, linewidth=1)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if keys:
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)


def gradient_telemetry(csv_dir: str | Path, out: str | Path) -> None:
    """Why BVPO helps on this model: α (used and α*), the per-draw variances of each estimator
    and of the mixture, the mixture's variance relative to the trace estimator's next to α²
    (the paper's claim for the trace-induced part), the bias gap and the step gradients' cosine."""
    histories = {f.stem: _read_csv(f) for f in sorted(Path(csv_dir).glob("*.csv"))}
    panels = [
        ("α used (line) and α* (dots)", ["alpha"], ["alpha_star"], False),
        ("per-draw gradient variance", ["grad/var_think", "grad/var_nothink", "grad/var_mixed"], [], True),
        ("Var(mixed) ÷ Var(trace) vs α² (dashed)", ["grad/var_ratio_mixed_to_think"], [], False),
        ("squared bias gap ‖ḡ_e − ḡ_t‖² (noise-corrected)", ["grad/bias_gap_sq"], [], True),
        ("cos(g_t, g_e) of each step", ["grad/step_cos_think_nothink"], [], False),
        ("‖g_t‖, ‖g_e‖ of each step", ["grad/step_norm_think", "grad/step_norm_nothink"], [], True),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.2), dpi=110)
    for ax, (title, lines, dots, log) in zip(axes.flat, panels):
        positive = False
        for name, history in histories.items():
            for key in lines + dots:
                points = [(r["step"], r[key]) for r in history if key in r]
                if not points:
                    continue
                positive = positive or any(value > 0 for _, value in points)
                label = f"{name} {key.split('/')[-1]}" if len(lines) > 1 else name
                if key in dots:
                    ax.plot(*zip(*points), "o", markersize=3, label=f"{name} α*")
                else:
                    ax.plot(*zip(*points), linewidth=1, label=label)
            if key == "grad/var_ratio_mixed_to_think":
                squares = [(r["step"], r["alpha_sq"]) for r in history if "alpha_sq" in r]
                if squares:
                    ax.plot(*zip(*squares), "--", linewidth=1, label=f"{name} α²")
        # The noise-corrected bias gap can be <= 0 on every step of a short run: keep it linear.
        if log and positive:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if ax.has_data():
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)


def champion_history(rounds: list[dict], metric: str, out: str | Path) -> None:
    """Per round: the champion it started from, its candidate (with the paired 95% interval of
    their difference drawn around the candidate), and whether the candidate was promoted."""
    rounds = sorted(rounds, key=lambda r: r["round"])
    xs = [r["round"] for r in rounds]
    fig, ax = plt.subplots(figsize=(2.5 + 0.6 * len(xs), 3.4), dpi=120)
    ax.plot(xs, [100 * r["champion_score"] for r in rounds], "s-", color="tab:gray", label="champion (start of round)")
    for r in rounds:
        low = 100 * (r["champion_score"] + r["interval_low"])
        high = 100 * (r["champion_score"] + r["interval_high"])
        color = "tab:green" if r["promoted"] else "tab:red"
        ax.vlines(r["round"], low, high, color=color, alpha=0.5)
        ax.plot(r["round"], 100 * r["candidate_score"], "o", color=color)
    ax.plot([], [], "o", color="tab:green", label="candidate, promoted")
    ax.plot([], [], "o", color="tab:red", label="candidate, not promoted")
    ax.set_xticks(xs)
    ax.set_xlabel("round")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title("Champion history")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
