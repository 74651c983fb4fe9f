"""Password hashing (argon2id) and login tokens.

Hashing is deliberately slow, so it runs off the event loop. The cost comes
from :class:`~bitchat.Settings` (``password_hash_time_cost``,
``password_hash_memory_kib``); a stored hash carries its own parameters, so
verifying an old hash works whatever the current cost is.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import secrets
from typing import TYPE_CHECKING

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

if TYPE_CHECKING:
    from bitchat.settings import Settings


@functools.lru_cache(maxsize=8)
def make_hasher(time_cost: int = 2, memory_kib: int = 19 * 1024) -> PasswordHasher:
    """An argon2id hasher; the defaults are OWASP's baseline (19 MiB, 2 passes, 1 lane)."""
    return PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=1)


def hasher_for(settings: Settings) -> PasswordHasher:
    return make_hasher(settings.password_hash_time_cost, settings.password_hash_memory_kib)


_default = make_hasher()


async def hash_password(password: str, hasher: PasswordHasher | None = None) -> str:
    return await asyncio.to_thread((hasher or _default).hash, password)


def _verify(stored: str, password: str, hasher: PasswordHasher) -> bool:
    try:
        return hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


async def verify_password(stored: str, password: str, hasher: PasswordHasher | None = None) -> bool:
    return await asyncio.to_thread(_verify, stored, password, hasher or _default)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """What is stored of a token: a leaked table does not log anyone in."""
    return hashlib.sha256(token.encode()).hexdigest()
