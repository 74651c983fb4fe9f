"""One exception tree: every exception class of the package is a BitchatError."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from collections.abc import Iterator

import bitchat
from bitchat import errors


def _exception_classes() -> Iterator[type[BaseException]]:
    """Every exception class defined in a bitchat module, nested classes included."""
    for info in pkgutil.walk_packages(bitchat.__path__, "bitchat."):
        if info.name.endswith(".__main__"):  # running it is the CLI
            continue
        module = importlib.import_module(info.name)
        todo: list[object] = [module]
        while todo:
            for value in vars(todo.pop()).values():
                if inspect.isclass(value) and value.__module__ == module.__name__:
                    if issubclass(value, BaseException):
                        yield value
                    todo.append(value)


def test_every_exception_class_is_a_bitchat_error() -> None:
    found = set(_exception_classes())
    assert errors.ConfigError in found and len(found) >= 10  # the walk reached the package
    strays = sorted(
        f"{c.__module__}.{c.__qualname__}" for c in found if not issubclass(c, bitchat.BitchatError)
    )
    assert not strays, f"not under BitchatError: {strays}"


def test_the_tree_in_the_docstring_names_every_class() -> None:
    doc = errors.__doc__ or ""
    for cls in _exception_classes():
        if cls.__module__ == "bitchat.errors":
            name = cls.__name__
        else:  # named with its module
            name = f"{cls.__module__}.{cls.__qualname__}"
        # A node of the drawing (the start of a line, or after "── "), or ``named``.
        node = rf"(^    |── ){re.escape(name)}\b|``{re.escape(name)}``"
        assert re.search(node, doc, re.MULTILINE), f"{name} is not in errors.py's tree"


def test_config_error_is_a_usage_error() -> None:
    assert issubclass(errors.ConfigError, errors.UsageError)
    assert bitchat.ConfigError is errors.ConfigError
