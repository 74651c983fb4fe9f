"""HTTP/1.1 on the server's port, with h11: the chat page, /status/*, /healthz, /metrics,
and the server API under /api/v1/ (:mod:`bitchat.web.api`).

One :class:`HttpConnection` per connection whose first bytes are an HTTP request.
It answers requests in order (keep-alive and pipelining included) and hands a
``GET /ws`` with ``Upgrade: websocket`` to wsproto and a
:class:`~bitchat.web.ws.WsConnection`, which replaces it as the transport's protocol.

Bad input never escapes: a request h11 cannot parse gets 400 (431 when its head
is over ``Settings.max_http_header_size``) and a close; an unknown path 404; a
method other than GET/HEAD 405; a body (none of the other routes takes one) over
``Settings.max_http_body_size`` 413. An API request's JSON body is bounded by
``Settings.max_api_body_size`` (413 ``body_too_large`` in JSON); its handler runs
as a task while the connection reads nothing more, so answers leave in request
order on a keep-alive connection and a pipelining peer cannot pile requests up.
A peer that sends no complete request within ``Settings.http_timeout``
is dropped (the time runs from the start of the request, however slowly its bytes
come), and one that does not read its answers stops being read. An answer to
``HEAD`` never has a body, errors included, and nothing a peer sends is logged
with a traceback: one INFO line per bad request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import h11
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection
from wsproto.events import Request as WsRequest
from wsproto.utilities import RemoteProtocolError as WsHandshakeError

from bitchat.errors import codes
from bitchat.metrics import CONTENT_TYPE_LATEST
from bitchat.web import api, status
from bitchat.web import files as files_http
from bitchat.web.ws import WsConnection

if TYPE_CHECKING:
    from bitchat.web import WebFrontend

log = logging.getLogger("bitchat.web")

_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE")
_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"
_ALLOW = b"GET, HEAD"
# The page loads nothing from elsewhere; the CSP makes that a promise the browser keeps.
# blob: in img-src: image previews are fetched with the login token (a download needs the
# Authorization header, which an <img> cannot send) and shown from blob: URLs the page made.
_PAGE_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; connect-src 'self'; img-src 'self' data: blob:; "
        b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
]
_REASONS = {
    200: b"OK",
    201: b"Created",
    304: b"Not Modified",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    413: b"Content Too Large",
    415: b"Unsupported Media Type",
    426: b"Upgrade Required",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    503: b"Service Unavailable",
    505: b"HTTP Version Not Supported",
}

Headers = list[tuple[bytes, bytes]]


def looks_like_http(first: bytes) -> bool:
    """True when ``first`` starts (or may start: it can be one byte) an HTTP request line.

    A known method followed by anything is HTTP (h11 then judges the rest, so a
    garbled request line gets its 400); a prefix of one may be too.
    """
    head = first[:8]
    n = 0
    while n < len(head) and 0x41 <= head[n] <= 0x5A:  # A-Z
        n += 1
    token = head[:n]
    if n < len(head):
        return token in _METHODS
    return bool(token) and any(m.startswith(token) for m in _METHODS)


class Reply:
    """One response: status, extra headers, body."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        content_type: bytes = _TEXT,
        headers: Headers | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or []


def _text(status: int, message: str = "") -> Reply:
    return Reply(status, (message or _REASONS.get(status, b"").decode()).encode() + b"\n")


