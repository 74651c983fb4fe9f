"""The client side of files: upload and download over HTTP on the server's port.

:class:`~bitchat.im.client.IMClient` calls these with its login token; both stream
(an upload is read from disk chunk by chunk, a download written to a temporary
name in the folder and renamed to the file's own name once complete).
"""

from __future__ import annotations

import contextlib
import mimetypes
import os
import ssl
import tempfile
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

import httpx

from bitchat.errors import RequestError, codes

PATH = "/api/v1/files"
_CHUNK = 256 * 1024


def base_url(host: str, port: int, tls: ssl.SSLContext | None) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if tls is not None else 'http'}://{host}:{port}"


def _error(r: httpx.Response) -> RequestError:
    try:
        body = r.json()["error"]
        return RequestError(str(body["code"]), str(body["message"]))
    except Exception:
        return RequestError(codes.INTERNAL, f"HTTP {r.status_code}")


async def _read(path: str) -> AsyncIterator[bytes]:
    with open(path, "rb") as fh:  # a local file: reads are short, and bounded by _CHUNK
        while chunk := fh.read(_CHUNK):
            yield chunk


def guess_type(path: str) -> str:
    return mimetypes.guess_type(path)[0] or "application/octet-stream"


async def upload(
    url: str,
    token: str,
    path: str,
    *,
    content_type: str | None = None,
    tls: ssl.SSLContext | None = None,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """Upload the file at ``path``; the server's answer (``file_id``, ``name``, ...)."""
    size = os.path.getsize(path)
    headers = {
        "authorization": f"Bearer {token}",
        "content-type": content_type or guess_type(path),
        "content-length": str(size),
    }
    try:
        async with httpx.AsyncClient(verify=tls or True, timeout=timeout) as http:
            r = await http.post(
                url + PATH,
                params={"name": os.path.basename(path)},
                headers=headers,
                content=_read(path),
            )
    except httpx.HTTPError as exc:
        raise _failed(exc) from None
    if r.status_code != 201:
        raise _error(r)
    out: dict[str, Any] = r.json()
    return out


def message_fields(info: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The type ("image" or "file") and fields of a message referring to an upload
    (``info``, the upload's answer)."""
    keys = ["file_id", "name", "size", "content_type"]
    if info.get("width"):
        return "image", {k: info[k] for k in (*keys, "width", "height")}
    return "file", {k: info[k] for k in keys}


def file_of(m: Any) -> dict[str, Any] | None:
    """The fields of a received file or image message (a ChatMessage), else None."""
    fields = getattr(m, "fields", None)
    if getattr(m, "type", "") not in ("file", "image") or not isinstance(fields, dict):
        return None
    if not isinstance(fields.get("file_id"), str):
        return None
    return fields


def _filename(disposition: str, fallback: str) -> str:
    for part in disposition.split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "filename*" and value.lower().startswith("utf-8''"):
            name = os.path.basename(unquote(value[7:]).replace("\\", "/"))
            if name not in ("", ".", ".."):
                return name
    return fallback


def _free_path(folder: str, name: str) -> str:
    stem, ext = os.path.splitext(name)
    candidate = os.path.join(folder, name)
    n = 1
    while os.path.exists(candidate):
        candidate = os.path.join(folder, f"{stem} ({n}){ext}")
        n += 1
    return candidate


async def download(
    url: str,
    token: str,
    file_id: str,
    folder: str = ".",
    *,
    thumbnail: bool = False,
    tls: ssl.SSLContext | None = None,
    timeout: float = 300.0,
) -> str:
    """Save the file under its own name in ``folder`` (``name (1).ext`` when taken);
    the path written."""
    target = f"{url}{PATH}/{file_id}" + ("/thumbnail" if thumbnail else "")
    os.makedirs(folder, exist_ok=True)
    try:
        return await _download(target, token, file_id, folder, thumbnail, tls, timeout)
    except httpx.HTTPError as exc:
        raise _failed(exc) from None


def _failed(exc: httpx.HTTPError) -> RequestError:
    return RequestError(codes.UNAVAILABLE, f"the file transfer failed: {exc or type(exc).__name__}")


async def _download(
    target: str,
    token: str,
    file_id: str,
    folder: str,
    thumbnail: bool,
    tls: ssl.SSLContext | None,
    timeout: float,
) -> str:
    async with (
        httpx.AsyncClient(verify=tls or True, timeout=timeout) as http,
        http.stream("GET", target, headers={"authorization": f"Bearer {token}"}) as r,
    ):
        if r.status_code != 200:
            await r.aread()
            raise _error(r)
        name = _filename(r.headers.get("content-disposition", ""), file_id)
        if thumbnail:
            name = "thumbnail-" + name
        fd, tmp = tempfile.mkstemp(prefix=f".{file_id}.", suffix=".part", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                async for chunk in r.aiter_bytes(_CHUNK):
                    fh.write(chunk)
            path = _free_path(folder, name)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return path
