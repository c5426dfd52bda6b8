"""The BVPO training recipe, run under `accelerate launch` (1 CPU, 2 gloo processes or N GPUs).

Reads top to bottom: setup (pairs, reference log-probs), then for each method: model,
optimizer, resume, the step loop, save. One optimizer step of a method with weight α:

    loss = α · [DPO_t + λ·NLL_t](trace pairs) + (1 − α) · [DPO_e + λ·NLL_e](empty-trace pairs)

Each estimator runs its own forward/backward passes (trace sequences are ~3× longer, so a
shared padded batch would waste most of the empty-trace compute); chosen and rejected go
through one concatenated forward. The global batch is `train.batch_size` pairs of each mode,
split evenly over processes, then into micro-batches. Data order depends only on the seed and
the step, never on the number of processes, so 1 and 2 processes take the same steps and a
resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .alpha import alpha_from_statistics, gradient_statistics
from .config import ConfigError, Params, load_params
from .gradients import GradientVector, mixed_variance
from .losses import estimator_loss
from .modeling import load_model, load_tokenizer, resolve_model_dir
from .sequences import Encoded, collate, score
from .sequences import encode as encode_sequence
from .warmup import cosine_schedule

MODES = ("think", "nothink")
PREFIX = {"think": "trace", "nothink": "empty"}
KILL_ENV = "BVPO_KILL_AFTER_CHECKPOINT"  # tests: die (SIGKILL) right after saving this step


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss). The message says what happened."""


@dataclass
class PairSet:
    """Encoded pairs of one mode, with their reference log-probs (None: score live)."""

    chosen: list[Encoded]
    rejected: list[Encoded]
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.chosen)


# ----------------------------------------------------------------------------------- setup
def load_pair_rows(pairs_dir: Path) -> dict[str, list[dict]]:
    from datasets import load_from_disk

    return {mode: load_from_disk(str(pairs_dir / mode)).to_list() for mode in MODES}


def encode_pairs(tokenizer, rows: list[dict], thinking: bool, max_length: int) -> tuple[list, list]:
    """(chosen, rejected) encodings of one mode's pairs."""
    chosen = [encode_sequence(tokenizer, r["prompt"], r["chosen"], thinking, max_length) for r in rows]
    rejected = [encode_sequence(tokenizer, r["prompt"], r["rejected"], thinking, max_length) for r in rows]
    return chosen, rejected


