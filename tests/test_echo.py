"""examples/echo.py, the 25-line custom service, runs as a reader would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "echo.py"


def test_echo_example_runs_on_a_free_port() -> None:
    # A fresh interpreter: the example declares packet types 1000 and 1001 in the
    # default registry, which this test process leaves to other tests.
    code = (
        "import asyncio, runpy, sys\n"
        f"ns = runpy.run_path({str(EXAMPLE)!r})\n"
        "print('returned', asyncio.run(ns['main'](0)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["HELLO, BITCHAT", "returned HELLO, BITCHAT"]


def test_echo_example_is_short() -> None:
    lines = [line for line in EXAMPLE.read_text().splitlines() if line.strip()]
    assert len(lines) <= 30
