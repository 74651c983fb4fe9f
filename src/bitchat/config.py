"""Where settings come from, in one order: command line > environment > TOML file > default.

All three sources use the field names of :class:`~bitchat.settings.Settings`:

- a TOML file (``bitchat server --config bitchat.toml``) with the names as keys,
  ``max_message_length = 2000``, and an ``[extra]`` table for ``Settings.extra``;
- the environment, ``BITCHAT_MAX_MESSAGE_LENGTH=2000``; an empty value unsets a
  setting that may be unset (``BITCHAT_ADMIN_TOKEN=``);
- the command line, ``--max-message-length 2000`` (:mod:`bitchat.cli.options`
  generates the options from the fields).

A key that names no setting is an error, in the file as in the environment,
where only the test suite's own ``BITCHAT_TEST_*`` variables are let through;
so is a value of the wrong type or out of range. Either way
:class:`~bitchat.errors.ConfigError` names the key and where it came from.

This module also writes settings back as TOML (``--print-config``: a config file
that reads back into the same settings) and draws the README's settings table
(``python -m bitchat.config --readme README.md`` rewrites it in place).
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import json
import re
import sys
import textwrap
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from bitchat.errors import ConfigError
from bitchat.settings import (
    FIELDS,
    Settings,
    default,
    docs,
    env_name,
    expectation,
    kind,
    option_names,
    optional,
    spec,
)

ENV_PREFIX = "BITCHAT_"
ENV_IGNORED = ("BITCHAT_TEST_",)
"""Prefixes of ``BITCHAT_`` variables that are not settings (the test suite's knobs)."""

_BOOLS = {"1": True, "true": True, "yes": True, "on": True}
_BOOLS |= {"0": False, "false": False, "no": False, "off": False}


@dataclass(frozen=True, slots=True)
class Given:
    """One value for one setting, and where it came from."""

    value: Any
    origin: str
    """For messages: ``bitchat.toml: port``, ``environment BITCHAT_PORT``, ``--port``."""
    text: bool = False
    """A string still to convert to the field's type (environment, command line)."""


@dataclass(frozen=True, slots=True)
class Loaded:
    """Settings, and where each value that is not a default came from."""

    settings: Settings
    origins: Mapping[str, str]


def load_settings(
    *,
    config: str | None = None,
    environ: Mapping[str, str] | None = None,
    options: Mapping[str, Given] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> Loaded:
    """Settings from the command line's ``options``, the environment, the ``config``
    file and ``defaults`` (a command's own, over the fields' defaults), validated.

    Raises :class:`ConfigError` for an unreadable file, an unknown key, or a
    value its field does not allow.
    """
    layers: list[Mapping[str, Given]] = [read_file(config)] if config else []
    layers.append(read_environ(environ or {}))
    layers.append(options or {})
    return merge(layers, defaults)


def merge(
    layers: Iterable[Mapping[str, Given]], defaults: Mapping[str, Any] | None = None
) -> Loaded:
    """Validated settings from ``layers``, lowest first: a later layer wins."""
    values = dict(defaults or {})
    origins: dict[str, str] = {}
    for layer in layers:
        for name, given in layer.items():
            values[name] = convert(name, given)
            origins[name] = given.origin
    settings = Settings(**values)
    settings.validate(origins)
    return Loaded(settings, origins)


def read_file(path: str) -> dict[str, Given]:
    """The settings of a TOML file, by name; ConfigError if a key is no setting."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid TOML file: {exc}") from exc
    found: dict[str, Given] = {}
    for key, value in data.items():
        if key not in FIELDS:
            raise ConfigError(f"{path}: {key}: {_unknown(key, FIELDS)}")
        found[key] = Given(value, f"{path}: {key}")
    return found


def read_environ(environ: Mapping[str, str]) -> dict[str, Given]:
    """The ``BITCHAT_*`` settings of an environment; ConfigError for an unknown one."""
    tables = ("extra", "webhooks")
    names = {env_name(name): name for name in FIELDS if name not in tables}
    found: dict[str, Given] = {}
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or var.startswith(ENV_IGNORED):
            continue
        name = names.get(var)
        if name is None:
            for table in tables:
                if var == env_name(table):
                    raise ConfigError(f"environment {var}: {table} is set in the config file only")
            raise ConfigError(f"environment {var}: {_unknown(var, names)}")
        found[name] = Given(environ[var], f"environment {var}", text=True)
    return found


def _unknown(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return "unknown setting" + (f" (did you mean {close[0]}?)" if close else "")


def convert(name: str, given: Given) -> Any:
    """``given``'s value as field ``name`` takes it, where it can be converted.

    A value that cannot is returned as it is, for :meth:`Settings.validate` to
    report with what the field expects.
    """
    value = given.value
    if given.text and isinstance(value, str):
        value = from_text(name, value)
    elif kind(name) is float and type(value) is int:
        value = float(value)
    elif kind(name) is tuple and isinstance(value, list):
        value = tuple(value)  # a TOML array
    choices = spec(name).choices
    if isinstance(value, str) and value not in choices and value.replace("-", "_") in choices:
        value = value.replace("-", "_")  # the router's --policy took least-connections
    return value


def from_text(name: str, text: str) -> Any:
    """A string from the environment or the command line as field ``name``'s type."""
    k = kind(name)
    if text == "" and optional(name):
        return None
    if k is bool:
        return _BOOLS.get(text.strip().lower(), text)
    if k is dict:
        # A table in the environment or on the command line is JSON: '{"bot": {...}}'.
        try:
            return json.loads(text)
        except ValueError:
            return text
    if k is tuple:
        return tuple(item.strip() for item in text.split(",") if item.strip())
    try:
        if k is int:
            return int(text)
        if k is float:
            return float(text)
    except ValueError:
        pass
    return text


# -- settings as TOML ---------------------------------------------------------------------


def to_toml(settings: Settings, origins: Mapping[str, str] | None = None, command: str = "") -> str:
    """``settings`` as a commented TOML config file that reads back into them.

    Each key has its docstring above it and, when it is not a default, where its
    value came from after it; a setting that is unset (None) is a comment.
    """
    origins = origins or {}
    who = f"bitchat {command}" if command else "bitchat"
    lines = [
        f"# Effective settings of {who}: command line > environment > config file > default.",
        f"# As a config file: {who} --config FILE",
    ]
    for name in FIELDS:
        if name in ("extra", "webhooks"):
            continue
        lines.append("")
        lines.extend(
            textwrap.wrap(
                _plain(docs().get(name, "")), 86, initial_indent="# ", subsequent_indent="# "
            )
        )
        value = getattr(settings, name)
        if value is None:
            lines.append(f"# {name} is not set")
            continue
        line = f"{name} = {toml_value(value)}"
        if name in origins:
            line += f"  # from {origins[name]}"
        lines.append(line)
    for i, table in enumerate(settings.webhooks):
        if i == 0:
            doc = _plain(docs().get("webhooks", ""))
            lines += ["", *textwrap.wrap(doc, 86, initial_indent="# ", subsequent_indent="# ")]
        lines.append("[[webhooks]]")
        lines += [f"{_toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    if settings.extra:
        lines += ["", "# " + _plain(docs().get("extra", "")), "[extra]"]
        lines += [f"{_toml_key(k)} = {toml_value(v)}" for k, v in settings.extra.items()]
    return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    """One TOML value: a string, number, boolean, date or time, array or inline table."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # Python's repr of a float (1e-05, inf, nan) is TOML too
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"no TOML form for a {type(value).__name__}")


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f"}
_ESCAPES["\r"] = "\\r"


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


# -- the README's table -------------------------------------------------------------------

README_START = "<!-- settings-table:start -->"
README_END = "<!-- settings-table:end -->"


def markdown_table() -> str:
    """The README's settings table, one row per field, from the fields themselves."""
    rows = [
        "| setting | default | allowed | what it bounds or sets | options |",
        "|---|---|---|---|---|",
    ]
    for name in FIELDS:
        cells = [
            f"`{name}`",
            format_default(name, default(name)),
            _allowed(name),
            _markdown(docs().get(name, "")),
            _options(name),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def format_default(name: str, value: Any) -> str:
    """A default as the docs show it: ``1 MiB``, ``15 s``, ``7 days``, ``50/s``."""
    unit = spec(name).unit
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f"`{value}`"
    if isinstance(value, dict | tuple):
        return "empty" if not value else f"`{toml_value(value)}`"
    if unit == "bytes" and value >= 1024 and value % 1024 == 0:
        return f"{value >> 20} MiB" if value % (1 << 20) == 0 else f"{value >> 10} KiB"
    if unit == "KiB":
        return f"{value} KiB" + (f" = {value // 1024} MiB" if value % 1024 == 0 else "")
    if unit == "s":
        return (
            f"{value / 86400:g} days" if value >= 86400 and value % 86400 == 0 else f"{value:g} s"
        )
    if unit == "/s":
        return f"{value:g}/s"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _allowed(name: str) -> str:
    if spec(name).choices:
        return " or ".join(f"`{c}`" for c in spec(name).choices)
    if kind(name) is bool:
        return "`true` or `false`"
    text = expectation(name).split(" ", 1)[1]  # drop the article: "integer >= 1"
    return text + (" or none" if optional(name) else "")


def _options(name: str) -> str:
    s = spec(name)
    if not s.commands:
        tables = {"extra": "`[extra]`", "webhooks": "`[[webhooks]]`"}
        return f"config file only ({tables[name]})" if name in tables else ""
    names = option_names(name)
    if kind(name) is bool:
        names = [n for option in names for n in (option, f"--no-{option[2:]}")]
    names += [flag for flag, _ in s.flags]
    return ", ".join(f"`{n}`" for n in names) + f" ({', '.join(s.commands)})"


def _markdown(doc: str) -> str:
    return doc.replace("``", "`").replace("|", "\\|")


def _plain(doc: str) -> str:
    """A docstring for a terminal: no reStructuredText markup."""
    return doc.replace("``", "")


def update_readme(text: str) -> str:
    """``text`` (a README) with its settings table between the markers redrawn."""
    start, end = text.index(README_START), text.index(README_END)
    return text[: start + len(README_START)] + "\n" + markdown_table() + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bitchat.config", description="Print the README's settings table."
    )
    parser.add_argument("--readme", metavar="FILE", help="rewrite the table in FILE instead")
    args = parser.parse_args(argv)
    if args.readme is None:
        sys.stdout.write(markdown_table())
        return 0
    with open(args.readme, encoding="utf-8") as file:
        text = file.read()
    with open(args.readme, "w", encoding="utf-8") as file:
        file.write(update_readme(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