def files_digest(folder: Path, limit_bytes: int = 1 << 30) -> str:
    """Content hash of a folder's files (name, size and mtime only past `limit_bytes`)."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    for p in files:
        h.update(str(p.relative_to(folder)).encode())
        if total <= limit_bytes:
            h.update(p.read_bytes())
        else:
            h.update(f"{p.stat().st_size}:{p.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def model_digest(model_dir: str | Path) -> str:
    resolved = resolve_model_dir(model_dir)
    return files_digest(Path(resolved)) if Path(resolved).is_dir() else hashlib.sha256(resolved.encode()).hexdigest()[:16]


@torch.no_grad()
def reference_logps(model, encoded: list[Encoded], pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """Summed completion log-probs under the frozen reference."""
    model.eval()
    out = torch.empty(len(encoded))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        logps, _ = score(model, collate([encoded[i] for i in idx], pad_id))
        out[idx] = logps.float().cpu()
    return out


def precomputed_reference(cache_file: Path, load_reference, data: dict[str, tuple], pad_id: int, accelerator):
    """Reference log-probs for every pair, computed once (main process) and cached on disk,
    keyed by the pairs' and the reference model's hashes."""
    if accelerator.is_main_process and not cache_file.is_file():
        reference = load_reference()
        computed = {mode: (reference_logps(reference, chosen, pad_id), reference_logps(reference, rejected, pad_id))
                    for mode, (chosen, rejected) in data.items()}
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        torch.save(computed, tmp)
        os.replace(tmp, cache_file)
    accelerator.wait_for_everyone()
    return torch.load(cache_file)


def step_indices(n: int, step: int, batch: int, seed: int, stream: str) -> list[int]:
    """The `batch` dataset indices used at optimizer step `step`: epochs of seeded permutations."""
    out = []
    position = step * batch
    while len(out) < batch:
        epoch, offset = divmod(position, n)
        perm = list(range(n))
        random.Random(f"{seed}-{stream}-{epoch}").shuffle(perm)
        take = min(batch - len(out), n - offset)
        out.extend(perm[offset:offset + take])
        position += take
    return out


# ----------------------------------------------------------------------------------- losses
class Recipe:
    """What every pass of one method needs: the data, the loss settings, the reference."""

    def __init__(self, params: Params, data: dict[str, PairSet], pad_id: int, reference=None,
                 preference_weight: float = 1.0):
        self.t = params.train
        self.seed = params.seed
        self.data = data
        self.pad_id = pad_id
        self.reference = reference  # only for train.reference = live
        self.betas = {"think": self.t.beta, "nothink": self.t.beta_empty or self.t.beta}
        self.preference_weight = preference_weight

    def loss(self, model, mode: str, chunk: list[int]):
        """Estimator loss (DPO/IPO + NLL) on the pairs `chunk` of `mode`, and token counts."""
        pairs = self.data[mode]
        n = len(chunk)
        batch = collate([pairs.chosen[i] for i in chunk] + [pairs.rejected[i] for i in chunk], self.pad_id)
        logps, n_tokens = score(model, batch)
        if pairs.ref_chosen is not None:
            ref = torch.cat([pairs.ref_chosen[chunk], pairs.ref_rejected[chunk]]).to(logps.device)
        else:
            with torch.no_grad():
                ref, _ = score(self.reference, batch)
        result = estimator_loss(logps[:n], logps[n:], n_tokens[:n], n_tokens[n:], ref[:n], ref[n:],
                                self.t.loss_type, self.betas[mode], self.t.label_smoothing, self.t.nll_weight,
                                self.preference_weight)
        if not torch.isfinite(result.loss):
            raise TrainingError(f"non-finite {PREFIX[mode]} loss ({result.loss.item()}); the last good "
                                "checkpoint is kept. Lower train.lr or train.beta, then rerun the stage")
        return result, n_tokens

    def update_pass(self, model, mode: str, indices: list[int], weight: float, share: int, accelerator,
                    sync_last: bool) -> dict[str, float]:
        """Forward/backward of one estimator over this process's `indices` (micro-batched,
        longest first), each micro-batch scaled by its share of `share` pairs. Returns sums."""
        sums = dict.fromkeys(("loss", "dpo", "nll", "chosen_reward", "rejected_reward", "margin", "accuracy",
                              "tokens"), 0.0)
        pairs = self.data[mode]
        indices = sorted(indices, key=lambda i: -len(pairs.chosen[i].input_ids) - len(pairs.rejected[i].input_ids))
        micro = min(self.t.micro_batch_size, len(indices))
        chunks = [indices[i:i + micro] for i in range(0, len(indices), micro)]
        for c, chunk in enumerate(chunks):
            sync = sync_last and c == len(chunks) - 1
            with accelerator.no_sync(model) if not sync else contextlib.nullcontext():
                result, n_tokens = self.loss(model, mode, chunk)
                accelerator.backward(result.loss * (len(chunk) / share) * weight)
            margins = result.chosen_rewards - result.rejected_rewards
            sums["loss"] += result.loss.item() * len(chunk)
            sums["dpo"] += result.preference.item() * len(chunk)
            sums["nll"] += result.nll.item() * len(chunk)
            sums["chosen_reward"] += result.chosen_rewards.sum().item()
            sums["rejected_reward"] += result.rejected_rewards.sum().item()
            sums["margin"] += margins.sum().item()
            sums["accuracy"] += (margins > 0).float().sum().item()
            sums["tokens"] += n_tokens.sum().item()
        return sums

    def gradient_draws(self, model, mode: str, step: int, rank: int, grad_vector: GradientVector,
                       accelerator) -> torch.Tensor:
        """`alpha_draws` independent micro-batch gradients of one estimator, gathered over
        processes: [draws × processes, d]. Leaves .grad zeroed."""
        rng = random.Random(f"{self.seed}-draws-{mode}-{step}-{rank}")
        n = len(self.data[mode])
        draws = []
        for _ in range(self.t.alpha_draws):
            chunk = rng.sample(range(n), min(self.t.alpha_draw_size, n))
            model.zero_grad(set_to_none=True)
            with accelerator.no_sync(model):
                result, _ = self.loss(model, mode, chunk)
                accelerator.backward(result.loss)
            draws.append(grad_vector())
        model.zero_grad(set_to_none=True)
        return accelerator.gather(torch.stack(draws))


# ----------------------------------------------------------------------------------- checkpoints
def latest_checkpoint(method_dir: Path, fingerprint: str) -> Path | None:
    found = []
    for meta in method_dir.glob("checkpoints/step-*/bvpo_state.json"):
        state = json.loads(meta.read_text())
        if state.get("fingerprint") == fingerprint:
            found.append((state["step"], meta.parent))
    return max(found)[1] if found else None


def save_checkpoint(accelerator, method_dir: Path, step: int, state: dict) -> None:
    """accelerate's state (model, optimizer, scheduler, RNG) + ours (step, α, history)."""
    target = method_dir / "checkpoints" / f"step-{step:06d}"
    accelerator.save_state(str(target))
    if accelerator.is_main_process:
        (target / "bvpo_state.json").write_text(json.dumps({**state, "step": step}))
        for old in (method_dir / "checkpoints").glob("step-*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    if os.environ.get(KILL_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------- one method
def train_method(name: str, alpha_setting: float | str, params: Params, base_dir: str, recipe: Recipe,
                 tokenizer, accelerator, work_dir: Path, fingerprint: str, on_log=None) -> list[dict]:
    t = params.train
    method_dir = work_dir / name
    final_dir = method_dir / "final"
    if (final_dir / "history.json").is_file() and \
            json.loads((final_dir / "history.json").read_text())["fingerprint"] == fingerprint:
        if accelerator.is_main_process:
            print(f"train {name}: already trained in an earlier, interrupted run; reusing it", flush=True)
        history = json.loads((final_dir / "history.json").read_text())["history"]
        for row in history if on_log is not None else []:
            on_log(row)
        return history

    world, rank = accelerator.num_processes, accelerator.process_index
    auto = alpha_setting == "auto"
    torch.manual_seed(params.seed)
    model = load_model(base_dir, params.model.dtype)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    # Not prepared: accelerate's scheduler wrapper steps once per process per call.
    scheduler = cosine_schedule(optimizer, t.warmup_steps, t.steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    grad_vector = GradientVector(list(accelerator.unwrap_model(model).parameters()), t.grad_sketch_dim, params.seed)

    state = {"fingerprint": fingerprint, "alpha": t.alpha_init if auto else float(alpha_setting),
             "alpha_estimated": False, "history": []}
    start_step = 0
    checkpoint = latest_checkpoint(method_dir, fingerprint)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / "bvpo_state.json").read_text())
        start_step = state["step"] + 1
        if accelerator.is_main_process:
            print(f"train {name}: resuming from {checkpoint.name}", flush=True)
    history: list[dict] = state["history"]
    for row in history if on_log is not None else []:
        on_log(row)  # a resumed run's MLflow run holds the whole curve, not just the tail

    per_process = t.batch_size // world
    bar = tqdm(range(start_step, t.steps), desc=f"train {name} (alpha={alpha_setting})", unit="step",
               disable=not accelerator.is_main_process, initial=start_step, total=t.steps)
    started = time.perf_counter()
    for step in bar:
        row: dict[str, float] = {"step": step}
        alpha = state["alpha"]
        if (auto or t.telemetry) and step % t.alpha_every == 0:
            trace = recipe.gradient_draws(model, "think", step, rank, grad_vector, accelerator)
            empty = recipe.gradient_draws(model, "nothink", step, rank, grad_vector, accelerator)
            stats = gradient_statistics(trace, empty)
            alpha_star = alpha_from_statistics(stats["var_trace"], stats["var_empty"], stats["bias_gap_sq"])
            if auto:
                smoothed = alpha_star if not state["alpha_estimated"] else \
                    t.alpha_ema * state["alpha"] + (1 - t.alpha_ema) * alpha_star
                state["alpha"] = alpha = min(max(smoothed, t.alpha_min), t.alpha_max)
                state["alpha_estimated"] = True
            var_mixed = mixed_variance(trace, empty, alpha)
            row.update({f"grad/{k}": v for k, v in stats.items()})
            row["alpha_star"] = alpha_star
            row["grad/var_mixed"] = var_mixed
            row["grad/var_ratio_mixed_to_trace"] = var_mixed / max(stats["var_trace"], 1e-30)
            row["alpha_sq"] = alpha**2

        weights = {"think": alpha, "nothink": 1.0 - alpha}
        active = [mode for mode in MODES if weights[mode] > 0]
        optimizer.zero_grad(set_to_none=True)
        loss_total, trace_grad = 0.0, None
        for k, mode in enumerate(active):
            global_idx = step_indices(len(recipe.data[mode]), step, t.batch_size, params.seed, mode)
            mine = global_idx[rank * per_process:(rank + 1) * per_process]
            # Each process averages over its share; DDP then averages the processes' gradients.
            sums = recipe.update_pass(model, mode, mine, weights[mode], per_process, accelerator,
                                      sync_last=k == len(active) - 1)
            if mode == "think" and len(active) == 2:
                trace_grad = grad_vector() / weights["think"]
            totals = accelerator.reduce(torch.tensor(list(sums.values()), device=accelerator.device), "sum")
            for key, value in zip(sums, (totals / t.batch_size).tolist()):
                row[f"{PREFIX[mode]}/{key if key != 'tokens' else 'tokens_per_pair'}"] = value
            loss_total += weights[mode] * row[f"{PREFIX[mode]}/loss"]
        if trace_grad is not None:
            # The step's own estimator gradients: ‖g_t‖, ‖g_e‖ and their cosine.
            trace_grad = accelerator.reduce(trace_grad, "mean")
            empty_grad = (grad_vector() - weights["think"] * trace_grad) / weights["nothink"]
            row["grad/step_norm_trace"] = trace_grad.norm().item()
            row["grad/step_norm_empty"] = empty_grad.norm().item()
            row["grad/step_cos_trace_empty"] = torch.nn.functional.cosine_similarity(
                trace_grad, empty_grad, dim=0).item()
        row["loss"] = loss_total
        row["grad_norm"] = float(accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm))
        if not torch.isfinite(torch.tensor(row["grad_norm"])):
            raise TrainingError(f"non-finite gradient norm at step {step} of {name}; the last good checkpoint "
                                "is kept. Lower train.lr or train.beta, then rerun the stage")
        optimizer.step()
        scheduler.step()
        row["lr"] = scheduler.get_last_lr()[0]
        row["alpha"] = alpha
        history.append(row)
        if accelerator.is_main_process:
            bar.set_postfix(loss=f"{loss_total:.3f}", alpha=f"{alpha:.2f}")
            if on_log is not None:
                on_log(row)
        if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0 and step + 1 < t.steps:
            save_checkpoint(accelerator, method_dir, step, state)
    elapsed = time.perf_counter() - started

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = method_dir / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "train_summary.json").write_text(json.dumps(
            {"method": name, "alpha": alpha_setting, "final_alpha": state["alpha"], "steps": t.steps,
             "seconds_this_run": elapsed, "final": history[-1]}, indent=2) + "\n")
        (tmp / "history.json").write_text(json.dumps({"fingerprint": fingerprint, "history": history}))
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(tmp, final_dir)
        shutil.rmtree(method_dir / "checkpoints", ignore_errors=True)
    accelerator.wait_for_everyone()
    return history


