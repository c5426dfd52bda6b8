"""The BVPO training loss, run under `accelerate launch` (1 CPU, 2 gloo processes or N GPUs).

Reads top to bottom: pair setup (encoding, reference log-probs) shared by every method, then
for each method `setup` (its own Accelerator, model, optimizer, resume), `train_loop`,
`save_final`, and the method's memory is released before the next one starts. One optimizer
step of a method with weight α minimises the BVPO objective (`losses.bvpo_loss`):

    α · [DPO_t + λ·NLL_t](trace pairs) + (1 − α) · [DPO_e + λ·NLL_e](empty-trace pairs)

Each estimator runs its own forward/backward passes (trace sequences are ~3× longer, so a
shared padded batch would waste most of the empty-trace compute); chosen and rejected go
through one concatenated forward. The global batch is `train.batch_size` pairs of each mode,
split evenly over processes, then into micro-batches. Data order, and the pairs of every
gradient draw, depend only on the seed and the step, never on the number of processes, so 1
and 2 processes take the same steps (and estimate the same α*) and a resumed run continues
exactly where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .alpha import AlphaState, gradient_statistics, update_alpha
from .config import Params, TrainConfig, load_params
from .errors import BvpoError
from .gradients import GradientVector, mixed_variance
from .losses import bvpo_loss, estimator_loss
from .modeling import (TORCH_DTYPES, check_training_support, compile_decoder_layers, load_model, load_tokenizer,
                       resolve_dtype, sdpa_in_fp32)
from .modes import MODES
from .paths import record_run_facts
from .reference import cache_file, code_digest, cpu_bf16, load_reference_model, model_digest, precomputed_reference
from .runtime import files_digest
from .packing import pair_rows, score_pairs_packed
from .sequences import Encoded, fits, score_pairs
from .sequences import encode as encode_sequence
from .warmup import cosine_schedule

# The estimators as error messages name them (metrics and files say think / nothink: bvpo.modes).
ESTIMATOR = {"think": "trace", "nothink": "empty-trace"}
KILL_ENV = "BVPO_KILL_AFTER_CHECKPOINT"  # tests: "METHOD:STEP" dies (SIGKILL) right after that checkpoint
RUN_FACTS = "run_facts.json"  # a method's wall time and peak memory, in its work folder
# The code that decides a method's weights: a change to it (or to the libraries) makes a finished
# method or a checkpoint of the old code stale.
TRAINING_MODULES = ("train.py", "losses.py", "sequences.py", "packing.py", "chat.py", "modeling.py", "alpha.py",
                    "gradients.py", "reference.py", "warmup.py")


class TrainingError(BvpoError, RuntimeError):
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


# ----------------------------------------------------------------------------------- pair setup
def load_pair_rows(pairs_dir: Path) -> dict[str, list[dict]]:
    from datasets import load_from_disk

    return {mode: load_from_disk(str(pairs_dir / mode)).to_list() for mode in MODES}


def encode_pairs(tokenizer, rows: list[dict], thinking: bool, max_length: int) -> tuple[list, list, int]:
    """(chosen, rejected, skipped) encodings of one mode's pairs. A pair whose chosen or
    rejected sequence does not fit `max_length` whole is skipped, never truncated: a
    completion scored without its prompt is not the sequence the policy wrote."""
    chosen, rejected, skipped = [], [], 0
    for r in rows:
        c = encode_sequence(tokenizer, r["prompt"], r["chosen"], thinking)
        j = encode_sequence(tokenizer, r["prompt"], r["rejected"], thinking)
        if fits(c, max_length) and fits(j, max_length):
            chosen.append(c)
            rejected.append(j)
        else:
            skipped += 1
    return chosen, rejected, skipped


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


def rank_part(indices: list[int], rank: int, world: int) -> list[int]:
    """This process's contiguous share of a global list (its length is a multiple of world)."""
    share = len(indices) // world
    return indices[rank * share:(rank + 1) * share]


