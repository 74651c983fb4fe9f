"""Command-line options generated from the Settings fields, and the route in.

A command gets one option per setting its ``Spec.commands`` names: the field's
name (``--max-message-length``), the field's docstring as its help, the older
names as aliases (``--idle-timeout``), ``--x/--no-x`` for a bool, and the
fixed-value flags (``--cluster``). Besides them, ``--config FILE`` and
``--print-config``. An option records the value as typed and the option used,
and :func:`settings_from_args` hands them, with the environment and the file,
to :func:`bitchat.config.load_settings`: one precedence, one validation, and an
error that names the option.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from bitchat.config import Given, Loaded, format_default, load_settings, to_toml
from bitchat.settings import FIELDS, docs, kind, option_names, spec

GIVEN = "settings_given"
"""The namespace attribute where the options record what was given: name -> Given."""


def _record(namespace: argparse.Namespace, name: str, given: Given) -> None:
    found = dict(getattr(namespace, GIVEN, None) or {})  # a copy: never share a default
    found[name] = given
    setattr(namespace, GIVEN, found)


class _Record(argparse.Action):
    """Records the option's text (or its ``const``, for a flag) for field ``dest``."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        value = self.const if self.nargs == 0 else values
        _record(namespace, self.dest, Given(value, option_string or self.dest, text=True))


class _RecordBool(argparse.BooleanOptionalAction):
    """``--x`` records True and ``--no-x`` False for field ``dest``."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        if option_string is not None and option_string in self.option_strings:
            value = not option_string.startswith("--no-")
            _record(namespace, self.dest, Given(value, option_string))


def add_settings_options(
    parser: argparse.ArgumentParser, command: str, defaults: Mapping[str, Any] | None = None
) -> None:
    """``--config``, ``--print-config`` and an option per setting ``command`` uses.

    ``defaults`` are the command's own defaults (the router's port), for the help.
    """
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="read settings from this TOML file, the setting names as keys "
        "(max_message_length = 2000); the environment and the options override it",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective settings as TOML (a config file) and exit",
    )
    group = parser.add_argument_group(
        "settings",
        "Each option sets the setting of its name. BITCHAT_<NAME> in the environment "
        "(BITCHAT_MAX_MESSAGE_LENGTH=2000) and <name> in the --config file set it too; "
        "the command line wins over the environment, which wins over the file.",
    )
    for name in FIELDS:
        s = spec(name)
        if command not in s.commands:
            continue
        text = _help(name, (defaults or {}).get(name, FIELDS[name].default))
        if kind(name) is bool:
            group.add_argument(
                *option_names(name),
                dest=name,
                action=_RecordBool,
                default=argparse.SUPPRESS,
                help=text,
            )
        else:
            group.add_argument(
                *option_names(name),
                dest=name,
                action=_Record,
                default=argparse.SUPPRESS,
                metavar=_metavar(name),
                help=text,
            )
        for flag, value in s.flags:
            group.add_argument(
                flag,
                dest=name,
                action=_Record,
                nargs=0,
                const=value,
                default=argparse.SUPPRESS,
                help=f"the same as {option_names(name)[0]} {value}",
            )


def _help(name: str, value: Any) -> str:
    text = docs().get(name, "").replace("``", "")
    if value is not None:
        shown = format_default(name, value).replace("`", "")
        text += f" (default {shown})"
    return text.replace("%", "%%")  # argparse formats help with %


def _metavar(name: str) -> str:
    s = spec(name)
    if s.metavar:
        return s.metavar
    if s.choices:
        return "{" + ",".join(s.choices) + "}"
    named = {"s": "SECONDS", "bytes": "BYTES", "KiB": "KIB"}
    return named.get(s.unit) or ("N" if kind(name) in (int, float) else name.split("_")[-1].upper())


def settings_from_args(
    args: argparse.Namespace,
    *,
    environ: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> Loaded:
    """The settings of a parsed command line: its options, then ``environ``
    (default ``os.environ``), then its ``--config`` file, then ``defaults``."""
    return load_settings(
        config=getattr(args, "config", None),
        environ=os.environ if environ is None else environ,
        options=getattr(args, GIVEN, None) or {},
        defaults=defaults,
    )


def print_config(loaded: Loaded, command: str) -> None:
    sys.stdout.write(to_toml(loaded.settings, loaded.origins, command))
    sys.stdout.flush()