def write_history_csv(history: list[dict], path: Path) -> None:
    import csv

    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "step", k))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bvpo.train", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--pairs", required=True, help="pairs stage output (think/ and nothink/)")
    parser.add_argument("--base", required=True, help="starting policy and reference model")
    parser.add_argument("--work", required=True, help="checkpoints and finished models, one folder per method")
    parser.add_argument("--cache", required=True, help="folder for cached reference log-probs")
    parser.add_argument("--project-dir", default=".", help="where the MLflow store lives")
    args = parser.parse_args(argv)

    from accelerate import Accelerator

    from . import tracking

    params = load_params(args.params)
    t = params.train
    accelerator = Accelerator()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise TrainingError(f"{launched} processes were launched but accelerate sees {accelerator.num_processes}: "
                            "each would train alone. On a CPU-only machine set ACCELERATE_USE_CPU=true")
    work_dir = Path(args.work)
    tokenizer = load_tokenizer(args.base)
    rows = load_pair_rows(Path(args.pairs))
    for mode in MODES:
        needed = any(m.alpha == "auto" or (m.alpha if mode == "think" else 1 - m.alpha) > 0
                     for m in t.methods.values())
        if needed and len(rows[mode]) < 1:
            raise TrainingError(f"{args.pairs}/{mode}: no preference pairs (every prompt's samples tied "
                                "or were invalid); sample more (sample.k) or from more prompts")

    # Setup: encode every pair; reference log-probs once per (pairs, reference model).
    encoded = {mode: encode_pairs(tokenizer, rows[mode], mode == "think", params.model.max_length) for mode in MODES}
    pairs_digest, base_digest = files_digest(Path(args.pairs)), model_digest(args.base)
    reference = None
    if t.reference == "live":
        reference = load_model(args.base, params.model.dtype, accelerator.device).eval().requires_grad_(False)
        data = {mode: PairSet(c, r, None, None) for mode, (c, r) in encoded.items()}
    else:
        cache_file = Path(args.cache) / (f"reference-{pairs_digest}-{base_digest}-{params.model.max_length}"
                                        f"-{params.model.dtype}.pt")
        logps = precomputed_reference(cache_file, lambda: load_model(args.base, params.model.dtype, accelerator.device),
                                      encoded, tokenizer.pad_token_id, accelerator)
        data = {mode: PairSet(c, r, *logps[mode]) for mode, (c, r) in encoded.items()}
    recipes = {name: Recipe(params, data, tokenizer.pad_token_id, reference, method.preference_weight)
               for name, method in t.methods.items()}

    train_config = {k: v for k, v in params.to_dict()["train"].items() if k not in ("methods", "num_processes")}
    for name, method in t.methods.items():
        # Everything that decides the weights: a checkpoint from other settings is never resumed.
        fingerprint = hashlib.sha256(json.dumps(
            [name, method.alpha, method.preference_weight, train_config, params.seed, params.model.max_length, params.model.dtype,
             pairs_digest, base_digest], sort_keys=True, default=str).encode()).hexdigest()[:16]
        if accelerator.is_main_process:
            with tracking.stage_run(args.project_dir, params.tracking.experiment, f"train/{name}",
                                    params={"method": name, "alpha": method.alpha,
                                            "preference_weight": method.preference_weight, **train_config},
                                    tags={"method": name}):
                pending: list[dict] = []

                def on_log(row, pending=pending):
                    pending.append(row)
                    if len(pending) >= 25:
                        tracking.log_history(pending)
                        pending.clear()

                history = train_method(name, method.alpha, params, args.base, recipes[name], tokenizer, accelerator,
                                       work_dir, fingerprint, on_log)
                if pending:
                    tracking.log_history(pending)
                write_history_csv(history, work_dir / name / "final" / "history.csv")
        else:
            train_method(name, method.alpha, params, args.base, recipes[name], tokenizer, accelerator, work_dir,
                         fingerprint)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, TrainingError, ValueError) as err:
        print(f"bvpo train: error: {err}", file=sys.stderr)
        sys.exit(2)
