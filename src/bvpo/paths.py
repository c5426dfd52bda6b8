"""Where the pipeline's files live, and how they are written: atomically.

`PATHS` is the one list of the project's data and metrics locations, relative to the project
root (dvc.yaml names the same paths). Every output is written under a temporary name and moved
into place at the end (`atomic_path`), so a failed stage leaves nothing that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from .errors import BvpoError

PATHS = {
    "prompts": "data/prompts",
    "base_model": "data/base_model",
    "reward_model": "data/reward_model",
    "reward_model_metrics": "metrics/reward_model.json",
    "champion": "data/champion.json",
    "policy": "data/policy",
    "inbox": "data/incoming",
    "samples": "data/samples",
    "pairs": "data/pairs",
    "models": "data/models",
    "eval": "metrics/eval.json",
    "eval_plot": "metrics/eval.png",
    "eval_prompts": "data/eval_prompts.json",
    "diagnostics": "metrics/diagnostics.json",
    "train_plots": "metrics/train",
    "checkpoints": "data/checkpoints",
    "cache": "data/cache",
    "run_facts": "data/cache/run_facts",
    "experiment_rounds": "data/experiment_rounds",
}


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces `final`, on failure it vanishes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        elif final.exists() or final.is_symlink():
            final.unlink()
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def record_run_facts(root: Path, name: str, facts: dict) -> Path:
    """Facts of this run that are not results (wall times, peak memory): under data/cache, never
    inside a DVC output, so rebuilding a stage gives the same output hashes. MLflow has them too."""
    path = root / PATHS["run_facts"] / f"{name}.json"
    with atomic_path(path) as tmp:
        write_json(tmp, facts)
    return path


def write_json(path: Path, obj) -> None:
    """Sorted, indented JSON with a final newline (what metrics files and DVC diffs read best)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def project_root(p: Path | str | None) -> Path:
    """The project folder, absolute (the current directory when none is given)."""
    return Path(p or ".").resolve()


# ----------------------------------------------------------------------------- champion pointer
class ChampionPointerError(BvpoError, ValueError):
    """data/champion.json is not a champion pointer."""


def read_champion_pointer(root: Path) -> dict:
    """data/champion.json: which registered version this round starts from (version null = the
    base model). The flow writes it from the registry's `@champion` before the stages run; it is
    an input of the pipeline, never an output, so rounds make no dependency cycle."""
    path = root / PATHS["champion"]
    if not path.is_file():
        return {"registered_model": None, "version": None}
    try:
        pointer = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ChampionPointerError(f"{path}: not valid JSON ({err.msg}); expected "
                         '{"registered_model": "<name>", "version": "<n>" or null}') from None
    if not isinstance(pointer, dict) or "version" not in pointer or (
            pointer["version"] is not None and not pointer.get("registered_model")):
        raise ChampionPointerError(f"{path}: expected {{\"registered_model\": \"<name>\", \"version\": \"<n>\" or null}}, "
                         f"got {pointer!r}")
    return pointer


def write_champion_pointer(root: Path, registered_model: str, version: str | None) -> None:
    """data/champion.json, rewritten only when it changes, so DVC sees an unchanged round as unchanged."""
    path = root / PATHS["champion"]
    text = json.dumps({"registered_model": registered_model, "version": version}, indent=2, sort_keys=True) + "\n"
    if not path.is_file() or path.read_text() != text:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