# ----------------------------------------------------------------------------------- losses
class PairLoss:
    """One method's loss on pairs: its data, loss settings and reference, and the passes that
    run it (an estimator's forward/backward over a step's pairs, gradient draws for α*)."""

    def __init__(self, params: Params, data: dict[str, PairSet], pad_id: int, reference=None,
                 preference_weight: float = 1.0, loss_type: str | None = None):
        self.t = params.train
        self.loss_type = loss_type or self.t.loss_type
        self.seed = params.train_seed
        self.data = data
        self.pad_id = pad_id
        self.reference = reference  # only for train.reference = live
        self.betas = {"think": self.t.beta, "nothink": self.t.beta_nothink or self.t.beta}
        self.preference_weight = preference_weight

    def loss(self, model, mode: str, chunk: list[int], autocast=contextlib.nullcontext):
        """Estimator loss (DPO/IPO + NLL) on the pairs `chunk` of `mode`, and token counts."""
        pairs = self.data[mode]
        n = len(chunk)
        chosen, rejected = [pairs.chosen[i] for i in chunk], [pairs.rejected[i] for i in chunk]
        if self.t.max_tokens_per_micro_batch:
            logps, n_tokens = score_pairs_packed(model, chosen, rejected, self.pad_id)
        else:
            logps, n_tokens = score_pairs(model, chosen, rejected, self.pad_id, self.t.shared_prompt)
        if pairs.ref_chosen is not None:
            ref = torch.cat([pairs.ref_chosen[chunk], pairs.ref_rejected[chunk]]).to(logps.device)
        else:
            with torch.no_grad(), autocast():
                ref, _ = score_pairs_packed(self.reference, chosen, rejected, self.pad_id) \
                    if self.t.max_tokens_per_micro_batch else \
                    score_pairs(self.reference, chosen, rejected, self.pad_id, self.t.shared_prompt)
        result = estimator_loss(logps[:n], logps[n:], n_tokens[:n], n_tokens[n:], ref[:n], ref[n:],
                                self.loss_type, self.betas[mode], self.t.label_smoothing, self.t.nll_weight,
                                self.preference_weight)
        if not torch.isfinite(result.loss):
            raise TrainingError(f"non-finite {ESTIMATOR[mode]} loss ({result.loss.item()}); the last good "
                                "checkpoint is kept. Lower train.lr or train.beta, then rerun the stage")
        return result, n_tokens, (logps.detach().float() - ref.float()).abs()

    def update_pass(self, model, mode: str, indices: list[int], denominator: float, accelerator,
                    sync_last: bool, alpha: float | None = None) -> dict[str, float]:
        """Forward/backward of one estimator over this process's `indices` (micro-batched,
        longest first); each micro-batch's mean loss is scaled by its size / `denominator`, so
        that the processes' average (DDP, FSDP) is the mean over the global batch. With `alpha`
        the loss is the estimator's term of the BVPO objective; without, the bare estimator
        (gradient draws). Returns sums over the pairs, for logging."""
        sums = dict.fromkeys(("loss", "dpo", "nll", "chosen_reward", "rejected_reward", "margin", "accuracy",
                              "abs_logratio", "tokens"), 0.0)
        pairs = self.data[mode]
        if self.t.max_tokens_per_micro_batch:
            chunks = pair_rows(pairs.chosen, pairs.rejected, indices, self.t.max_tokens_per_micro_batch)
        else:
            indices = sorted(indices, key=lambda i: -len(pairs.chosen[i].input_ids) - len(pairs.rejected[i].input_ids))
            micro = min(self.t.micro_batch_size, len(indices))
            chunks = [indices[i:i + micro] for i in range(0, len(indices), micro)]
        # FSDP2 must reduce-scatter on every backward (its no_sync keeps unsharded gradients
        # out of .grad); DDP accumulates locally and synchronises once, on the last pass.
        sharded = accelerator.distributed_type.name == "FSDP"
        for c, chunk in enumerate(chunks):
            sync = sharded or (sync_last and c == len(chunks) - 1)
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                result, n_tokens, abs_logratio = self.loss(model, mode, chunk, accelerator.autocast)
                if alpha is None:
                    objective = result.loss
                else:
                    objective = bvpo_loss(result.loss if mode == "think" else None,
                                          result.loss if mode == "nothink" else None, alpha)
                accelerator.backward(objective * (len(chunk) / denominator))
            margins = result.chosen_rewards - result.rejected_rewards
            sums["loss"] += result.loss.item() * len(chunk)
            sums["dpo"] += result.preference.item() * len(chunk)
            sums["nll"] += result.nll.item() * len(chunk)
            sums["chosen_reward"] += result.chosen_rewards.sum().item()
            sums["rejected_reward"] += result.rejected_rewards.sum().item()
            sums["margin"] += margins.sum().item()
            sums["accuracy"] += (margins > 0).float().sum().item()
            sums["abs_logratio"] += abs_logratio.sum().item() / 2  # chosen and rejected: per pair
            sums["tokens"] += n_tokens.sum().item()
        return sums

    def gradient_draws(self, model, mode: str, step: int, grad_vector: GradientVector,
                       accelerator) -> tuple[torch.Tensor, int]:
        """`alpha_draws` independent gradients of one estimator, each the mean over
        `alpha_draw_size` random pairs, and that size. A draw's pairs depend only on (seed,
        mode, step, draw), never on the number of processes: each process computes its share
        of every draw and the synchronised backward completes it, so 1 and N processes see the
        same rows. Returns [alpha_draws, d], identical on every process; leaves .grad zeroed."""
        n = len(self.data[mode])
        size = min(self.t.alpha_draw_size, n)
        size -= size % accelerator.num_processes
        if size < accelerator.num_processes:
            raise TrainingError(f"{ESTIMATOR[mode]} pairs: {n} are too few for a gradient draw on "
                                f"{accelerator.num_processes} processes; sample more pairs or set train.telemetry: "
                                "false and use a fixed alpha")
        rng = random.Random(f"{self.seed}-draws-{mode}-{step}")
        draws = []
        for _ in range(self.t.alpha_draws):
            chunk = rng.sample(range(n), size)
            mine = rank_part(chunk, accelerator.process_index, accelerator.num_processes)
            model.zero_grad(set_to_none=True)
            self.update_pass(model, mode, mine, size / accelerator.num_processes, accelerator, sync_last=True)
            draws.append(grad_vector(synced=True) / loss_scale(accelerator))
        model.zero_grad(set_to_none=True)
        return torch.stack(draws), size


