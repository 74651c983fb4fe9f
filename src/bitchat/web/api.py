"""The server API under ``/api/v1/``: users, groups, messages, exports, logouts, bans.

For a product's backend: JSON in and out on the server's port, authenticated with
API keys (``Authorization: Bearer <key>``): ``Settings.admin_token`` has every
scope, ``Settings.api_keys`` names keys with some. Keys are compared in constant
time; with no key configured at all the API answers 403 (it never opens itself
to anyone, loopback included).

One table, :data:`ROUTES`, says everything of an endpoint: method, path, scope,
its parameters' and body's JSON Schemas, its answer's. Requests are checked
against it (:mod:`jsonschema`) before a handler runs, and the OpenAPI 3.1
document at ``/api/v1/openapi.json`` is made from it, so the two cannot drift.

Handlers call the IM service (:class:`~bitchat.im.service.IMService`) and its
centers, so a message sent here is checked, stored and delivered as one a device
sends. Errors are ``{"error": {"code": ..., "message": ...}}`` with the wire
protocol's stable codes (:class:`~bitchat.errors.codes`), each with its HTTP
status (:data:`STATUS`). Nothing a client sends escapes as an exception: the
worst is a 500 ``internal_error``, logged once.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import orjson

from bitchat.errors import RequestError, codes
from bitchat.im.names import normalize_name
from bitchat.settings import API_SCOPES, Settings

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator

    from bitchat.im.service import IMService
    from bitchat.server import Server

log = logging.getLogger("bitchat.web.api")

PREFIX = "/api/v1"
OPENAPI_PATH = PREFIX + "/openapi.json"

STATUS: dict[str, int] = {
    codes.BAD_BODY: 400,
    codes.INVALID_PACKET: 400,
    codes.MESSAGE_TOO_LONG: 400,
    codes.UNAUTHENTICATED: 401,
    codes.LOGIN_FAILED: 401,
    codes.FORBIDDEN: 403,
    codes.NOT_MEMBER: 403,
    codes.BANNED: 403,
    codes.MUTED: 403,
    codes.BLOCKED: 403,
    codes.NOT_FOUND: 404,
    codes.METHOD_NOT_ALLOWED: 405,
    codes.NAME_TAKEN: 409,
    codes.GROUP_FULL: 409,
    codes.BODY_TOO_LARGE: 413,
    codes.QUOTA_EXCEEDED: 413,
    codes.BAD_CONTENT_TYPE: 415,
    codes.UPLOAD_TIMEOUT: 408,
    codes.RATE_LIMITED: 429,
    codes.LOGIN_THROTTLED: 429,
    codes.INTERNAL: 500,
    codes.NOT_IMPLEMENTED: 501,
    codes.UNAVAILABLE: 503,
    codes.OVERLOADED: 503,
}
"""The HTTP status of each error code (any other: 400)."""

_MAX_ID = (1 << 63) - 1
_ROLES = ("owner", "admin", "member")


def status_of(code: str) -> int:
    return STATUS.get(code, 400)


def error_body(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message}})


# -- the route table ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Param:
    """A path or query parameter, with its JSON Schema (integers are parsed first)."""

    name: str
    where: str  # "path" or "query"
    schema: Mapping[str, Any]
    description: str
    required: bool = True


@dataclass(slots=True)
class Call:
    """One checked request as a handler gets it."""

    api: Api
    params: dict[str, Any]
    body: Any
    key: str
    """The name of the key that authorized it (``admin_token`` for the admin token)."""

    @property
    def im(self) -> IMService:
        assert self.api.im is not None
        return self.api.im


Handler = Callable[[Call], Awaitable[Any]]


@dataclass(slots=True)
class Route:
    method: str
    path: str
    """As OpenAPI writes it: ``/api/v1/users/{user_id}``."""
    scope: str
    summary: str
    handler: Handler
    params: tuple[Param, ...] = ()
    body: Mapping[str, Any] | None = None
    response: Mapping[str, Any] = field(default_factory=dict)
    status: int = 200
    errors: tuple[int, ...] = ()
    """The error statuses it answers besides 400/401/403/503 (which any may)."""
    pattern: re.Pattern[str] = field(init=False)
    _validators: tuple[Draft202012Validator, Draft202012Validator | None] | None = field(
        init=False, default=None, repr=False
    )

    def __post_init__(self) -> None:
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.path)
        self.pattern = re.compile(regex + r"\Z")

    def validators(self) -> tuple[Draft202012Validator, Draft202012Validator | None]:
        """(parameters, body or None), made on the route's first request: jsonschema
        (about 5 MiB resident) is loaded only by a server whose API is used."""
        if self._validators is None:
            kind = _validator_class()
            props = {p.name: dict(p.schema) for p in self.params}
            required = [p.name for p in self.params if p.required]
            self._validators = (
                kind({"type": "object", "properties": props, "required": required}),
                None if self.body is None else kind(self.body),
            )
        return self._validators


@functools.cache
def _validator_class() -> type[Draft202012Validator]:
    from jsonschema import Draft202012Validator
    from jsonschema.validators import extend

    # "integer" means a JSON integer: 1.0 is a number, and no id.
    kind: type[Draft202012Validator] = extend(
        Draft202012Validator,
        type_checker=Draft202012Validator.TYPE_CHECKER.redefine(
            "integer", lambda checker, value: type(value) is int
        ),
    )
    return kind


def _id(description: str) -> dict[str, Any]:
    return {"type": "integer", "minimum": 1, "maximum": _MAX_ID, "description": description}


def _path_id(name: str, what: str) -> Param:
    return Param(name, "path", _id(f"the {what}'s id"), f"The {what}'s id.")


def _obj(props: Mapping[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": dict(props),
        "required": list(required),
        "additionalProperties": False,
    }


def _out(props: Mapping[str, Any]) -> dict[str, Any]:
    # Answers may grow fields: clients must ignore those they do not know.
    return {"type": "object", "properties": dict(props), "required": list(props)}


_INT = {"type": "integer"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_OK = _out({"ok": _BOOL})
USER = _out({"id": _INT, "name": _STR, "banned": _BOOL})
GROUP = _out(
    {
        "id": _INT,
        "name": _STR,
        "owner_id": _INT,
        "members": _INT,
        "member_ids": {"type": "array", "items": _INT},
        "invite_only": _BOOL,
        "history_visible": _BOOL,
    }
)
MESSAGE = _out(
    {
        "msg_id": _INT,
        "kind": {"type": "string", "enum": ["p2p", "group"]},
        "sender_id": _INT,
        "sender_name": _STR,
        "to": _INT,
        "text": _STR,
        "ts": _INT,
        "client_msg_id": _STR,
        "seq": _INT,
        "no": _INT,
    }
)
"""A message; an edited, recalled, typed or replying one, or an event (``op``), carries
more (README "Messages that live"): ``op``, ``target``, ``type``, ``fields``, ..."""
CONVERSATION = _out(
    {
        "kind": {"type": "string", "enum": ["p2p", "group"]},
        "peer_id": _INT,
        "group_id": _INT,
        "name": _STR,
        "last_seq": _INT,
        "read_seq": _INT,
        "unread": _INT,
        "mentions": _INT,
        "peer_read_seq": _INT,
        "peer_delivered_seq": _INT,
        "activity": _INT,
        "last_message": {"anyOf": [MESSAGE, {"type": "null"}]},
    }
)
ERROR = _out(
    {
        "error": _out(
            {
                "code": {"type": "string", "description": "a stable code (as the wire's)"},
                "message": _STR,
            }
        )
    }
)


# -- handlers -------------------------------------------------------------------------------


async def _user_out(call: Call, user_id: int) -> dict[str, Any]:
    user = await call.im.users.get_user(user_id)
    if user is None:
        raise RequestError(codes.NOT_FOUND, f"no user {user_id}")
    banned = await call.im.users.is_server_banned(user.id)
    return {"id": user.id, "name": user.name, "banned": banned}


async def create_user(call: Call) -> dict[str, Any]:
    im, body = call.im, call.body
    name = normalize_name(body["name"], im.settings.max_name_length)
    if "password" in body:
        password = body["password"]
        im.check_password(password)
    else:
        # No password: an account only the API sends as (a bot); no password matches it.
        password = secrets.token_urlsafe(32)
    user = await im.users.register(name, password)
    return {"id": user.id, "name": user.name, "banned": False}


async def get_user(call: Call) -> dict[str, Any]:
    return await _user_out(call, call.params["user_id"])


async def find_user(call: Call) -> dict[str, Any]:
    asked: str = call.params["name"]
    try:
        name = normalize_name(asked, call.im.settings.max_name_length)
    except RequestError:
        name = ""  # no user has a name that breaks the rules (nor is it sent to a store)
    found = await call.im.users.credentials(name) if name else None
    if found is None:
        raise RequestError(codes.NOT_FOUND, f"no user named {asked[:64]!r}")
    return await _user_out(call, found[0])


async def _group_out(call: Call, group_id: int) -> dict[str, Any]:
    g = await call.im.users.get_group(group_id)
    if g is None:
        raise RequestError(codes.NOT_FOUND, f"no group {group_id}")
    members = await call.im.users.group_members(group_id)
    return {
        "id": g.id,
        "name": g.name,
        "owner_id": g.owner_id,
        "members": len(members),
        "member_ids": members,
        "invite_only": g.invite_only,
        "history_visible": g.history_visible,
    }


async def _need_user(call: Call, user_id: int) -> None:
    if await call.im.users.get_user(user_id) is None:
        raise RequestError(codes.NOT_FOUND, f"no user {user_id}")


async def create_group(call: Call) -> dict[str, Any]:
    owner = call.body["owner_id"]
    await _need_user(call, owner)
    g = await call.im.create_group(owner, call.body["name"])
    return await _group_out(call, g.id)


async def get_group(call: Call) -> dict[str, Any]:
    return await _group_out(call, call.params["group_id"])


async def add_member(call: Call) -> dict[str, Any]:
    group_id, user_id = call.params["group_id"], call.body["user_id"]
    await _need_user(call, user_id)
    await call.im.moderation.add_member(0, group_id, user_id)
    return await _group_out(call, group_id)


async def remove_member(call: Call) -> dict[str, Any]:
    await call.im.moderation.remove_by_server(call.params["group_id"], call.params["user_id"])
    return {"ok": True}


async def set_role(call: Call) -> dict[str, Any]:
    group_id, user_id = call.params["group_id"], call.params["user_id"]
    # Actor 0: the server API, with the owner's rights.
    await call.im.moderation.set_role(0, group_id, user_id, call.body["role"])
    return {"ok": True}


async def ban_member(call: Call) -> dict[str, Any]:
    group_id, user_id = call.params["group_id"], call.body["user_id"]
    await call.im.moderation.ban(0, group_id, user_id, True)
    return {"ok": True}


async def unban_member(call: Call) -> dict[str, Any]:
    await call.im.moderation.ban(0, call.params["group_id"], call.params["user_id"], False)
    return {"ok": True}


async def mute_member(call: Call) -> dict[str, Any]:
    group_id, user_id = call.params["group_id"], call.params["user_id"]
    until = await call.im.moderation.mute(0, group_id, user_id, call.body["seconds"])
    return {"muted_until": until}


async def set_options(call: Call) -> dict[str, Any]:
    body = call.body
    await call.im.moderation.set_options(
        0, call.params["group_id"], body.get("invite_only"), body.get("history_visible")
    )
    return await _group_out(call, call.params["group_id"])


async def create_invite(call: Call) -> dict[str, Any]:
    body = call.body
    invite = await call.im.moderation.create_invite(
        0, call.params["group_id"], body.get("ttl", 0), body.get("max_uses", 0)
    )
    return {
        "code": invite.code,
        "group_id": invite.group_id,
        "expires_at": invite.expires_at,
        "max_uses": invite.max_uses,
    }


async def join_requests(call: Call) -> dict[str, Any]:
    return {"requests": await call.im.moderation.join_requests(0, call.params["group_id"])}


async def answer_request(call: Call) -> dict[str, Any]:
    group_id, user_id = call.params["group_id"], call.params["user_id"]
    await call.im.moderation.answer_request(0, group_id, user_id, call.body["approve"])
    return {"ok": True}


async def block_user(call: Call) -> dict[str, Any]:
    await _need_user(call, call.params["user_id"])
    await call.im.moderation.block(call.params["user_id"], call.body["user_id"], True)
    return {"ok": True}


async def unblock_user(call: Call) -> dict[str, Any]:
    await _need_user(call, call.params["user_id"])
    await call.im.moderation.block(call.params["user_id"], call.params["other_id"], False)
    return {"ok": True}


async def blocked_users(call: Call) -> dict[str, Any]:
    await _need_user(call, call.params["user_id"])
    users = await call.im.moderation.blocked(call.params["user_id"])
    return {"users": [{"id": u.id, "name": u.name} for u in users]}


async def send_message(call: Call) -> dict[str, Any]:
    body = call.body
    ack = await call.im.send_as(
        body["from"],
        body.get("to", 0),
        body.get("group_id", 0),
        body["text"],
        body.get("client_msg_id", ""),
    )
    return {"msg_id": ack.msg_id, "ts": ack.ts, "seq": ack.seq, "duplicate": ack.duplicate}


async def conversations(call: Call) -> dict[str, Any]:
    user_id = call.params["user_id"]
    await _need_user(call, user_id)
    s = call.im.settings
    limit = min(call.params.get("limit", s.conversations_max_page), s.conversations_max_page)
    convs = await call.im.messages.conversations(user_id, call.params.get("before", 0), limit + 1)
    page = convs[:limit]
    return {
        "conversations": [c.to_dict() for c in page],
        "more": len(convs) > limit,
        "next_before": page[-1].activity if len(convs) > limit else None,
    }


async def history(call: Call) -> dict[str, Any]:
    p, im = call.params, call.im
    user_id, peer_id, group_id = p.get("user_id", 0), p.get("peer_id", 0), p.get("group_id", 0)
    if bool(peer_id) == bool(group_id):
        raise RequestError(codes.INVALID_PACKET, "name either peer_id or group_id")
    if peer_id:
        if not user_id:
            raise RequestError(codes.INVALID_PACKET, "a one-to-one history needs user_id")
        await _need_user(call, user_id)
        await _need_user(call, peer_id)
    else:
        if await im.users.get_group(group_id) is None:
            raise RequestError(codes.NOT_FOUND, f"no group {group_id}")
        if user_id and user_id not in await im.users.group_members(group_id):
            raise RequestError(codes.NOT_MEMBER, f"user {user_id} is not in group {group_id}")
    limit = min(p.get("limit", im.settings.history_max_page), im.settings.history_max_page)
    msgs = await im.messages.history(user_id, peer_id, group_id, p.get("before", 0), limit + 1)
    page = msgs[:limit]
    more = len(msgs) > limit
    return {
        "messages": [m.to_dict() for m in page],
        "more": more,
        "next_before": page[-1].id if more else None,
    }


async def logout(call: Call) -> dict[str, Any]:
    user_id = call.params["user_id"]
    await _need_user(call, user_id)
    revoked = await call.im.log_out_everywhere(
        user_id, codes.LOGGED_OUT, "logged out by the server"
    )
    return {"ok": True, "revoked_tokens": revoked}


async def ban(call: Call) -> dict[str, Any]:
    await call.im.set_banned(call.params["user_id"], True)
    return await _user_out(call, call.params["user_id"])


async def unban(call: Call) -> dict[str, Any]:
    await call.im.set_banned(call.params["user_id"], False)
    return await _user_out(call, call.params["user_id"])


def _page(what: str, most: str) -> tuple[Param, Param]:
    return (
        Param(
            "before",
            "query",
            {"type": "integer", "minimum": 0, "maximum": _MAX_ID},
            f"Only {what} older than this (the answer's next_before); 0 or none: the newest.",
            required=False,
        ),
        Param(
            "limit",
            "query",
            {"type": "integer", "minimum": 1, "maximum": _MAX_ID},
            f"At most this many (and at most the setting {most}).",
            required=False,
        ),
    )


_TEXT = {"type": "string", "minLength": 1, "description": "at most max_message_length characters"}

ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        PREFIX + "/users",
        "users:write",
        "Create a user (without a password: one only the API sends as, a bot).",
        create_user,
        body=_obj({"name": _STR, "password": _STR}, ("name",)),
        response=USER,
        status=201,
        errors=(409,),
    ),
    Route(
        "GET",
        PREFIX + "/users",
        "users:read",
        "Look a user up by name (as logins match names: case and look-alikes aside).",
        find_user,
        params=(Param("name", "query", {"type": "string"}, "The user's name."),),
        response=USER,
        errors=(404,),
    ),
    Route(
        "GET",
        PREFIX + "/users/{user_id}",
        "users:read",
        "Look a user up by id.",
        get_user,
        params=(_path_id("user_id", "user"),),
        response=USER,
        errors=(404,),
    ),
    Route(
        "GET",
        PREFIX + "/users/{user_id}/conversations",
        "messages:read",
        "The user's conversations, most recent activity first.",
        conversations,
        params=(_path_id("user_id", "user"), *_page("conversations", "conversations_max_page")),
        response=_out(
            {
                "conversations": {"type": "array", "items": CONVERSATION},
                "more": _BOOL,
                "next_before": {"type": ["integer", "null"]},
            }
        ),
        errors=(404,),
    ),
    Route(
        "POST",
        PREFIX + "/users/{user_id}/logout",
        "admin",
        "Log the user out everywhere: revoke every device's token, close every connection.",
        logout,
        params=(_path_id("user_id", "user"),),
        response=_out({"ok": _BOOL, "revoked_tokens": _INT}),
        errors=(404,),
    ),
    Route(
        "POST",
        PREFIX + "/users/{user_id}/ban",
        "admin",
        "Ban the user from the server: logged out everywhere, logins refused (banned).",
        ban,
        params=(_path_id("user_id", "user"),),
        response=USER,
        errors=(404,),
    ),
    Route(
        "DELETE",
        PREFIX + "/users/{user_id}/ban",
        "admin",
        "Lift the user's ban.",
        unban,
        params=(_path_id("user_id", "user"),),
        response=USER,
        errors=(404,),
    ),
    Route(
        "POST",
        PREFIX + "/groups",
        "groups:write",
        "Create a group; its owner is its first member.",
        create_group,
        body=_obj({"owner_id": _id("the owner's user id"), "name": _STR}, ("owner_id", "name")),
        response=GROUP,
        status=201,
        errors=(404,),
    ),
    Route(
        "GET",
        PREFIX + "/groups/{group_id}",
        "groups:read",
        "A group and its members.",
        get_group,
        params=(_path_id("group_id", "group"),),
        response=GROUP,
        errors=(404,),
    ),
    Route(
        "POST",
        PREFIX + "/groups/{group_id}/members",
        "groups:write",
        "Add a user to a group (adding a member again is harmless).",
        add_member,
        params=(_path_id("group_id", "group"),),
        body=_obj({"user_id": _id("the user to add")}, ("user_id",)),
        response=GROUP,
        errors=(404, 409),
    ),
    Route(
        "DELETE",
        PREFIX + "/groups/{group_id}/members/{user_id}",
        "groups:write",
        "Remove a user from a group.",
        remove_member,
        params=(_path_id("group_id", "group"), _path_id("user_id", "user")),
        response=_OK,
        errors=(404,),
    ),
    Route(
        "PUT",
        PREFIX + "/groups/{group_id}/members/{user_id}/role",
        "groups:write",
        "Set a member's role (owner transfers the ownership).",
        set_role,
        params=(_path_id("group_id", "group"), _path_id("user_id", "user")),
        body=_obj({"role": {"type": "string", "enum": list(_ROLES)}}, ("role",)),
        response=_OK,
        errors=(404,),
    ),
    Route(
        "POST",
        PREFIX + "/groups/{group_id}/bans",
        "groups:write",
        "Ban a user from a group (removed if a member; later joins refused with banned).",
        ban_member,
        params=(_path_id("group_id", "group"),),
        body=_obj({"user_id": _id("the user to ban")}, ("user_id",)),
        response=_OK,
        errors=(404,),
    ),
    Route(
        "DELETE",
        PREFIX + "/groups/{group_id}/bans/{user_id}",
        "groups:write",
        "Lift a user's ban from a group.",
        unban_member,
        params=(_path_id("group_id", "group"), _path_id("user_id", "user")),
        response=_OK,
        errors=(404,),
    ),
    Route(
        "PUT",
        PREFIX + "/groups/{group_id}/members/{user_id}/mute",
        "groups:write",
        "Mute a member for some seconds (0 unmutes): their group messages are refused.",
        mute_member,
        params=(_path_id("group_id", "group"), _path_id("user_id", "user")),
        body=_obj(
            {
                "seconds": {
                    "type": "integer",
                    "minimum": 0,
                    "maximum": _MAX_ID,
                    "description": "at most max_mute_seconds; 0 unmutes",
                }
            },
            ("seconds",),
        ),
        response=_out({"muted_until": _INT}),
        errors=(404,),
    ),
    Route(
        "PUT",
        PREFIX + "/groups/{group_id}/options",
        "groups:write",
        "Set a group's options: invite_only, history_visible (to new members).",
        set_options,
        params=(_path_id("group_id", "group"),),
        body=_obj({"invite_only": _BOOL, "history_visible": _BOOL}),
        response=GROUP,
        errors=(404,),
    ),
    Route(
        "POST",
        PREFIX + "/groups/{group_id}/invites",
        "groups:write",
        "Create an invite code (JoinGroup's invite): ttl seconds (0: the setting invite_ttl), "
        "max_uses (0: unlimited).",
        create_invite,
        params=(_path_id("group_id", "group"),),
        body=_obj(
            {
                "ttl": {"type": "integer", "minimum": 0, "maximum": _MAX_ID},
                "max_uses": {"type": "integer", "minimum": 0, "maximum": _MAX_ID},
            }
        ),
        response=_out({"code": _STR, "group_id": _INT, "expires_at": _INT, "max_uses": _INT}),
        status=201,
        errors=(404,),
    ),
    Route(
        "GET",
        PREFIX + "/groups/{group_id}/requests",
        "groups:read",
        "The join requests waiting in an invite-only group.",
        join_requests,
        params=(_path_id("group_id", "group"),),
        response=_out(
            {
                "requests": {
                    "type": "array",
                    "items": _out({"user_id": _INT, "name": _STR, "ts": _INT}),
                }
            }
        ),
        errors=(404,),
    ),
    Route(
        "POST",
        PREFIX + "/groups/{group_id}/requests/{user_id}",
        "groups:write",
        "Approve or deny a join request.",
        answer_request,
        params=(_path_id("group_id", "group"), _path_id("user_id", "user")),
        body=_obj({"approve": _BOOL}, ("approve",)),
        response=_OK,
        errors=(404, 409),
    ),
    Route(
        "GET",
        PREFIX + "/users/{user_id}/blocks",
        "users:read",
        "The users a user blocks.",
        blocked_users,
        params=(_path_id("user_id", "user"),),
        response=_out({"users": {"type": "array", "items": _out({"id": _INT, "name": _STR})}}),
        errors=(404,),
    ),
    Route(
        "POST",
        PREFIX + "/users/{user_id}/blocks",
        "users:write",
        "A user blocks another: no messages either way, no presence to the blocked one.",
        block_user,
        params=(_path_id("user_id", "user"),),
        body=_obj({"user_id": _id("the user to block")}, ("user_id",)),
        response=_OK,
        errors=(404,),
    ),
    Route(
        "DELETE",
        PREFIX + "/users/{user_id}/blocks/{other_id}",
        "users:write",
        "Lift a block.",
        unblock_user,
        params=(_path_id("user_id", "user"), _path_id("other_id", "blocked user")),
        response=_OK,
        errors=(404,),
    ),
    Route(
        "POST",
        PREFIX + "/messages",
        "messages:write",
        "Send a message as a user (or a bot account): to a user (to) or a group (group_id).",
        send_message,
        body={
            **_obj(
                {
                    "from": _id("the sender's user id"),
                    "to": _id("the recipient's user id"),
                    "group_id": _id("the group's id"),
                    "text": _TEXT,
                    "client_msg_id": {
                        "type": "string",
                        "description": "deduplicates retries (at most max_client_msg_id_length)",
                    },
                },
                ("from", "text"),
            ),
            "oneOf": [{"required": ["to"]}, {"required": ["group_id"]}],
        },
        response=_out({"msg_id": _INT, "ts": _INT, "seq": _INT, "duplicate": _BOOL}),
        status=201,
        errors=(404,),
    ),
    Route(
        "GET",
        PREFIX + "/conversations/history",
        "messages:read",
        "A conversation's messages, newest first, in pages (export): a user's one-to-one "
        "conversation with peer_id, or a group's (as user_id if given: a member).",
        history,
        params=(
            Param("user_id", "query", _id("whose conversation"), "Whose conversation.", False),
            Param("peer_id", "query", _id("the other user"), "The other user.", False),
            Param("group_id", "query", _id("the group"), "The group.", False),
            *_page("messages", "history_max_page"),
        ),
        response=_out(
            {
                "messages": {"type": "array", "items": MESSAGE},
                "more": _BOOL,
                "next_before": {"type": ["integer", "null"]},
            }
        ),
        errors=(404,),
    ),
)


# -- answering ------------------------------------------------------------------------------


class ApiReply:
    """Status, JSON body, extra headers."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None):
        self.status = status
        self.body = body
        self.headers = headers or []


