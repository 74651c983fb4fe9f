"""The status API (as the original's REST API): who is connected, who is logged in.

``GET /status/channels`` lists every bitchat connection (TCP and WebSocket),
``GET /status/sessions`` the logged-in ones, ``GET /healthz`` says the server
is up. Times are Unix seconds. ``/status/*`` is for operators: with
``Settings.admin_token`` set it needs ``Authorization: Bearer <token>``;
without one it answers loopback clients only.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from bitchat.server import Server


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback addresses."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def authorize(
    admin_token: str | None, authorization: bytes | None, peer_host: str
) -> tuple[int, str] | None:
    """None when the request may see /status/*, else (HTTP status, reason)."""
    if admin_token:
        scheme, _, given = (authorization or b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return 401, "this endpoint needs Authorization: Bearer <admin token>"
        if not hmac.compare_digest(given.strip().encode(), admin_token.encode()):
            return 403, "wrong admin token"
        return None
    if not is_loopback(peer_host):
        return 403, "no admin token is configured: /status/* answers loopback clients only"
    return None


def channels(server: Server) -> dict[str, Any]:
    """Every connection: id, remote address, transport, user, since when, bytes in/out."""
    rows = [_rounded(s.info()) for s in sorted(server.sessions.values(), key=lambda s: s.id)]
    return {"node": server.settings.node_id, "count": len(rows), "channels": rows}


def sessions(server: Server) -> dict[str, Any]:
    """The logged-in connections, by user (a user may be on several devices)."""
    rows = [
        {
            "session_id": s.id,
            "user_id": s.user_id,
            "user_name": s.user_name,
            "transport": s.transport_name,
            "remote": s.remote,
            "login_at": round(s.login_at, 3) if s.login_at else None,
            "connected_since": round(s.connected_at, 3),
        }
        for s in sorted(server.sessions.values(), key=lambda s: (s.user_id or 0, s.id))
        if s.user_id is not None
    ]
    users = len({r["user_id"] for r in rows})
    return {"node": server.settings.node_id, "count": len(rows), "users": users, "sessions": rows}


def health(server: Server) -> dict[str, Any]:
    return {
        "status": "ok",
        "mode": server.mode,
        "connections": len(server.sessions),
        "time": round(time.time(), 3),
    }


def _rounded(info: dict[str, Any]) -> dict[str, Any]:
    since = info.get("connected_since")
    if isinstance(since, float):
        info["connected_since"] = round(since, 3)
    return info
