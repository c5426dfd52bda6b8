"""The Makefile's targets, as `make -n` prints them: what a user's `make <target>` would run."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _make_n(target: str) -> str:
    # Run under `make test`, the parent make's flags and variable overrides would reach the child.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    printed = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=ROOT, env=env, capture_output=True,
                             text=True)
    assert printed.returncode == 0, f"make -n {target}: {printed.stderr}"
    return printed.stdout


def _phony_targets() -> list[str]:
    text = (ROOT / "Makefile").read_text()
    return next(line for line in text.splitlines() if line.startswith(".PHONY:")).split(":", 1)[1].split()


@pytest.mark.parametrize("target", _phony_targets())
def test_every_make_target_prints_valid_shell(target):
    """What `make -n` prints for each documented target parses as bash: a recipe that expands to
    broken shell fails only when a user runs it."""
    parsed = subprocess.run(["bash", "-n", "-c", _make_n(target)], capture_output=True, text=True)
    assert parsed.returncode == 0, f"make {target} prints broken shell: {parsed.stderr}"


@pytest.mark.parametrize("target", ["bench-trl", "gpu-kit"])
def test_the_bench_targets_install_the_bench_extra(target):
    """Both install the `test` and `bench` extras together (a comma inside make's $(call ...) once
    split them, and the shell got half a quote)."""
    install = [line for line in _make_n(target).splitlines() if "uv pip install" in line][-1]  # after any venv set-up
    assert install.count("-e '.[test,bench]'") == 2  # uv's command and pip's fallback
