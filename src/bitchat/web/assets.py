"""The chat page's files (``bitchat/web/static``), read once and served from memory.

Only the files in the folder are served, by exact name: a request path never
reaches the file system.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
    ".ico": b"image/x-icon",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: bytes
    etag: bytes


class StaticFiles:
    """Name -> :class:`Asset` of every file in ``bitchat/web/static``."""

    def __init__(self) -> None:
        self.files: dict[str, Asset] = {}
        folder = resources.files("bitchat.web").joinpath("static")
        for entry in folder.iterdir():
            name = entry.name
            suffix = name[name.rfind(".") :] if "." in name else ""
            if not entry.is_file() or suffix not in _TYPES:
                continue
            body = entry.read_bytes()
            etag = b'"' + hashlib.sha256(body).hexdigest()[:20].encode() + b'"'
            self.files[name] = Asset(body, _TYPES[suffix], etag)

    def get(self, name: str) -> Asset | None:
        return self.files.get(name)
