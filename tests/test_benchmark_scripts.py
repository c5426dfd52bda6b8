"""The benchmark scripts under benchmarks/ run only by hand (and on GPU machines, in one short
call each), never in CI: a syntax error or a clashing option there would cost a device call.
Each parses its options and exits cleanly on --help; the shell scripts parse as bash."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_each_benchmark_script_answers_help(script):
    shown = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0, f"{script} --help: {shown.stderr[-800:]}"
    assert "usage:" in shown.stdout


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.sh")))
def test_each_benchmark_shell_script_parses(script):
    parsed = subprocess.run(["bash", "-n", str(BENCHMARKS / script)], capture_output=True, text=True)
    assert parsed.returncode == 0, f"{script}: {parsed.stderr}"
