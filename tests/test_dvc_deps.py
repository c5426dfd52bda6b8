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
