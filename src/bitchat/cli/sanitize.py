"""What the terminal client prints of text it did not write itself.

A name, a group name, a message or an error message comes from the server, and
through it from any other user. Printed raw, ``ESC [2J`` would clear the
reader's screen, ``ESC ]0;...BEL`` retitle the terminal, a newline forge a line
that looks like another message or a prompt, and a bidi override reorder the
line as displayed. :func:`visible` is the one sanitizer: every line the CLI
prints passes through it, and no character below is ever written as such.

Shown as Python-style escapes, in plain ASCII so any terminal and font shows
them: ``\\n``, ``\\r``, ``\\t``, else ``\\xNN`` (``ESC`` is the four characters
``\\x1b``) or ``\\uNNNN``. Escaped are:

- the C0 controls U+0000-U+001F, DEL U+007F and the C1 controls U+0080-U+009F;
- the bidi controls U+061C, U+200E, U+200F, U+202A-U+202E and U+2066-U+2069;
- the line and paragraph separators U+2028 and U+2029;
- lone surrogates (U+D800-U+DFFF), which no terminal can be sent.

Everything else is printed as it is, zero-width joiners of emoji and CJK
spaces included. The escapes are printable, so :func:`visible` is idempotent.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str) -> str:
    """``text`` with every control character shown as an escape (see the module)."""
    return _UNSAFE.sub(_escape, text)


def visible_lines(text: str) -> str:
    """:func:`visible`, but the line breaks of ``text`` are kept (for log records,
    whose tracebacks span lines)."""
    return "\n".join(visible(line) for line in text.split("\n"))
