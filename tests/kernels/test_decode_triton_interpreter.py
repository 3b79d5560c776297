"""Runs interpret_*cases.py (the Triton kernels on the CPU) in their own pytest process.

TRITON_INTERPRET must be set before triton is imported, so the interpreter cases
get a fresh process with it set; the rest of the suite is not affected.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
CASES = [
    HERE / "interpret_cases.py",
    HERE / "interpret_multi_cases.py",
    HERE.parent / "model" / "interpret_fused_cases.py",  # the model's fused GPU path
    HERE.parent / "connector" / "interpret_relayout_cases.py",  # one-launch relayout
]


def test_triton_kernel_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *map(str, CASES)]
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=480, cwd=HERE.parents[1]
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], tail