def error_reply(code: str, message: str, status: int = 0) -> ApiReply:
    status = status or status_of(code)
    headers = [(b"www-authenticate", b'Bearer realm="bitchat"')] if status == 401 else []
    return ApiReply(status, error_body(code, message), headers)


class Api:
    """The server API of one server (``server.web.api``)."""

    def __init__(self, server: Server, im: IMService | None) -> None:
        self.server = server
        self.im = im
        self.settings: Settings = server.settings
        self._document: bytes | None = None
        s = self.settings
        self._keys = [
            (name, _digest(entry["key"]), frozenset(entry.get("scopes", ())))
            for name, entry in s.api_keys.items()
        ]
        """Each key's name, digest and scopes (the digests are what is compared)."""
        if s.admin_token:
            self._keys.append(("admin_token", _digest(s.admin_token), frozenset(API_SCOPES)))

    # -- keys ---------------------------------------------------------------------------------

    def authorize(self, authorization: bytes | None, scope: str) -> ApiReply | str:
        """The key's name, or the refusal."""
        keys = self._keys
        if not keys:
            return error_reply(
                codes.FORBIDDEN,
                "the server API is off: no admin_token or api_keys is configured",
            )
        scheme, _, given = (authorization or b"").decode("latin-1").partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            return error_reply(codes.UNAUTHENTICATED, "send Authorization: Bearer <API key>")
        digest = _digest(given)
        found: tuple[str, frozenset[str]] | None = None
        for name, key, scopes in keys:  # every key compared: the time tells nothing
            if hmac.compare_digest(digest, key):
                found = (name, scopes)
        if found is None:
            return error_reply(codes.UNAUTHENTICATED, "unknown API key")
        if scope not in found[1]:
            return error_reply(codes.FORBIDDEN, f"the key {found[0]!r} lacks the scope {scope}")
        return found[0]

    # -- requests -----------------------------------------------------------------------------

    def handle(
        self, method: bytes, path: str, query: str, authorization: bytes | None, body: bytes
    ) -> ApiReply | Awaitable[ApiReply]:
        """Answer one request of ``/api/...``: at once when it is refused, else later."""
        if path == OPENAPI_PATH:
            if method not in (b"GET", b"HEAD"):
                return _not_allowed(["GET", "HEAD"])
            return ApiReply(200, self.document())
        meth = "GET" if method == b"HEAD" else method.decode("ascii", "replace")
        allowed: list[str] = []
        for route in ROUTES:
            m = route.pattern.match(path)
            if m is None:
                continue
            if route.method != meth:
                allowed.append(route.method)
                continue
            return self._start(route, m.groupdict(), query, authorization, body)
        if allowed:
            if "GET" in allowed:
                allowed.append("HEAD")
            return _not_allowed(allowed)
        return error_reply(codes.NOT_FOUND, f"no endpoint {path}")

    def _start(
        self,
        route: Route,
        path_args: dict[str, str],
        query: str,
        authorization: bytes | None,
        body: bytes,
    ) -> ApiReply | Awaitable[ApiReply]:
        who = self.authorize(authorization, route.scope)
        if isinstance(who, ApiReply):
            return who
        if self.im is None:
            return error_reply(codes.NOT_IMPLEMENTED, "this server has no IM service")
        try:
            params = _params(route, path_args, query)
            data = _body(route, body)
        except RequestError as exc:
            return error_reply(exc.code, exc.message)
        return self._run(route, Call(self, params, data, who))

    async def _run(self, route: Route, call: Call) -> ApiReply:
        try:
            out = await route.handler(call)
        except RequestError as exc:
            return error_reply(exc.code, exc.message)
        except Exception:
            log.exception("API %s %s failed", route.method, route.path)
            return error_reply(codes.INTERNAL, "the server failed to answer this request")
        return ApiReply(route.status, orjson.dumps(out))

    # -- the OpenAPI document -----------------------------------------------------------------

    def document(self) -> bytes:
        if self._document is None:
            self._document = orjson.dumps(openapi(), option=orjson.OPT_INDENT_2)
        return self._document