class HttpConnection(asyncio.Protocol):
    """One HTTP/1.1 connection, until it closes or becomes a WebSocket."""

    def __init__(self, web: WebFrontend, transport: asyncio.Transport, remote: str) -> None:
        self.web = web
        self.server = web.server
        self.settings = web.server.settings
        self.transport = transport
        self.remote = remote
        peer = transport.get_extra_info("peername")
        self.peer_host: str = peer[0] if isinstance(peer, tuple) else ""
        self.conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.settings.max_http_header_size
        )
        self._request: h11.Request | None = None
        self._body_size = 0
        self._body_limit = self.settings.max_http_body_size
        self._body: bytearray | None = None
        """The body of an API request being read (other routes take none)."""
        self._task: asyncio.Task[api.ApiReply | None] | None = None
        """The API request being answered: the next request waits for it."""
        self._upload: files_http.Upload | None = None
        """The file upload whose body is being read (its task stores it meanwhile)."""
        self._drained: asyncio.Event | None = None
        """Set when the peer read enough of a streamed answer for more to be written."""
        self._write_paused = False
        self._done = False
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._arm_timer()
        web.connections.add(self)

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        try:
            self.conn.receive_data(data)
        except RuntimeError:  # h11 refuses data after it saw the end; the peer is gone
            return
        self._process()

    def eof_received(self) -> bool | None:
        if not self._done:
            self.conn.receive_data(b"")
            self._process()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.release_slot(self.transport)
        self._finish()

    def pause_writing(self) -> None:
        # The peer is not reading its answers: stop reading its requests.
        self._write_paused = True
        if not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None:
            self._drained.set()
        if not self.transport.is_closing() and self._task is None:
            self.transport.resume_reading()
        self._process()

    # -- the request loop ---------------------------------------------------------------------

    def _process(self) -> None:
        conn = self.conn
        while not self._done and not self._write_paused and self._task is None:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(exc.error_status_hint, str(exc))
                return
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                    self._arm_timer()
                    continue
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    self.close()
                return
            if isinstance(event, h11.Request):
                self._request = event
                self._body_size = 0
                target_path = _target_path(event.target)
                is_api = target_path.startswith(_API_PREFIX)
                self._body = bytearray() if is_api else None
                self._body_limit = (
                    self.settings.max_api_body_size if is_api else self.settings.max_http_body_size
                )
                if is_api and event.method == b"POST" and self._start_upload(event, target_path):
                    self._body = None
                    self._body_limit = self.settings.max_file_size
                # h11 bounds a head that is still arriving; this bounds one that came whole.
                if _head_size(event) > self.settings.max_http_header_size:
                    self._fail(431, "the request head is too large")
                    return
                if _content_length(event) > self._body_limit:
                    self._too_large()
                    return
                if is_api and conn.they_are_waiting_for_100_continue:
                    # curl asks before a large body: say go on, rather than have it wait.
                    self.transport.write(
                        conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                    )
            elif isinstance(event, h11.Data):
                self._body_size += len(event.data)
                if self._upload is not None and self._upload.refusal is not None:
                    return  # being refused: nothing more is read
                if self._body_size > self._body_limit:
                    self._too_large()
                    return
                if self._body is not None:
                    self._body += event.data
                elif self._upload is not None:
                    self._upload.feed(event.data)
            elif isinstance(event, h11.EndOfMessage):
                request, self._request = self._request, None
                body, self._body = self._body, None
                assert request is not None
                upload, self._upload = self._upload, None
                if upload is not None:
                    upload.end()
                    self._wait_for(upload.task, request)
                    continue
                self._handle(request, bytes(body or b""))
            elif isinstance(event, h11.ConnectionClosed):
                self.close()
                return

    def _too_large(self) -> None:
        if self._upload is not None:
            limit = self.settings.max_file_size
            self._refuse_upload(
                api.error_reply(codes.BODY_TOO_LARGE, f"files are limited to {limit} bytes")
            )
            return
        if self._body is None:
            self._fail(413, "request bodies are not accepted here")
            return
        limit = self.settings.max_api_body_size
        self._fail(
            413,
            "the request body is too large",
            reply=api.error_reply(
                codes.BODY_TOO_LARGE, f"request bodies are limited to {limit} bytes"
            ),
        )

    def _handle(self, request: h11.Request, body: bytes = b"") -> None:
        if request.http_version not in (b"1.0", b"1.1"):
            self._fail(505, f"HTTP/{request.http_version.decode()} is not spoken here", request)
            return
        try:
            target = urlsplit(request.target.decode("ascii"))
            path = target.path
        except (UnicodeDecodeError, ValueError):
            self._fail(400, "bad request target", request)
            return
        if path == "/ws" and _header_has(request, b"upgrade", b"websocket"):
            self._upgrade(request)
            return
        files = self.web.files
        if files is not None and files_http.is_files_path(path):
            self._wait_for(files_http.download(self, files, request, path), request)
            return
        if path.startswith(api.PREFIX + "/"):
            self._api(request, path, target.query, body)
            return
        try:
            reply = self._route(request, path)
        except Exception:
            log.exception("HTTP handler for %s failed", path)
            reply = _text(500)
        self._send(reply, request)

    def _route(self, request: h11.Request, path: str) -> Reply:
        handler = _ROUTES.get(path)
        if handler is None:
            name = path[len("/static/") :] if path.startswith("/static/") else ""
            if not name or self.web.static.get(name) is None:
                return _text(404)
            handler = lambda conn, request: conn._file(name, request)  # noqa: E731
        if request.method not in (b"GET", b"HEAD"):
            return Reply(405, b"Method Not Allowed\n", headers=[(b"allow", _ALLOW)])
        return handler(self, request)

    # -- the server API -----------------------------------------------------------------------

    def _api(self, request: h11.Request, path: str, query: str, body: bytes) -> None:
        """Answer at once, or run the handler as a task: reading stops until it is
        answered, so answers leave in request order and a pipelining peer is bounded."""
        try:
            out = self.web.api.handle(
                request.method, path, query, _header_value(request, b"authorization"), body
            )
        except Exception:
            log.exception("API request for %s failed", path)
            out = api.error_reply(codes.INTERNAL, "the server failed to answer this request")
        if isinstance(out, api.ApiReply):
            self._send(_json_reply(out), request)
            return
        self._wait_for(out, request)

    def _wait_for(
        self, out: Awaitable[api.ApiReply | None] | asyncio.Task[api.ApiReply], request: h11.Request
    ) -> None:
        if self._timer is not None:  # the time is the request's to arrive, not to answer
            self._timer.cancel()
            self._timer = None
        if not self.transport.is_closing():
            self.transport.pause_reading()
        task: asyncio.Task[api.ApiReply | None] = (
            out if isinstance(out, asyncio.Task) else self._loop.create_task(_awaited(out))
        )
        self._task = task
        task.add_done_callback(lambda t: self._answered(t, request))

    def _answered(self, task: asyncio.Task[api.ApiReply | None], request: h11.Request) -> None:
        self._task = None
        if self._done or task.cancelled():
            return
        exc = task.exception()
        reply: api.ApiReply | None
        if exc is not None:  # pragma: no cover - Api._run answers every failure itself
            log.error("API request failed", exc_info=exc)
            reply = api.error_reply(codes.INTERNAL, "the server failed to answer this request")
        else:
            reply = task.result()
        if reply is not None:  # None: a streamed answer, sent already
            self._send(_json_reply(reply), request)
        if self._done:
            return
        if not self._write_paused and not self.transport.is_closing():
            self.transport.resume_reading()
        self._process()

    # -- file uploads and downloads (bitchat.web.files) ---------------------------------------

    def _start_upload(self, request: h11.Request, target_path: bytes) -> bool:
        """Begin receiving a file upload, if ``request`` is one (and files are served)."""
        files = self.web.files
        path, _, query = target_path.partition(b"?")
        if files is None or path != files_http.UPLOAD_PATH.encode():
            return False
        self._upload = upload = files_http.Upload(self, files, request, query.decode("latin-1"))
        upload.task.add_done_callback(lambda t: self._upload_done(upload, t))
        self._arm_timer(self.settings.file_upload_timeout)
        return True

    def _refuse_upload(self, reply: api.ApiReply) -> None:
        """Stop the upload being read; answer ``reply`` once it removed what it wrote."""
        upload = self._upload
        assert upload is not None
        if upload.refusal is None:
            upload.refusal = reply
            self.pause_for_upload()
            upload.task.cancel()

    def _upload_done(self, upload: files_http.Upload, task: asyncio.Task[api.ApiReply]) -> None:
        # Done before its body ended: refused (not authenticated, over a limit, a wrong
        # type, too slow). Answer now and close, rather than read the rest for nothing.
        # Cancelled or not, the task is done only once it removed what it wrote, so the
        # answer never comes before the cleanup.
        if self._done or self._upload is not upload:
            return
        self._upload = None
        reply = upload.refusal if task.cancelled() else task.result()
        if reply is None:  # pragma: no cover - only a refusal cancels an upload here
            self.abort()
            return
        self._fail(reply.status, "upload refused", reply=reply)

    def pause_for_upload(self) -> None:
        if not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_for_upload(self) -> None:
        if not self._write_paused and not self.transport.is_closing() and not self._done:
            self.transport.resume_reading()

    async def stream_response(
        self,
        status_code: int,
        headers: Headers,
        chunks: AsyncIterator[bytes],
        request: h11.Request,
    ) -> None:
        """Send a response whose body comes from ``chunks`` (its length among
        ``headers``), waiting whenever the peer is not reading."""
        conn = self.conn
        head = request.method == b"HEAD"
        try:
            out = conn.send(
                h11.Response(
                    status_code=status_code,
                    headers=[*headers, (b"server", b"bitchat")],
                    reason=_REASONS.get(status_code, b""),
                )
            )
            self.transport.write(out or b"")
            if not head:
                async for chunk in chunks:
                    if self._done or self.transport.is_closing():
                        return
                    self.transport.write(conn.send(h11.Data(data=chunk)) or b"")
                    while self._write_paused and not self._done:
                        self._drained = asyncio.Event()
                        await self._drained.wait()
                    self._drained = None
            self.transport.write(conn.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError as exc:  # the store's bytes disagree with the length
            log.warning("could not stream an HTTP %d response: %s", status_code, exc)
            self.abort()
            return
        finally:
            if hasattr(chunks, "aclose"):
                await chunks.aclose()
        self.server.metrics.http_requests.labels("api", str(status_code)).inc()
        if self.conn.our_state is h11.MUST_CLOSE:
            self.close()

    # -- routes -------------------------------------------------------------------------------

    def _file(self, name: str, request: h11.Request) -> Reply:
        asset = self.web.static.get(name)
        if asset is None:  # pragma: no cover - index.html ships with the package
            return _text(404)
        headers = [*_PAGE_HEADERS, (b"etag", asset.etag)]
        if _header_value(request, b"if-none-match") == asset.etag:
            return Reply(304, headers=headers)
        return Reply(200, asset.body, asset.content_type, headers)

    def _index(self, request: h11.Request) -> Reply:
        return self._file("index.html", request)

    def _ws_without_upgrade(self, request: h11.Request) -> Reply:
        return Reply(
            426,
            b"This is the WebSocket endpoint: send Upgrade: websocket.\n",
            headers=[(b"upgrade", b"websocket")],
        )

    def _healthz(self, request: h11.Request) -> Reply:
        return Reply(
            200, status.dumps(status.health(self.server)), _JSON, [(b"cache-control", b"no-store")]
        )

    def _metrics(self, request: h11.Request) -> Reply:
        return Reply(
            200,
            self.server.metrics.render(),
            CONTENT_TYPE_LATEST.encode(),
            [(b"cache-control", b"no-store")],
        )

    def _status(self, request: h11.Request, build: Callable[..., object]) -> Reply:
        refusal = status.authorize(
            self.settings.admin_token, _header_value(request, b"authorization"), self.peer_host
        )
        if refusal is not None:
            code, message = refusal
            headers = [(b"www-authenticate", b'Bearer realm="bitchat"')] if code == 401 else []
            return Reply(code, status.dumps({"error": message}), _JSON, headers)
        return Reply(
            200, status.dumps(build(self.server)), _JSON, [(b"cache-control", b"no-store")]
        )

    def _channels(self, request: h11.Request) -> Reply:
        return self._status(request, status.channels)

    def _sessions(self, request: h11.Request) -> Reply:
        return self._status(request, status.sessions)

    # -- WebSocket upgrade --------------------------------------------------------------------

    def _upgrade(self, request: h11.Request) -> None:
        if request.method != b"GET":
            self._send(
                Reply(405, b"Method Not Allowed\n", headers=[(b"allow", b"GET")]),
                request,
                close=True,
            )
            return
        ws = WSConnection(ConnectionType.SERVER)
        try:
            ws.initiate_upgrade_connection(list(request.headers), request.target)
            for event in ws.events():
                assert isinstance(event, WsRequest)
        except WsHandshakeError as exc:
            hint = exc.event_hint
            code = hint.status_code if isinstance(hint, RejectConnection) else 400
            extra = list(hint.headers) if isinstance(hint, RejectConnection) else []
            self._send(
                Reply(code, f"Bad WebSocket handshake: {exc}\n".encode(), headers=extra),
                request,
                close=True,
            )
            return
        accept = ws.send(AcceptConnection())
        trailing, _ = self.conn.trailing_data
        self.server.metrics.http_requests.labels("/ws", "101").inc()
        self._finish()
        link = WsConnection(self.server, self.transport, self.remote, ws)
        self.transport.set_protocol(link)
        link.start(accept, trailing)

    # -- output and closing -------------------------------------------------------------------

    def _send(self, reply: Reply, request: h11.Request | None, *, close: bool = False) -> None:
        conn = self.conn
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self.abort()
            return
        headers: Headers = [
            (b"content-type", reply.content_type),
            (b"content-length", str(len(reply.body)).encode()),
            (b"server", b"bitchat"),
            *reply.headers,
        ]
        if close:
            headers.append((b"connection", b"close"))
        head = request is not None and request.method == b"HEAD"
        try:
            out = conn.send(
                h11.Response(
                    status_code=reply.status,
                    headers=headers,
                    reason=_REASONS.get(reply.status, b""),
                )
            )
            if reply.body and not head and reply.status != 304:
                out += conn.send(h11.Data(data=reply.body)) or b""
            out += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError as exc:
            # A state h11 refuses (it should not happen): one line, never a traceback a
            # peer could have the log fill up with.
            log.warning("could not send an HTTP %d response: %s", reply.status, exc)
            self.abort()
            return
        if out:
            self.transport.write(out)
        route = _route_label(request)
        self.server.metrics.http_requests.labels(route, str(reply.status)).inc()
        if close or self.conn.our_state is h11.MUST_CLOSE:  # the peer asked to close
            self.close()

    def _fail(
        self,
        code: int,
        message: str,
        request: h11.Request | None = None,
        *,
        reply: api.ApiReply | None = None,
    ) -> None:
        """Answer ``code`` (or the API's ``reply``) and close; ``request`` (default: the
        one being read, if any) decides whether the answer may have a body (not to a
        HEAD)."""
        log.info("bad HTTP request from %s: %s (%d)", self.remote, message, code)
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self._send(
                _json_reply(reply)
                if reply is not None
                else _text(code, f"{_REASONS.get(code, b'Error').decode()}: {message}"),
                request or self._request,
                close=True,
            )
        else:
            self.abort()

    def _arm_timer(self, timeout: float = 0.0) -> None:
        if self._timer is not None:
            self._timer.cancel()
        timeout = timeout or self.settings.http_timeout
        self._timer = self._loop.call_later(timeout, self._timed_out) if timeout > 0 else None

    def _timed_out(self) -> None:
        self._timer = None
        if self._done:
            return
        if self._upload is not None:
            self._refuse_upload(api.error_reply(codes.UPLOAD_TIMEOUT, "the upload took too long"))
            return
        if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
            self.close()  # an idle keep-alive connection: nothing to say
        else:
            self._fail(408, "the request took too long")

    def _finish(self) -> None:
        """Stop being this connection's protocol (closed, or upgraded)."""
        self._done = True
        upload, self._upload = self._upload, None
        if upload is not None:
            upload.task.cancel()
        if self._drained is not None:
            self._drained.set()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.web.connections.discard(self)

    def close(self) -> None:
        """Close after what is written has left."""
        self._finish()
        self.transport.close()

    def abort(self) -> None:
        self._finish()
        self.transport.abort()


_API_PREFIX = api.PREFIX.encode() + b"/"


def _target_path(target: bytes) -> bytes:
    """The path of a request target, in origin form (``/a?b``) or absolute form
    (``http://host/a?b``), as the route will see it."""
    if target.startswith(b"/"):
        return target
    scheme_end = target.find(b"://")
    start = target.find(b"/", scheme_end + 3) if scheme_end >= 0 else -1
    return target[start:] if start >= 0 else b""


async def _awaited(out: Awaitable[api.ApiReply | None]) -> api.ApiReply | None:
    return await out


def _json_reply(reply: api.ApiReply) -> Reply:
    return Reply(reply.status, reply.body, _JSON, [(b"cache-control", b"no-store"), *reply.headers])


def _head_size(request: h11.Request) -> int:
    """The request head's size as sent, give or take the spaces h11 strips."""
    size = len(request.method) + len(request.target) + 12
    for name, value in request.headers:
        size += len(name) + len(value) + 4
    return size


def _content_length(request: h11.Request) -> int:
    value = _header_value(request, b"content-length")
    try:
        return int(value) if value else 0
    except ValueError:  # pragma: no cover - h11 already refused a bad Content-Length
        return 0


def _header_value(request: h11.Request, name: bytes) -> bytes | None:
    for key, value in request.headers:
        if key == name:
            return bytes(value)
    return None


def _header_has(request: h11.Request, name: bytes, token: bytes) -> bool:
    for key, value in request.headers:
        if key == name and any(t.strip().lower() == token for t in value.split(b",")):
            return True
    return False


_ROUTES: dict[str, Callable[[HttpConnection, h11.Request], Reply]] = {
    "/": HttpConnection._index,
    "/index.html": HttpConnection._index,
    "/ws": HttpConnection._ws_without_upgrade,
    "/healthz": HttpConnection._healthz,
    "/metrics": HttpConnection._metrics,
    "/status/channels": HttpConnection._channels,
    "/status/sessions": HttpConnection._sessions,
}


def _route_label(request: h11.Request | None) -> str:
    """A bounded label for metrics: a known route, ``api``, ``static`` or ``other``."""
    if request is None:
        return "invalid"
    path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
    if path in _ROUTES:
        return path
    if path.startswith(api.PREFIX + "/"):
        return "api"
    return "static" if path.startswith("/static/") else "other"
