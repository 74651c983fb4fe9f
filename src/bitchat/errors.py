"""The one exception tree of bitchat.

::

    BitchatError
     ├── ProtocolError          the peer sent bytes that break the wire protocol
     ├── UsageError             the API was misused (e.g. a duplicate packet type)
     │    └── ConfigError       a setting is unknown, of the wrong type or out of
     │                          range; names the key and where it came from
     ├── RequestError           a request failed with a stable ``code``; raised by
     │    │                     handlers (sent to the peer as an Error packet) and
     │    │                     by ``Client.request`` when an Error comes back
     │    └── ServiceUnavailable  a backing store is down; retry later
     ├── RequestTimeout         no response in time (also a ``TimeoutError``)
     ├── ConnectionClosed       the connection went away before the answer came
     │    │                     (also a ``ConnectionError``)
     │    └── TLSError          TLS cannot be agreed with the server (its
     │                          certificate is refused, or one side speaks TLS
     │                          and the other does not); the client stops retrying
     ├── bitchat.cluster.registry.NodeIdInUse
     │                          another live node of the cluster has this node id
     └── bitchat.bench.loadgen.BenchRequestError
                                a bench set-up request (login, join) was refused

Classes named with a module live there, next to the code that raises them.
Every exception class of the package is in this tree (a test walks the modules),
private ones too: ``bitchat.protocol.packets._Invalid`` (a field value that fails
validation, always turned into a ``ProtocolError``) under ``BitchatError``, and
``bitchat.cli.repl._Usage`` (a mistyped REPL command) under ``UsageError``, and
``bitchat.cluster.pg._Stored`` (rows a batch numbered were stored already: its
transaction is rolled back and tried again) and ``bitchat.cluster.pg._LostRace``
(another node mapped an external identity first: the transaction that made a
user for it is rolled back) under ``BitchatError``.

Error codes carried by Error packets are stable strings, listed in ``codes``.
"""

from __future__ import annotations


class codes:
    """Stable error codes sent in Error packets (clients may branch on them)."""

    # Framing: the connection is closed after these.
    BAD_MAGIC = "bad_magic"
    BAD_VERSION = "bad_version"
    BAD_SERIALIZER = "bad_serializer"
    BAD_FLAGS = "bad_flags"
    FRAME_TOO_LARGE = "frame_too_large"
    BAD_MESSAGE = "bad_message"  # a WebSocket message that is not exactly one frame
    # Request level: the connection stays open.
    BAD_BODY = "bad_body"
    INVALID_PACKET = "invalid_packet"
    UNKNOWN_TYPE = "unknown_type"
    NO_HANDLER = "no_handler"
    INTERNAL = "internal_error"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"
    # IM level.
    UNAUTHENTICATED = "unauthenticated"
    LOGIN_FAILED = "login_failed"
    NAME_TAKEN = "name_taken"
    NOT_FOUND = "not_found"
    NOT_MEMBER = "not_member"
    FORBIDDEN = "forbidden"
    MESSAGE_TOO_LONG = "message_too_long"
    GROUP_FULL = "group_full"
    RATE_LIMITED = "rate_limited"
    LOGIN_THROTTLED = "login_throttled"  # too many failed logins: the message says how long
    NO_SERVER = "no_server"
    BANNED = "banned"  # banned from the server (a login, an API send) or from a group
    MUTED = "muted"  # muted in the group: the message says until when
    BLOCKED = "blocked"  # one of the two users blocks the other
    BAD_INVITE = "bad_invite"  # an unknown, expired or used-up invite code
    WINDOW_PASSED = "window_passed"  # an edit or recall after its window
    RECALLED = "recalled"  # editing or reacting to a recalled message
    TOO_MANY_REACTIONS = "too_many_reactions"  # one emoji more than a message may carry
    BAD_TYPE = "bad_type"  # a message type the server does not know
    BAD_FIELDS = "bad_fields"  # a typed message's fields fail its schema
    # HTTP API level (/api/v1/): the codes above, and these.
    NOT_IMPLEMENTED = "not_implemented"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    BODY_TOO_LARGE = "body_too_large"
    QUOTA_EXCEEDED = "quota_exceeded"  # an upload past the user's file quota
    BAD_CONTENT_TYPE = "bad_content_type"  # an upload's type not allowed, or not its bytes
    UPLOAD_TIMEOUT = "upload_timeout"  # an upload's body took over file_upload_timeout
    # Why the server closes a connection (an Error push, request id 0, just before).
    IDLE_TIMEOUT = "idle_timeout"
    FRAME_TIMEOUT = "frame_timeout"
    LOGIN_TIMEOUT = "login_timeout"
    LOGGED_OUT = "logged_out"  # the server API logged the user out everywhere


class BitchatError(Exception):
    """Root of every exception bitchat raises on purpose."""


class ProtocolError(BitchatError):
    """The peer broke the wire protocol.

    ``fatal`` errors lose the framing: the connection must be closed. Non-fatal
    ones concern one request (``request_id``) and the connection stays usable.
    """

    def __init__(self, code: str, message: str, *, fatal: bool = True, request_id: int = 0):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.fatal = fatal
        self.request_id = request_id


class UsageError(BitchatError):
    """The API was used in a way it does not allow."""


class ConfigError(UsageError):
    """A setting is unknown, of the wrong type or out of range.

    The message names the key and where its value came from, e.g.
    ``bitchat.toml: max_message_length: expected an integer >= 1, got "abc"``.
    """


class RequestError(BitchatError):
    """A request failed with a stable error ``code`` and a human ``message``."""

    def __init__(self, code: str, message: str = ""):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class ServiceUnavailable(RequestError):
    """A backing service (database, Redis) is unreachable; nothing was done."""

    def __init__(self, message: str = "a backing service is unavailable, retry later"):
        super().__init__(codes.UNAVAILABLE, message)


class RequestTimeout(BitchatError, TimeoutError):
    """No response arrived within the request's timeout."""


class ConnectionClosed(BitchatError, ConnectionError):
    """The connection closed (or was never open) while an answer was awaited."""


class TLSError(ConnectionClosed):
    """TLS cannot be agreed with the server, so connecting again cannot help.

    ``reason`` says which way, and ``str()`` names the cause:

    - ``CERTIFICATE``: the server's certificate was refused
      (``certificate verify failed: self-signed certificate``);
    - ``SERVER_SPEAKS_TLS``: a client without TLS reached a TLS port;
    - ``SERVER_SPEAKS_PLAIN``: a TLS client reached a port without TLS.

    The client raises it from ``connect()`` (or, when it happens on a reconnect,
    from every request), and stops reconnecting.
    """

    CERTIFICATE = "certificate"
    SERVER_SPEAKS_TLS = "server_speaks_tls"
    SERVER_SPEAKS_PLAIN = "server_speaks_plain"

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message
