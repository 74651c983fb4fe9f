"""The README's IM library example runs, and prints what the README says."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from im_helpers import im_server, port_of

README = Path(__file__).resolve().parent.parent / "README.md"


def _example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("### The same from Python", 1)
    if len(section) != 2:
        pytest.skip("the README has no IM library example")
    match = re.search(r"```python\n(.*?)```", section[1], re.S)
    assert match is not None
    return match.group(1)


async def test_readme_im_example(tmp_path: Path, capsys: Any) -> None:
    code = _example().replace("asyncio.run(main())", "")
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)
    async with im_server(tmp_path) as server:
        # The example's IMClients use the default Settings: no test timers needed.
        await namespace["main"]("127.0.0.1", port_of(server))
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "['houyi(1)', 'gris(2)']",
        "gris(2): hello,houyi True",
        "hi all",
        "['hello,houyi']",
    ]
    after = README.read_text(encoding="utf-8").split("### The same from Python", 1)[1]
    for line in out:
        assert f"`{line}`" in after, line
