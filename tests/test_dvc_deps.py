"""dvc.yaml's deps are honest: each stage lists every module of src/bvpo that its command
imports, directly or through another module, so editing one reruns exactly the stages it can
change. The closure is computed from the code (ast), not listed by hand."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "bvpo"


def module_imports(node: ast.AST) -> set[str]:
    """bvpo modules imported anywhere under `node` (relative or absolute imports), plus modules
    run as `-m bvpo.X` (a stage that launches a subprocess runs that module's code too)."""
    found = set()
    for child in ast.walk(node):
        if isinstance(child, ast.ImportFrom):
            if child.level == 1 and child.module:
                found.add(child.module.split(".")[0])
            elif child.level == 1:
                found.update(alias.name for alias in child.names)
            elif child.module and child.module.startswith("bvpo."):
                found.add(child.module.split(".")[1])
        elif isinstance(child, ast.Import):
            found.update(a.name.split(".")[1] for a in child.names if a.name.startswith("bvpo."))
        elif isinstance(child, ast.Constant) and isinstance(child.value, str) and child.value.startswith("bvpo."):
            found.add(child.value.split(".")[1])
    return {m for m in found if (PACKAGE / f"{m}.py").is_file()}


def closure(start: set[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(module_imports(ast.parse((PACKAGE / f"{name}.py").read_text())) - seen)
    return seen


def stage_closure(stage: str) -> set[str]:
    """What `bvpo stage NAME` runs: stages.py's top level, the stage function and the
    stages.py helpers it calls, and everything those import."""
    tree = ast.parse((PACKAGE / "stages.py").read_text())
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    used, todo = set(), [stage]
    while todo:
        name = todo.pop()
        if name in used:
            continue
        used.add(name)
        calls = {c.func.id for c in ast.walk(functions[name]) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
        todo.extend(calls & set(functions))
    start = set().union(*(module_imports(n) for n in top_level))
    start |= set().union(*(module_imports(functions[n]) for n in used))
    # stages.py itself is not expanded whole: its other stage functions' imports are not run.
    return {"stages"} | closure(start - {"stages"})


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_the_code_it_imports(stage):
    deps = {d if isinstance(d, str) else next(iter(d)) for d in STAGES[stage]["deps"]}
    listed = {Path(d).stem for d in deps if d.startswith("src/bvpo/")}
    missing = stage_closure(stage) - listed
    assert not missing, f"dvc.yaml stage {stage!r} imports {sorted(missing)} but does not list them in deps"


def test_the_closure_sees_lazy_and_subprocess_imports():
    train = stage_closure("train")
    assert {"train", "gradients", "alpha", "tracking", "plots"} <= train  # -m bvpo.train, lazy imports
    assert "train" not in stage_closure("evaluate") and "warmup" not in stage_closure("prepare")


# ----------------------------------------------------------------------------- params
# Params read through a property or method stand for the fields behind them.
DERIVED = {"sample_seed": {"seed", "sample.seed"}, "train_seed": {"seed", "train.seed"},
           "model.max_length_for": {"model.max_length", "model.max_length_nothink"},
           "ranking_reward_model": {"data.task", "pairs.reward_model"},
           "judging_reward_model": {"data.task", "pairs.reward_model", "evaluate.win_rate_reward_model"}}
# Where a stage's runs are logged, and which servers it talks to, never change its outputs.
NOT_INPUTS = {"tracking", "stack", "to_dict"}


def params_reads(function: ast.FunctionDef) -> set[str]:
    """`params.section` / `params.section.field` read in `function` (outermost chains only)."""
    inner = {id(n.value) for n in ast.walk(function) if isinstance(n, ast.Attribute)}
    found = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            parts, base = [], node
            while isinstance(base, ast.Attribute):
                parts.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id == "params":
                chain = ".".join(list(reversed(parts))[:2])
                found |= DERIVED.get(chain, {chain})
    return found


def stage_params_reads(stage: str) -> set[str]:
    """Every params field the stage reads: its function in stages.py and, transitively, every
    function of its modules that it hands `params` to (plus the `main` of a module it launches
    with `-m`, which loads the same params file). config.py (loading, validation) is left out."""
    functions: dict[str, list[tuple[str, ast.FunctionDef]]] = {}
    for module in stage_closure(stage) - {"config"}:
        for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
            if isinstance(node, ast.FunctionDef):
                functions.setdefault(node.name, []).append((module, node))
    entry = [f for m, f in functions[stage] if m == "stages"]
    launched = {m for m, f in functions.get("main", []) if f"bvpo.{m}" in ast.unparse(entry[0])}
    todo = entry + [f for m, f in functions.get("main", []) if m in launched]
    seen, reads = set(), set()
    while todo:
        function = todo.pop()
        if id(function) in seen:
            continue
        seen.add(id(function))
        reads |= params_reads(function)
        for call in ast.walk(function):
            if isinstance(call, ast.Call) and any(isinstance(a, ast.Name) and a.id == "params"
                                                  for a in [*call.args, *(k.value for k in call.keywords)]):
                name = call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", None)
                todo.extend(f for _, f in functions.get(name, []))
    return reads


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_params_cover_what_it_reads(stage):
    listed = set(STAGES[stage].get("params", []))
    missing = {chain for chain in stage_params_reads(stage) if chain not in listed
               and chain.split(".")[0] not in listed and chain.split(".")[0] not in NOT_INPUTS}
    assert not missing, f"dvc.yaml stage {stage!r} reads params {sorted(missing)} but does not list them"


def test_the_params_scan_follows_params_into_other_modules():
    assert {"model.dtype", "pairs.reward_batch_size"} <= stage_params_reads("pairs")  # rewards.reward_model
    assert {"seed", "sample.seed", "sample.k"} <= stage_params_reads("sample")  # sampling.main, -m bvpo.sampling
    assert "seed" in stage_params_reads("evaluate")  # evaluation.score_prompts' sampling seed


# Modules that cannot change a log-prob or a trained weight: messages, names, locations, process
# settings, logging. config and data reach the training fingerprint as what they produce (the
# params' values, the pairs' and base model's file digests), not as code.
FINGERPRINT_EXEMPT = {"errors", "modes", "paths", "runtime", "tracking", "config", "data"}


@pytest.mark.parametrize("owner, start", [("reference.SCORING_MODULES", {"sequences", "packing", "losses", "reference"}),
                                          ("train.TRAINING_MODULES", {"train"})])
def test_code_fingerprints_name_all_the_code_they_stand_for(owner, start):
    """The reference cache key and the training fingerprint hash the files they name: a module
    their code imports but they leave out (as chat.py once was) would let an edit there reuse
    reference log-probs or a finished method computed by the old code."""
    import importlib

    module, name = owner.split(".")
    listed = {f.removesuffix(".py") for f in getattr(importlib.import_module(f"bvpo.{module}"), name)}
    missing = closure(start | listed) - listed - FINGERPRINT_EXEMPT
    assert not missing, f"{owner} leaves out {sorted(missing)}, which its code imports"
