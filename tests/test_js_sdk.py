"""The JavaScript SDK (``bitchat/web/static/bitchat.js``): its ``node --test`` suite in
``js/`` against a real server subprocess, run from here so ``pytest -q`` covers it.

Needs Node.js 20+ and ``js/node_modules`` (``npm ci`` in ``js/``, done here when it is
missing). Without node the test skips, except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import WAIT

JS = Path(__file__).resolve().parent.parent / "js"
RUN_TIMEOUT = 24 * WAIT  # a few server starts and one restart, with their cold imports


def _tool(name: str) -> str:
    """The tool's path, or skip (fail under CI=true) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed: the JavaScript SDK tests need Node.js 20+"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: they must not be skipped)")
        pytest.skip(reason)
    return path


@pytest.mark.timeout(3 * RUN_TIMEOUT)
def test_js_sdk_node_suite() -> None:
    node = _tool("node")
    if not (JS / "node_modules" / "ws").is_dir():
        npm = _tool("npm")
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=JS, check=True, timeout=RUN_TIMEOUT
        )
    env = {**os.environ, "BITCHAT_TEST_PYTHON": sys.executable}
    run = subprocess.run(
        [node, "--test"],
        cwd=JS,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    # Every test ran and passed: a suite that found no tests must not pass here.
    passed = re.search(r"^# pass (\d+)$", out, re.MULTILINE)
    assert passed and int(passed.group(1)) >= 21, out
    assert re.search(r"^# fail 0$", out, re.MULTILINE), out
    assert not re.search(r"^# (cancelled|skipped|todo) [1-9]", out, re.MULTILINE), out