def _digest(key: str) -> bytes:
    # Equal lengths for compare_digest, whatever key is sent.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _not_allowed(methods: list[str]) -> ApiReply:
    allow = ", ".join(dict.fromkeys(methods))
    reply = error_reply(codes.METHOD_NOT_ALLOWED, f"allowed here: {allow}")
    reply.headers.append((b"allow", allow.encode()))
    return reply


def _params(route: Route, path_args: dict[str, str], query: str) -> dict[str, Any]:
    raw: dict[str, str] = dict(path_args)
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False, errors="strict")
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(codes.INVALID_PACKET, f"bad query string: {exc}") from None
    known = {p.name for p in route.params if p.where == "query"}
    for name, value in pairs:
        if name in known:
            raw.setdefault(name, value)
    values: dict[str, Any] = {}
    for p in route.params:
        if p.name not in raw:
            continue
        text = raw[p.name]
        if p.schema.get("type") == "integer":
            if not re.fullmatch(r"-?[0-9]{1,20}", text):
                raise RequestError(codes.INVALID_PACKET, f"{p.name}: expected an integer")
            values[p.name] = int(text)
        else:
            values[p.name] = text
    _check(route.validators()[0], values, "parameter")
    return values


def _body(route: Route, body: bytes) -> Any:
    validator = route.validators()[1]
    if validator is None:
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(codes.BAD_BODY, f"the body is not JSON: {exc}") from None
    _check(validator, data, "body")
    return data