def loss_scale(accelerator) -> float:
    """fp16's GradScaler multiplies the loss, so .grad holds scale × gradient until the step
    unscales it; gradient statistics divide it out (1.0 without a scaler: bf16, fp32)."""
    scaler = getattr(accelerator, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None else 1.0


# ----------------------------------------------------------------------------------- metrics
class MetricLogger:
    """Per-step rows to MLflow from the main process (inside its stage run), in batches;
    every other process logs nothing."""

    def __init__(self, enabled: bool, every: int = 25):
        self.enabled = enabled
        self.every = every
        self.pending: list[dict] = []

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.pending.append(row)
        if len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.enabled and self.pending:
            from . import tracking

            tracking.log_history(self.pending)
            self.pending.clear()


# ----------------------------------------------------------------------------------- checkpoints
def latest_checkpoint(method_dir: Path, fingerprint: str) -> Path | None:
    found = []
    for meta in method_dir.glob("checkpoints/step-*/bvpo_state.json"):
        state = json.loads(meta.read_text())
        if state.get("fingerprint") == fingerprint:
            found.append((state["step"], meta.parent))
    return max(found)[1] if found else None


def save_checkpoint(accelerator, method_dir: Path, name: str, step: int, state: dict) -> None:
    """accelerate's state (model, optimizer, scheduler, RNG) + ours (step, α, history)."""
    target = method_dir / "checkpoints" / f"step-{step:06d}"
    accelerator.save_state(str(target))
    if accelerator.is_main_process:
        (target / "bvpo_state.json").write_text(json.dumps({**state, "step": step}))
        for old in (method_dir / "checkpoints").glob("step-*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    if os.environ.get(KILL_ENV) == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------- one method
def enable_gradient_checkpointing(model) -> int:
    """transformers' activation checkpointing of every decoder layer; returns how many layers it
    checkpoints. Non-reentrant (transformers' default, said here so it cannot drift): a step
    runs several backward passes under DDP's no_sync, and the layers take keyword arguments,
    which the reentrant variant does not replay."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    check_training_support(model, True, False, "cpu")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return sum(isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing for m in model.modules())


@dataclass
class TrainState:
    """Everything one method's training holds; built by `setup`, dropped after `save_final`."""

    name: str
    fingerprint: str
    accelerator: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    grad_vector: GradientVector
    alpha: AlphaState
    start_step: int = 0
    history: list[dict] = field(default_factory=list)
    first_step_done: float | None = None  # perf_counter at the end of this run's first step


def setup(name: str, alpha: float | str, params: Params, base_dir: str, method_dir: Path,
          fingerprint: str) -> TrainState:
    """A fresh Accelerator, the policy, AdamW and the schedule for one method, resumed from its
    latest checkpoint when one matches `fingerprint`. Its own Accelerator means a checkpoint
    holds this method's model and optimizer only, whatever ran before it in the stage."""
    from accelerate import Accelerator

    t = params.train
    accelerator = Accelerator()
    seed = params.train_seed
    torch.manual_seed(seed)
    # fp32 master weights whatever model.dtype says: bf16/fp16 are the autocast's compute dtype
    # (train.mixed_precision), and AdamW's small updates are not lost to bf16 rounding.
    model = load_model(base_dir, "fp32")
    if t.attention != "sdpa":
        model.set_attn_implementation(t.attention)
    if t.gradient_checkpointing:
        layers = enable_gradient_checkpointing(model)
        if accelerator.is_main_process:
            print(f"train {name}: gradient checkpointing, {layers} decoder layers recomputed in the backward",
                  flush=True)
    if t.compile:
        layers = compile_decoder_layers(model, accelerator.device.type)
        if accelerator.is_main_process:
            print(f"train {name}: torch.compile on {layers} decoder layers (the first steps pay the compile)",
                  flush=True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    # Not prepared: accelerate's scheduler wrapper steps once per process per call.
    scheduler = cosine_schedule(optimizer, t.warmup_steps, t.steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    sharded = accelerator.distributed_type.name == "FSDP"
    grad_vector = GradientVector(list(model.parameters() if sharded else accelerator.unwrap_model(model).parameters()),
                                 t.grad_sketch_dim, seed, sharded=sharded)
    auto = alpha == "auto"
    state = TrainState(name, fingerprint, accelerator, model, optimizer, scheduler, grad_vector,
                       AlphaState(t.alpha_init if auto else float(alpha), auto))
    checkpoint = latest_checkpoint(method_dir, fingerprint)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        saved = json.loads((checkpoint / "bvpo_state.json").read_text())
        state.alpha = AlphaState(saved["alpha"], auto, saved["alpha_estimated"])
        state.start_step = saved["step"] + 1
        state.history = saved["history"]
        if accelerator.is_main_process:
            print(f"train {name}: resuming from {checkpoint.name}", flush=True)
    return state


def train_loop(state: TrainState, pair_loss: PairLoss, t: TrainConfig, method_dir: Path, logger: MetricLogger) -> None:
    accelerator, model, optimizer = state.accelerator, state.model, state.optimizer
    world, rank = accelerator.num_processes, accelerator.process_index
    per_process = t.batch_size // world
    for row in state.history:
        logger.log(row)  # a resumed run's MLflow run holds the whole curve, not just the tail
    bar = tqdm(range(state.start_step, t.steps), desc=f"train {state.name}", unit="step",
               disable=not accelerator.is_main_process, initial=state.start_step, total=t.steps)
    for step in bar:
        row: dict[str, float] = {"step": step}
        if (state.alpha.auto or t.telemetry) and step % t.alpha_every == 0:
            trace, trace_size = pair_loss.gradient_draws(model, "think", step, state.grad_vector, accelerator)
            empty, empty_size = pair_loss.gradient_draws(model, "nothink", step, state.grad_vector, accelerator)
        if (state.alpha.auto or t.telemetry) and step % t.alpha_every == 0 and not (
                torch.isfinite(trace).all() and torch.isfinite(empty).all()):
            row["grad/estimate_skipped"] = 1.0  # an fp16 draw overflowed: α keeps its value until the next one
        elif (state.alpha.auto or t.telemetry) and step % t.alpha_every == 0:
            stats = gradient_statistics(trace, empty)
            state.alpha, logged = update_alpha(
                state.alpha, {**stats, "think_draw_size": trace_size, "nothink_draw_size": empty_size}, t)
            var_mixed = mixed_variance(trace, empty, state.alpha.alpha)
            row.update({f"grad/{k}": v for k, v in stats.items()})
            row.update(logged)
            row["grad/var_mixed"] = var_mixed
            row["grad/var_ratio_mixed_to_think"] = var_mixed / max(stats["var_think"], 1e-30)
            row["alpha_sq"] = state.alpha.alpha ** 2
        alpha = state.alpha.alpha

        active = [mode for mode, weight in (("think", alpha), ("nothink", 1 - alpha)) if weight > 0]
        optimizer.zero_grad(set_to_none=True)
        loss_total, trace_vector = 0.0, None
        for k, mode in enumerate(active):
            mine = rank_part(step_indices(len(pair_loss.data[mode]), step, t.batch_size, pair_loss.seed, mode),
                             rank, world)
            last = k == len(active) - 1
            sums = pair_loss.update_pass(model, mode, mine, per_process, accelerator, sync_last=last, alpha=alpha)
            if t.telemetry and len(active) == 2 and mode == "think":
                # The step's own g_t: .grad now holds α·g_t (DDP: each process's part, unsynced).
                trace_vector = state.grad_vector(synced=False) / (alpha * loss_scale(accelerator))
            totals = accelerator.reduce(torch.tensor(list(sums.values()), device=accelerator.device), "sum")
            for key, value in zip(sums, (totals / t.batch_size).tolist()):
                row[f"{mode}/{key if key != 'tokens' else 'tokens_per_pair'}"] = value
            loss_total += (alpha if mode == "think" else 1 - alpha) * row[f"{mode}/loss"]
        if trace_vector is not None:
            # ‖g_t‖, ‖g_e‖, cos(g_t, g_e) from ⟨G, G⟩ and ⟨G, g_t⟩ of the mixed G = α·g_t + (1−α)·g_e,
            # so no second parameter-sized vector is built.
            scale = loss_scale(accelerator)
            mixed_sq, mixed_dot_trace = state.grad_vector.dot_current(trace_vector)
            mixed_sq, mixed_dot_trace = mixed_sq / scale**2, mixed_dot_trace / scale
            trace_sq = (trace_vector @ trace_vector).item()
            empty_dot_trace = (mixed_dot_trace - alpha * trace_sq) / (1 - alpha)
            empty_sq = max((mixed_sq - 2 * alpha * mixed_dot_trace + alpha**2 * trace_sq) / (1 - alpha) ** 2, 0.0)
            row["grad/step_norm_think"] = trace_sq ** 0.5
            row["grad/step_norm_nothink"] = empty_sq ** 0.5
            row["grad/step_cos_think_nothink"] = empty_dot_trace / max((trace_sq * empty_sq) ** 0.5, 1e-30)
        row["loss"] = loss_total
        # Under fp16 this first unscales .grad (accelerate's GradScaler), so the norm is the true one.
        row["grad_norm"] = float(accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm))
        if not torch.isfinite(torch.tensor(row["grad_norm"])) and accelerator.scaler is None:
            raise TrainingError(f"non-finite gradient norm at step {step} of {state.name}; the last good "
                                "checkpoint is kept. Lower train.lr or train.beta, then rerun the stage")
        row["lr"] = state.scheduler.get_last_lr()[0]  # the rate this step's update uses
        optimizer.step()
        if accelerator.optimizer_step_was_skipped:
            # fp16 overflow: the GradScaler skipped the update and lowered its scale; the schedule
            # waits too (as in transformers' Trainer), so the run makes `steps − skipped` updates.
            row["overflow_skipped"] = 1.0
            row["grad_norm"] = float("nan")
        else:
            state.scheduler.step()
        row["alpha"] = alpha
        state.history.append(row)
        if state.first_step_done is None:
            state.first_step_done = time.perf_counter()
        if accelerator.is_main_process:
            bar.set_postfix(loss=f"{loss_total:.3f}", alpha=f"{alpha:.2f}")
        logger.log(row)
        if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0 and step + 1 < t.steps:
            save_checkpoint(accelerator, method_dir, state.name, step, {
                "fingerprint": state.fingerprint, "alpha": state.alpha.alpha,
                "alpha_estimated": state.alpha.estimated, "history": state.history})


def save_final(state: TrainState, method_dir: Path, tokenizer, summary: dict, precision: str = "fp32") -> None:
    """The trained model (its fp32 master weights cast to the storage `dtype`), tokenizer,
    summary and history, moved into place in one rename; the method's checkpoints are then removed.
    `precision`: the storage precision (`model.dtype` resolved)."""
    accelerator = state.accelerator
    accelerator.wait_for_everyone()
    # Under FSDP the full weights exist only once gathered; elsewhere the model has them.
    state_dict = accelerator.get_state_dict(state.model) if accelerator.distributed_type.name == "FSDP" else None
    if accelerator.is_main_process:
        tmp = method_dir / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model = accelerator.unwrap_model(state.model)
        if precision != "fp32":  # the training run ends here: its masters can be cast in place
            dtype = TORCH_DTYPES[precision]
            if state_dict is None:
                model.to(dtype)
            else:
                state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if precision != "fp32" and state_dict is not None:
            # save_pretrained writes the unwrapped model's dtype (FSDP: fp32 shards) into
            # config.json; the weights it wrote are `precision`, so the config must say so.
            model.config.dtype = TORCH_DTYPES[precision]
            model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "train_summary.json").write_text(json.dumps(
            {**summary, "final_alpha": state.alpha.alpha, "final": state.history[-1]}, indent=2) + "\n")
        (tmp / "history.json").write_text(json.dumps({"fingerprint": state.fingerprint, "history": state.history}))
        shutil.rmtree(method_dir / "final", ignore_errors=True)
        os.replace(tmp, method_dir / "final")
        shutil.rmtree(method_dir / "checkpoints", ignore_errors=True)
    accelerator.wait_for_everyone()


def finished_history(method_dir: Path, fingerprint: str) -> list[dict] | None:
    """The history of a method an earlier, interrupted run of the stage already finished."""
    path = method_dir / "final" / "history.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["fingerprint"] == fingerprint:
            return saved["history"]
    return None


def train_method(name: str, alpha: float | str, params: Params, base_dir: str, pair_loss: PairLoss,
                 tokenizer, work_dir: Path, fingerprint: str, logger: MetricLogger | None = None) -> list[dict]:
    """setup → train_loop → save_final for one method; its model and optimizer are freed after."""
    logger = logger or MetricLogger(enabled=False)
    method_dir = work_dir / name
    history = finished_history(method_dir, fingerprint)
    if history is not None:
        if os.environ.get("RANK", "0") == "0":
            print(f"train {name}: already trained in an earlier, interrupted run; reusing it", flush=True)
        for row in history:
            logger.log(row)
        return history
    state = setup(name, alpha, params, base_dir, method_dir, fingerprint)
    on_cuda = state.accelerator.device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(state.accelerator.device)
    started = time.perf_counter()
    with sdpa_in_fp32(state.accelerator.unwrap_model(state.model), cpu_bf16(state.accelerator)):
        train_loop(state, pair_loss, params.train, method_dir, logger)
    # Timings and memory go beside the checkpoints (RUN_FACTS), not into the saved model: a
    # retrained model is then byte-identical, and so is its DVC hash.
    ended = time.perf_counter()
    facts = {"seconds_this_run": ended - started, "steps_this_run": params.train.steps - state.start_step}
    if state.first_step_done is not None and facts["steps_this_run"] > 1:
        # The steady rate: the first step pays allocation and, with train.compile, the compile.
        facts["seconds_after_first_step"] = ended - state.first_step_done
    if on_cuda:  # this process's peak while training (model, optimizer, activations), for sizing runs
        facts["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(state.accelerator.device) / 2**30
    if state.accelerator.is_main_process:
        method_dir.mkdir(parents=True, exist_ok=True)
        (method_dir / RUN_FACTS).write_text(json.dumps(facts) + "\n")
    summary = {"method": name, "alpha": alpha, "steps": params.train.steps}
    save_final(state, method_dir, tokenizer, summary, resolve_dtype(params.model.dtype, state.accelerator.device))
    history = state.history
    state.accelerator.free_memory()
    del state
    gc.collect()
    return history


def write_history_csv(history: list[dict], path: Path) -> None:
    import csv

    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "step", k))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


# ----------------------------------------------------------------------------------- main
def accelerate_command(params: Params, module_args: list[str],
                       threads_per_process: int | None = None) -> tuple[list[str], dict[str, str]]:
    """The train stage's launch: `train.num_processes`, `train.accelerate_config`, `train.mixed_precision`."""
    from .modeling import pick_device, resolve_precision
    from .runtime import launch_command

    t = params.train
    return launch_command("bvpo.train", module_args, t.num_processes, t.accelerate_config,
                          resolve_precision(t.mixed_precision, pick_device()), threads_per_process)


def check_launch(accelerator, attention: str = "sdpa", packed: bool = False,
                 gradient_checkpointing: bool = False, compile_layers: bool = False) -> None:
    """Refuse set-ups that would silently train something other than the BVPO objective, or do
    the same work twice."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise TrainingError(f"{launched} processes were launched but accelerate sees {accelerator.num_processes}: "
                            "each would train alone. On a CPU-only machine set ACCELERATE_USE_CPU=true")
    kind = accelerator.distributed_type.name
    if attention == "flex_attention" and accelerator.device.type == "cpu":
        raise TrainingError("train.attention flex_attention needs a GPU: torch has no FlexAttention backward on a "
                            "CPU. Use sdpa here (packing still works with it)")
    if packed and kind == "FSDP":
        raise TrainingError("train.max_tokens_per_micro_batch with FSDP: each process packs its own pairs into "
                            "as many rows as they need, but FSDP's forward and backward passes are collective, so "
                            "processes with fewer rows would leave the others waiting. Use DDP with packing, or "
                            "FSDP with train.micro_batch_size")
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if gradient_checkpointing and kind == "FSDP" and getattr(plugin, "activation_checkpointing", False):
        # config.py refuses it in the config file; this catches the environment and default configs.
        raise TrainingError("train.gradient_checkpointing with FSDP's own activation checkpointing (the accelerate "
                            "config's fsdp_activation_checkpointing, or FSDP_ACTIVATION_CHECKPOINTING in the "
                            "environment) would recompute every layer twice: set train.gradient_checkpointing: "
                            "false, or turn FSDP's off")
    dynamo = getattr(getattr(accelerator, "state", None), "dynamo_plugin", None)
    if compile_layers and str(getattr(dynamo, "backend", "NO")).split(".")[-1].upper() != "NO":
        raise TrainingError("train.compile with accelerate's own compilation (the accelerate config's dynamo_config, "
                            "or ACCELERATE_DYNAMO_BACKEND in the environment) would compile the model twice: set "
                            "train.compile: false, or turn accelerate's off")
    if compile_layers and kind == "FSDP":
        # FSDP's activation checkpointing would wrap the already compiled layers, the order
        # accelerate itself avoids (compile after checkpointing); not run on a GPU here.
        raise TrainingError("train.compile with FSDP is not supported: use DDP with it, or FSDP without it")
    if str(accelerator.mixed_precision) == "fp16" and accelerator.scaler is None:
        raise TrainingError("train.mixed_precision fp16 needs a GPU: on a CPU accelerate runs it without autocast "
                            "or loss scaling (no GradScaler), i.e. silently in fp32. Use bf16 (or auto) or fp32 here")
    if kind == "DEEPSPEED":
        raise TrainingError("DeepSpeed is not supported: its engine steps the optimizer on every backward, but a "
                            "BVPO step runs several (two estimators, micro-batches, gradient draws) and clips the "
                            "mixed gradient itself. Use DDP or FSDP (configs/fsdp.yaml) instead")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and kind != "FSDP":
        raise TrainingError(f"an FSDP config was given but accelerate runs {kind}: accelerate enables FSDP only on "
                            "GPU-class devices, so on this machine every process would hold the whole model. "
                            "Drop train.accelerate_config to train with DDP")


def needed_modes(t: TrainConfig) -> dict[str, str]:
    """Which pair sets must be non-empty, and for what (a method's weight, auto α, telemetry)."""
    needed = {}
    for name, method in t.methods.items():
        if method.alpha == "auto":
            needed.update(think=f"train.methods.{name} (alpha: auto)", nothink=f"train.methods.{name} (alpha: auto)")
        else:
            if method.alpha > 0:
                needed.setdefault("think", f"train.methods.{name} (alpha: {method.alpha})")
            if method.alpha < 1:
                needed.setdefault("nothink", f"train.methods.{name} (alpha: {method.alpha})")
    if t.telemetry:
        needed.setdefault("think", "train.telemetry (set it to false to train without gradient statistics)")
        needed.setdefault("nothink", "train.telemetry (set it to false to train without gradient statistics)")
    return needed


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python -m bvpo.train", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--pairs", required=True, help="pairs stage output (think/ and nothink/)")
    parser.add_argument("--base", required=True, help="starting policy and reference model")
    parser.add_argument("--work", required=True, help="checkpoints and finished models, one folder per method")
    parser.add_argument("--cache", required=True, help="folder for cached reference log-probs")
    parser.add_argument("--project-dir", default=".", help="where the MLflow store lives")
    return parser.parse_args(argv)


@dataclass
class SharedSetup:
    """What every method trains on: the encoded pairs with their reference log-probs."""

    tokenizer: object
    data: dict[str, PairSet]
    skipped: dict[str, int]
    reference: torch.nn.Module | None  # train.reference = live only
    pairs_digest: str
    base_digest: str
    precision: str  # the autocast `mixed_precision: auto` resolved to


def setup_pairs(args, params: Params, accelerator) -> SharedSetup:
    """Encode every pair that fits its mode's length limit (skipping and counting the rest), then
    reference log-probs once per (pairs, model, code): precomputed and cached, or a live model."""
    t = params.train
    tokenizer = load_tokenizer(args.base)
    rows = load_pair_rows(Path(args.pairs))
    encoded, skipped = {}, {}
    for mode in MODES:
        limit = params.model.max_length_for(mode == "think")
        limit_name = "model.max_length" if mode == "think" or params.model.max_length_nothink is None \
            else "model.max_length_nothink"
        chosen, rejected, skipped[mode] = encode_pairs(tokenizer, rows[mode], mode == "think", limit)
        encoded[mode] = (chosen, rejected)
        if rows[mode] and skipped[mode] / len(rows[mode]) > t.max_skipped_fraction:
            raise TrainingError(f"{args.pairs}/{mode}: {skipped[mode]} of {len(rows[mode])} pairs do not fit "
                                f"{limit_name}={limit} tokens (prompt + completion); more than "
                                f"train.max_skipped_fraction={t.max_skipped_fraction}. Raise {limit_name} "
                                "or lower sample.max_new_tokens")
        if skipped[mode] and accelerator.is_main_process:
            print(f"train: skipped {skipped[mode]} of {len(rows[mode])} {mode} pairs longer than {limit_name}="
                  f"{limit}", flush=True)
    for mode, reason in needed_modes(t).items():
        if not encoded[mode][0]:
            raise TrainingError(f"{args.pairs}/{mode}: no usable {ESTIMATOR[mode]} pairs, but {reason} needs them. "
                                "Every prompt's samples tied or were invalid (or too long): sample more (sample.k) "
                                "or from more prompts")
    pairs_digest, base_digest = files_digest(Path(args.pairs)), model_digest(args.base)
    reference = None
    if t.reference == "live":
        reference = load_reference_model(args.base, accelerator, t.attention, t.compile)
        data = {mode: PairSet(c, r, None, None) for mode, (c, r) in encoded.items()}
    else:
        logps = precomputed_reference(cache_file(Path(args.cache), pairs_digest, base_digest, params, accelerator),
                                      lambda: load_reference_model(args.base, accelerator, t.attention, t.compile),
                                      encoded, tokenizer.pad_token_id, accelerator, t.shared_prompt,
                                      t.max_tokens_per_micro_batch)
        data = {mode: PairSet(c, r, *logps[mode]) for mode, (c, r) in encoded.items()}
    precision = {"no": "fp32"}.get(str(accelerator.mixed_precision), str(accelerator.mixed_precision))
    return SharedSetup(tokenizer, data, skipped, reference, pairs_digest, base_digest, precision)


def method_fingerprint(name: str, method, params: Params, shared: SharedSetup) -> str:
    """Everything that decides a method's weights: a checkpoint made with other settings, pairs or
    base model is never resumed, nor a finished method reused."""
    # Settings that change how the work is spread or memory is spent, not the weights, stay out,
    # so a run resumes after changing them (more processes, checkpointing after running out of memory,
    # compiled layers: these round differently, as more processes do, but train the same objective).
    train_config = {k: v for k, v in params.to_dict()["train"].items()
                    if k not in ("methods", "num_processes", "gradient_checkpointing", "compile")}
    return hashlib.sha256(json.dumps(
        [name, method.alpha, method.preference_weight, method.loss_type, train_config, params.seed, params.model.max_length,
         params.model.max_length_nothink, params.model.dtype, shared.pairs_digest, shared.base_digest,
         shared.precision, code_digest(TRAINING_MODULES)], sort_keys=True, default=str).encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    """Parse, set up the pairs every method shares, then per method: setup → train → save, each
    in its own MLflow child run; a method an interrupted run already finished is reused."""
    from accelerate import Accelerator

    from . import tracking

    args = parse_args(argv)
    params = load_params(args.params)
    accelerator = Accelerator()  # for the shared setup; each method gets its own in `setup`
    check_launch(accelerator, params.train.attention, params.train.max_tokens_per_micro_batch is not None,
                 params.train.gradient_checkpointing, params.train.compile)
    shared = setup_pairs(args, params, accelerator)
    main_process, work_dir = accelerator.is_main_process, Path(args.work)
    train_config = {k: v for k, v in params.to_dict()["train"].items() if k not in ("methods", "num_processes")}
    for name, method in params.train.methods.items():
        pair_loss = PairLoss(params, shared.data, shared.tokenizer.pad_token_id, shared.reference,
                             method.preference_weight, method.loss_type)
        run = tracking.stage_run(args.project_dir, params.tracking.experiment, f"train/{name}",
                                 params={**train_config, "method": name, "alpha": method.alpha,
                                         "preference_weight": method.preference_weight,
                                         "loss_type": pair_loss.loss_type},
                                 tags={"method": name, "mixed_precision": shared.precision}) \
            if main_process else contextlib.nullcontext()
        with run:
            logger = MetricLogger(enabled=main_process)
            if main_process:
                tracking.log_metrics({f"{mode}/skipped_too_long": n for mode, n in shared.skipped.items()})
            history = train_method(name, method.alpha, params, args.base, pair_loss, shared.tokenizer, work_dir,
                                   method_fingerprint(name, method, params, shared), logger)
            logger.flush()
            facts = work_dir / name / RUN_FACTS
            if main_process and facts.is_file():  # absent for a method reused from an interrupted run
                tracking.log_metrics(json.loads(facts.read_text()))
                record_run_facts(Path(args.project_dir).resolve(), f"train-{name}", json.loads(facts.read_text()))
        if main_process:
            write_history_csv(history, work_dir / name / "final" / "history.csv")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BvpoError, ValueError) as err:
        print(f"bvpo train: error: {err}", file=sys.stderr)
        sys.exit(2)
