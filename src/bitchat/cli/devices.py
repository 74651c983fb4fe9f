"""Where ``bitchat client`` keeps its device ids between runs.

The server keeps, per device, how far it has each conversation; a client that
came back as a new device every run would be pushed everything the user has not
read again. So the client keeps the device id the server named at its first
login, one per server and user, in ``devices.json`` in the user's config folder
(``$XDG_CONFIG_HOME/bitchat``, else ``~/.config/bitchat``)::

    {"127.0.0.1:8864 houyi": "d-3f9a0c...", "router 10.0.0.1:8870 gris": "..."}

Through a router, the router's address names the server (its nodes share one
store). A JWT login keeps its device under the token's subject (its ``sub``
claim, matched exactly: ``"127.0.0.1:8864 jwt u-1001"``), since the name is
known only once the server has answered; names have no spaces, so the two kinds
of key never meet. The file is written whole to a temporary file and renamed over the old
one, readable by the user alone, under a lock (``devices.json.lock``) so two
clients logging in at once both keep theirs; a file that cannot be read or
parsed counts as empty (the next login writes it again).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterator, Mapping
from pathlib import Path

import jwt

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock, the rename still keeps it whole
    fcntl = None  # type: ignore[assignment]

FILE_NAME = "devices.json"

DEVICE_ID = re.compile(r"[A-Za-z0-9_.:-]+")
"""What a device id may be made of (the server also bounds its length)."""


def config_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The user's bitchat config folder: ``$XDG_CONFIG_HOME/bitchat`` (an absolute
    path, per the XDG spec), else ``~/.config/bitchat``."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME", "")
    if not base or not os.path.isabs(base):
        home = env.get("HOME") or str(Path.home())
        base = os.path.join(home, ".config")
    return Path(base) / "bitchat"


def jwt_subject(token: str) -> str:
    """The ``sub`` claim of a JWT, read without checking the token (``""`` when it is
    malformed or has none). Only the key its device id is kept under: the server
    is the one that checks the token."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return ""
    subject = claims.get("sub")
    return subject if isinstance(subject, str) else ""


class DeviceStore:
    """The device ids of one server (``server``: ``HOST:PORT`` or ``router
    HOST:PORT``), by user name, in ``path``."""

    def __init__(self, path: Path, server: str) -> None:
        self.path = path
        self.server = server

    def _key(self, user: str) -> str:
        # The server finds users by their NFKC name, case folded: "Houyi" is houyi.
        return f"{self.server} {unicodedata.normalize('NFKC', user).casefold()}"

    def _subject_key(self, subject: str) -> str:
        # A subject is the backend's own id, not a name: matched exactly.
        return f"{self.server} jwt {subject}"

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}

    def get(self, user: str) -> str:
        """The device id kept for ``user`` on this server, or ``""``."""
        return self._get(self._key(user))

    def get_subject(self, subject: str) -> str:
        """The device id kept for the JWT subject ``subject``, or ``""``."""
        return self._get(self._subject_key(subject))

    def put(self, user: str, device: str) -> None:
        """Keep ``device`` for ``user``; raises OSError when the folder is not writable."""
        self._put(self._key(user), device)

    def put_subject(self, subject: str, device: str) -> None:
        """Keep ``device`` for the JWT subject ``subject`` (as :meth:`put`)."""
        self._put(self._subject_key(subject), device)

    def _get(self, key: str) -> str:
        device = self._read().get(key, "")
        return device if DEVICE_ID.fullmatch(device) else ""

    def _put(self, key: str, device: str) -> None:
        if self._read().get(key) == device:
            return
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._locked():
            data = self._read()  # again: another client may have written meanwhile
            data[key] = device
            self._write(data)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing it releases the lock

    def _write(self, data: dict[str, str]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".devices-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True, ensure_ascii=False)
                f.write("\n")
            os.replace(tmp, self.path)  # a crash leaves the old file or the new, never half
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