def _check(validator: Draft202012Validator, value: Any, what: str) -> None:
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(value))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path)
        message = error.message if len(error.message) <= 200 else error.message[:200] + "..."
        raise RequestError(
            codes.INVALID_PACKET, f"{what} {where}: {message}" if where else f"{what}: {message}"
        )


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of :data:`ROUTES`."""
    import bitchat  # the package imports the web layer: its version is read here

    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        responses: dict[str, Any] = {
            str(route.status): {
                "description": "done",
                "content": {"application/json": {"schema": route.response}},
            }
        }
        for status in sorted({400, 401, 403, 503, *route.errors}):
            responses[str(status)] = {
                "description": _ERROR_DESCRIPTIONS.get(status, "refused"),
                "content": {"application/json": {"schema": ERROR}},
            }
        op: dict[str, Any] = {
            "operationId": route.handler.__name__,
            "summary": route.summary,
            "security": [{"apiKey": [route.scope]}],
            "x-scope": route.scope,
            "responses": responses,
        }
        if route.params:
            op["parameters"] = [
                {
                    "name": p.name,
                    "in": p.where,
                    "required": p.required or p.where == "path",
                    "description": p.description,
                    "schema": dict(p.schema),
                }
                for p in route.params
            ]
        if route.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": dict(route.body)}},
            }
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "bitchat server API",
            "version": bitchat.__version__,
            "description": (
                "Authenticate with Authorization: Bearer <key> (the admin token, or a key "
                "of api_keys with the operation's scope, x-scope). Errors are "
                '{"error": {"code": ..., "message": ...}} with the wire protocol\'s codes.'
            ),
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "scopes: " + ", ".join(API_SCOPES),
                }
            },
            "schemas": {"Error": ERROR, "User": USER, "Group": GROUP, "Message": MESSAGE},
        },
    }


_ERROR_DESCRIPTIONS = {
    400: "bad input (bad_body, invalid_packet, message_too_long)",
    401: "no key, or an unknown one (unauthenticated)",
    403: "the key lacks the scope, or the API is off (forbidden); not_member; banned",
    404: "no such user or group (not_found)",
    409: "name_taken, group_full",
    501: "not_implemented",
    503: "a backing store is down (unavailable)",
}
