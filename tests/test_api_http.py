"""The server API under /api/v1/ through real sockets: keys and scopes, every endpoint
with good and bad input, delivery of what it sends, logouts and bans (in both modes),
answers in request order on a keep-alive connection, the stores' upgrade to bans.

(tests/test_api.py is about the Python package's public API.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from openapi_spec_validator import validate

from bitchat import RequestError, Server
from bitchat.client import State
from bitchat.cluster import pg
from bitchat.cluster.pg import PgDatabase, PgUserCenter
from bitchat.config import load_settings
from bitchat.errors import ConfigError, codes
from bitchat.im import sql
from bitchat.im import sqlite as store
from bitchat.im.client import IMClient
from bitchat.im.sqlite import SqliteUserCenter
from bitchat.web import api
from cluster_support import (  # noqa: F401 (fixtures)
    cluster_settings,
    node_maker,
    pg_dsn_fixture,
    pg_schema_at,
    redis_prefix_fixture,
)
from conftest import WAIT
from im_helpers import Clients, Inbox, clients_of, im_server, port_of

ADMIN = "admin-token-0123456789"
KEYS = {
    "reader": {"key": "reader-key-0123456789", "scopes": ["users:read"]},
    "bot": {"key": "bot-key-0123456789abc", "scopes": ["messages:write", "users:read"]},
}


def auth(key: str = ADMIN) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with im_server(tmp_path, admin_token=ADMIN, api_keys=KEYS, max_group_size=3) as s:
        yield s


@pytest.fixture
async def http(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    base = f"http://127.0.0.1:{port_of(server)}"
    async with httpx.AsyncClient(base_url=base, timeout=WAIT, headers=auth()) as client:
        yield client


@pytest.fixture
async def clients(server: Server) -> AsyncIterator[Clients]:
    async with clients_of(server) as c:
        yield c


def error(r: httpx.Response, status: int, code: str) -> str:
    """Check ``r`` is the JSON error ``code`` with ``status``; its message."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code, body
    assert api.status_of(code) == status
    message: str = body["error"]["message"]
    assert message
    return message


async def user(http: httpx.AsyncClient, name: str, password: str | None = "secret") -> int:
    body: dict[str, Any] = {"name": name}
    if password is not None:
        body["password"] = password
    r = await http.post("/api/v1/users", json=body)
    assert r.status_code == 201, r.text
    uid: int = r.json()["id"]
    return uid


def closed_reason(im: IMClient) -> asyncio.Future[str]:
    """The code the server gave when it closed ``im``'s connection."""
    fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_state(state: State) -> None:
        reason = im.client.close_reason
        if state is State.DISCONNECTED and not fut.done():
            fut.set_result(reason.code if reason is not None else "")

    im.client.on_state.append(on_state)
    return fut


# -- keys, scopes, the document ---------------------------------------------------------------


async def test_the_openapi_document_needs_no_key_and_has_every_route(
    http: httpx.AsyncClient,
) -> None:
    r = await http.get("/api/v1/openapi.json", headers={"authorization": ""})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    validate(doc)  # raises for anything OpenAPI 3.1 does not allow
    ops = {(m.upper(), path) for path, item in doc["paths"].items() for m in item}
    assert ops == {(route.method, route.path) for route in api.ROUTES}
    for item in doc["paths"].values():
        for op in item.values():
            assert op["x-scope"] in api.API_SCOPES
            assert "401" in op["responses"] and "400" in op["responses"]
    head = await http.head("/api/v1/openapi.json")
    assert head.status_code == 200 and head.content == b""
    error(await http.post("/api/v1/openapi.json"), 405, codes.METHOD_NOT_ALLOWED)


async def test_without_any_key_configured_the_api_is_off(tmp_path: Path) -> None:
    async with im_server(tmp_path) as s, httpx.AsyncClient(timeout=WAIT) as http:
        base = f"http://127.0.0.1:{port_of(s)}/api/v1"
        # Loopback included: no key, no API.
        message = error(await http.get(base + "/users/1"), 403, codes.FORBIDDEN)
        assert "admin_token" in message and "api_keys" in message
        error(await http.get(base + "/users/1", headers=auth()), 403, codes.FORBIDDEN)
        assert (await http.get(base + "/openapi.json")).status_code == 200


async def test_keys_and_scopes(http: httpx.AsyncClient) -> None:
    alice = await user(http, "alice")
    path = f"/api/v1/users/{alice}"
    r = await http.get(path, headers={"authorization": ""})
    error(r, 401, codes.UNAUTHENTICATED)
    assert r.headers["www-authenticate"].startswith("Bearer")
    error(await http.get(path, headers={"authorization": "Basic abc"}), 401, codes.UNAUTHENTICATED)
    error(await http.get(path, headers=auth("reader-key-012345678")), 401, codes.UNAUTHENTICATED)
    error(await http.get(path, headers=auth(ADMIN + "x")), 401, codes.UNAUTHENTICATED)
    reader = auth(KEYS["reader"]["key"])
    assert (await http.get(path, headers=reader)).json()["name"] == "alice"
    message = error(
        await http.post("/api/v1/users", json={"name": "x"}, headers=reader),
        403,
        codes.FORBIDDEN,
    )
    assert "reader" in message and "users:write" in message
    bot = auth(KEYS["bot"]["key"])
    sent = await http.post("/api/v1/messages", json={"from": alice, "to": alice, "text": "hi"})
    assert sent.status_code == 201
    r = await http.post(
        "/api/v1/messages", json={"from": alice, "to": alice, "text": "hi"}, headers=bot
    )
    assert r.status_code == 201
    error(await http.post(f"{path}/ban", headers=bot), 403, codes.FORBIDDEN)


def test_api_keys_from_the_environment_as_json_and_checked() -> None:
    keys = '{"bot": {"key": "0123456789abcdef", "scopes": ["messages:write"]}}'
    s = load_settings(environ={"BITCHAT_API_KEYS": keys}).settings
    assert s.api_keys == {"bot": {"key": "0123456789abcdef", "scopes": ["messages:write"]}}
    for bad, problem in (
        ('{"bot": {"key": "short"}}', "at least 16"),
        ('{"bot": {"key": "0123456789abcdef", "scopes": ["root"]}}', "unknown scope 'root'"),
        ('{"bot": {"key": "0123456789abcdef", "scopes": "admin"}}', "array of strings"),
        ('{"bot": "0123456789abcdef"}', "expected a table"),
        ("{not json", "expected a table"),
        (
            '{"a": {"key": "0123456789abcdef"}, "b": {"key": "0123456789abcdef"}}',
            "the same key",
        ),
    ):
        with pytest.raises(ConfigError, match="BITCHAT_API_KEYS") as info:
            load_settings(environ={"BITCHAT_API_KEYS": bad})
        assert problem in str(info.value)


def test_api_keys_from_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "bitchat.toml"
    config.write_text(
        '[api_keys.crm]\nkey = "crm-key-0123456789"\nscopes = ["users:read", "users:write"]\n'
    )
    s = load_settings(config=str(config)).settings
    assert s.api_keys["crm"]["scopes"] == ["users:read", "users:write"]


# -- users ------------------------------------------------------------------------------------


async def test_create_and_look_up_users(http: httpx.AsyncClient, clients: Clients) -> None:
    r = await http.post("/api/v1/users", json={"name": "Alice", "password": "pw"})
    assert r.status_code == 201
    alice = r.json()
    assert alice == {"id": alice["id"], "name": "Alice", "banned": False}
    assert (await http.get(f"/api/v1/users/{alice['id']}")).json() == alice
    assert (await http.get("/api/v1/users", params={"name": "alice"})).json() == alice
    error(await http.get("/api/v1/users", params={"name": "nobody"}), 404, codes.NOT_FOUND)
    for odd in ("", "a b", "x\x00", "x" * 1000, "\u200b"):
        error(await http.get("/api/v1/users", params={"name": odd}), 404, codes.NOT_FOUND)
    error(await http.get("/api/v1/users"), 400, codes.INVALID_PACKET)
    error(await http.get("/api/v1/users/999"), 404, codes.NOT_FOUND)
    # The name rules of a sign-up.
    error(await http.post("/api/v1/users", json={"name": "alice"}), 409, codes.NAME_TAKEN)
    error(await http.post("/api/v1/users", json={"name": "ALICE"}), 409, codes.NAME_TAKEN)
    error(await http.post("/api/v1/users", json={"name": "\u0391lice"}), 409, codes.NAME_TAKEN)
    error(await http.post("/api/v1/users", json={"name": "a b"}), 400, codes.INVALID_PACKET)
    error(await http.post("/api/v1/users", json={"name": "x" * 200}), 400, codes.INVALID_PACKET)
    long_pw = {"name": "bob", "password": "p" * 10_000}
    error(await http.post("/api/v1/users", json=long_pw), 400, codes.INVALID_PACKET)
    # The body's shape.
    for body in ({}, {"name": 5}, {"name": "bob", "admin": True}, [], "bob", 7):
        error(await http.post("/api/v1/users", json=body), 400, codes.INVALID_PACKET)
    error(await http.post("/api/v1/users", content=b"{name"), 400, codes.BAD_BODY)
    error(await http.post("/api/v1/users", content=b""), 400, codes.BAD_BODY)
    error(await http.post("/api/v1/users", content=b'{"name": "\xff"}'), 400, codes.BAD_BODY)
    # Nothing of that made a user; the one made logs in with its password.
    im = await clients.login("Alice", "pw")
    assert im.user is not None and im.user.id == alice["id"]
    bot = await user(http, "bot", password=None)
    assert (await http.get(f"/api/v1/users/{bot}")).json()["name"] == "bot"


async def test_path_and_query_parameters_are_checked(http: httpx.AsyncClient) -> None:
    for path in (
        "/api/v1/users/abc",
        "/api/v1/users/0",
        "/api/v1/users/-1",
        "/api/v1/users/1.0",
        f"/api/v1/users/{1 << 63}",
        "/api/v1/users/99999999999999999999999",
        "/api/v1/users/1/conversations?limit=0",
        "/api/v1/users/1/conversations?before=x",
        "/api/v1/conversations/history?group_id=1&limit=-3",
    ):
        error(await http.get(path), 400, codes.INVALID_PACKET)
    error(await http.get("/api/v1/nothing"), 404, codes.NOT_FOUND)
    error(await http.get("/api/v1/users/1/nothing"), 404, codes.NOT_FOUND)
    r = await http.patch("/api/v1/users/1")
    error(r, 405, codes.METHOD_NOT_ALLOWED)
    assert r.headers["allow"] == "GET, HEAD"
    head = await http.head("/api/v1/users/999")
    assert head.status_code == 404 and head.content == b""


# -- groups -----------------------------------------------------------------------------------


async def test_groups_and_members(http: httpx.AsyncClient, server: Server) -> None:
    alice, bob, carol, dave = [await user(http, n) for n in ("alice", "bob", "carol", "dave")]
    r = await http.post("/api/v1/groups", json={"owner_id": alice, "name": "moon base"})
    assert r.status_code == 201
    g = r.json()
    assert g == {
        "id": g["id"],
        "name": "moon base",
        "owner_id": alice,
        "members": 1,
        "member_ids": [alice],
        "invite_only": False,
        "history_visible": False,
    }
    gid = g["id"]
    assert (await http.get(f"/api/v1/groups/{gid}")).json() == g
    error(await http.get("/api/v1/groups/999"), 404, codes.NOT_FOUND)
    error(await http.post("/api/v1/groups", json={"owner_id": 999, "name": "x"}), 404, "not_found")
    for body in ({"owner_id": alice, "name": ""}, {"owner_id": alice, "name": "a\nb"}):
        error(await http.post("/api/v1/groups", json=body), 400, codes.INVALID_PACKET)
    error(await http.post("/api/v1/groups", json={"name": "x"}), 400, codes.INVALID_PACKET)

    members = f"/api/v1/groups/{gid}/members"
    r = await http.post(members, json={"user_id": bob})
    assert r.status_code == 200 and r.json()["member_ids"] == [alice, bob]
    assert (await http.post(members, json={"user_id": bob})).json()["members"] == 2  # harmless
    error(await http.post(members, json={"user_id": 999}), 404, codes.NOT_FOUND)
    error(await http.post("/api/v1/groups/999/members", json={"user_id": bob}), 404, "not_found")
    error(await http.post(members, json={"user_id": "bob"}), 400, codes.INVALID_PACKET)
    assert (await http.post(members, json={"user_id": carol})).status_code == 200
    error(await http.post(members, json={"user_id": dave}), 409, codes.GROUP_FULL)  # max 3

    r = await http.delete(f"{members}/{carol}")
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert (await http.get(f"/api/v1/groups/{gid}")).json()["member_ids"] == [alice, bob]
    error(await http.delete(f"{members}/{carol}"), 403, codes.NOT_MEMBER)
    error(await http.delete(f"/api/v1/groups/999/members/{bob}"), 404, codes.NOT_FOUND)

    role = f"{members}/{bob}/role"
    error(await http.put(role, json={"role": "king"}), 400, codes.INVALID_PACKET)
    assert (await http.put(role, json={"role": "admin"})).json() == {"ok": True}
    members_now = {m.user_id: m.role for m in await server.data["im"].users.members_info(gid)}
    assert members_now[bob] == "admin"
    error(await http.put(f"{members}/{dave}/role", json={"role": "admin"}), 403, codes.NOT_MEMBER)


# -- messages ---------------------------------------------------------------------------------


async def test_moderation_through_the_api(tmp_path: Path) -> None:
    async with (
        im_server(tmp_path, admin_token=ADMIN, max_mute_seconds=3600) as server,
        clients_of(server) as clients,
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port_of(server)}", timeout=WAIT, headers=auth()
        ) as http,
    ):
        alice, bob, carol, dave, eve = [
            await user(http, n) for n in ("alice", "bob", "carol", "dave", "eve")
        ]
        gid = (await http.post("/api/v1/groups", json={"owner_id": alice, "name": "moon"})).json()[
            "id"
        ]
        g = f"/api/v1/groups/{gid}"
        assert (await http.post(f"{g}/members", json={"user_id": bob})).status_code == 200
        b = await clients.login("bob")

        # Mute: the member's group messages are refused until unmuted.
        r = await http.put(f"{g}/members/{bob}/mute", json={"seconds": 60})
        assert r.status_code == 200 and r.json()["muted_until"] > 0
        with pytest.raises(RequestError) as info:
            await b.send_group(gid, "hello?")
        assert info.value.code == codes.MUTED
        as_bob = {"from": bob, "group_id": gid, "text": "through the backend"}
        error(await http.post("/api/v1/messages", json=as_bob), 403, codes.MUTED)
        error(
            await http.put(f"{g}/members/{bob}/mute", json={"seconds": 7200}),
            400,
            codes.INVALID_PACKET,
        )
        assert (await http.put(f"{g}/members/{bob}/mute", json={"seconds": 0})).json()[
            "muted_until"
        ] == 0
        await b.send_group(gid, "hello!")

        # Group bans: refused joins until lifted.
        assert (await http.post(f"{g}/bans", json={"user_id": carol})).json() == {"ok": True}
        error(await http.post(f"{g}/members", json={"user_id": carol}), 403, codes.BANNED)
        assert (await http.delete(f"{g}/bans/{carol}")).json() == {"ok": True}
        assert (
            carol in (await http.post(f"{g}/members", json={"user_id": carol})).json()["member_ids"]
        )
        error(
            await http.post("/api/v1/groups/999/bans", json={"user_id": carol}),
            404,
            codes.NOT_FOUND,
        )

        # Invite-only: a join is a request the API approves; an invite code lets one in.
        r = await http.put(f"{g}/options", json={"invite_only": True})
        assert r.status_code == 200 and r.json()["invite_only"] is True
        d = await clients.login("dave")
        assert (await d.join_group(gid)).pending
        waiting = (await http.get(f"{g}/requests")).json()["requests"]
        assert [(w["user_id"], w["name"]) for w in waiting] == [(dave, "dave")]
        assert (await http.post(f"{g}/requests/{dave}", json={"approve": True})).json() == {
            "ok": True
        }
        assert dave in (await http.get(g)).json()["member_ids"]
        error(await http.post(f"{g}/requests/{dave}", json={"approve": True}), 404, codes.NOT_FOUND)
        r = await http.post(f"{g}/invites", json={"max_uses": 1})
        assert r.status_code == 201
        code = r.json()["code"]
        e = await clients.login("eve")
        assert not (await e.join_group(gid, invite=code)).pending
        assert eve in (await http.get(g)).json()["member_ids"]

        # Blocks: no messages either way while one lasts.
        assert (await http.post(f"/api/v1/users/{alice}/blocks", json={"user_id": bob})).json() == {
            "ok": True
        }
        listed = (await http.get(f"/api/v1/users/{alice}/blocks")).json()["users"]
        assert listed == [{"id": bob, "name": "bob"}]
        with pytest.raises(RequestError) as info:
            await b.send_p2p(alice, "hi")
        assert info.value.code == codes.BLOCKED
        for sender, to in ((bob, alice), (alice, bob)):
            body = {"from": sender, "to": to, "text": "through the backend"}
            error(await http.post("/api/v1/messages", json=body), 403, codes.BLOCKED)
        error(await http.delete(f"/api/v1/users/999/blocks/{bob}"), 404, codes.NOT_FOUND)
        error(
            await http.post("/api/v1/users/999/blocks", json={"user_id": bob}), 404, codes.NOT_FOUND
        )
        error(
            await http.post(f"/api/v1/users/{alice}/blocks", json={"user_id": alice}),
            400,
            codes.INVALID_PACKET,
        )
        assert (await http.delete(f"/api/v1/users/{alice}/blocks/{bob}")).json() == {"ok": True}
        await b.send_p2p(alice, "hi")
        error(await http.get("/api/v1/users/999/blocks"), 404, codes.NOT_FOUND)


async def test_a_message_sent_as_a_user_is_stored_and_delivered(
    http: httpx.AsyncClient, clients: Clients
) -> None:
    alice, bob = await user(http, "alice"), await user(http, "bob")
    a = await clients.login("alice")
    b = await clients.login("bob")
    a_in, b_in = Inbox(a), Inbox(b)
    r = await http.post("/api/v1/messages", json={"from": alice, "to": bob, "text": "hi bob"})
    assert r.status_code == 201
    ack = r.json()
    assert set(ack) == {"msg_id", "ts", "seq", "duplicate"} and ack["seq"] == 1
    [got] = await b_in.wait_for(1)
    assert (got.msg_id, got.sender_id, got.text, got.seq) == (ack["msg_id"], alice, "hi bob", 1)
    # The sender's devices get it too, as when another device of theirs sends.
    [mine] = await a_in.wait_for(1)
    assert mine.msg_id == ack["msg_id"]
    # A retry with the same client_msg_id is not stored twice.
    body = {"from": bob, "to": alice, "text": "once", "client_msg_id": "c-1"}
    first = (await http.post("/api/v1/messages", json=body)).json()
    again = (await http.post("/api/v1/messages", json=body)).json()
    assert again["msg_id"] == first["msg_id"] and again["duplicate"] and not first["duplicate"]
    page = await a.history(peer_id=bob)
    assert [m["text"] for m in page.messages] == ["once", "hi bob"]


async def test_group_messages_and_the_send_rules(
    http: httpx.AsyncClient, clients: Clients, server: Server
) -> None:
    alice, bob, carol = [await user(http, n) for n in ("alice", "bob", "carol")]
    gid = (await http.post("/api/v1/groups", json={"owner_id": alice, "name": "g"})).json()["id"]
    await http.post(f"/api/v1/groups/{gid}/members", json={"user_id": bob})
    b = await clients.login("bob")
    b_in = Inbox(b)
    r = await http.post("/api/v1/messages", json={"from": alice, "group_id": gid, "text": "all"})
    assert r.status_code == 201
    [got] = await b_in.wait_for(1)
    assert (got.kind, got.to, got.text, got.msg_id) == ("group", gid, "all", r.json()["msg_id"])

    send = "/api/v1/messages"
    limit = server.settings.max_message_length
    for body, status, code in (
        ({"from": carol, "group_id": gid, "text": "x"}, 403, codes.NOT_MEMBER),
        ({"from": alice, "group_id": 999, "text": "x"}, 404, codes.NOT_FOUND),
        ({"from": alice, "to": 999, "text": "x"}, 404, codes.NOT_FOUND),
        ({"from": 999, "to": alice, "text": "x"}, 404, codes.NOT_FOUND),
        ({"from": alice, "to": bob, "text": "x" * (limit + 1)}, 400, codes.MESSAGE_TOO_LONG),
        ({"from": alice, "to": bob, "text": ""}, 400, codes.INVALID_PACKET),
        ({"from": alice, "to": bob, "group_id": gid, "text": "x"}, 400, codes.INVALID_PACKET),
        ({"from": alice, "text": "x"}, 400, codes.INVALID_PACKET),
        ({"from": alice, "to": bob}, 400, codes.INVALID_PACKET),
        ({"from": alice, "to": 1.0, "text": "x"}, 400, codes.INVALID_PACKET),
        ({"from": alice, "to": True, "text": "x"}, 400, codes.INVALID_PACKET),
        ({"from": alice, "to": bob, "text": "x", "client_msg_id": "c" * 65}, 400, "invalid_packet"),
    ):
        error(await http.post(send, json=body), status, code)
    big = b'{"from": 1, "to": 18446744073709551616, "text": "x"}'
    error(await http.post(send, content=big), 400, codes.INVALID_PACKET)  # a float to orjson
    # None of it was stored.
    page = await b.history(group_id=gid)
    assert [m["text"] for m in page.messages] == ["all"]


async def test_conversations_and_history_export_in_pages(http: httpx.AsyncClient) -> None:
    alice, bob, carol = [await user(http, n) for n in ("alice", "bob", "carol")]
    gid = (await http.post("/api/v1/groups", json={"owner_id": alice, "name": "g"})).json()["id"]
    for i in range(5):
        await http.post("/api/v1/messages", json={"from": alice, "to": bob, "text": f"m{i}"})
    await http.post("/api/v1/messages", json={"from": alice, "group_id": gid, "text": "g0"})

    convs = (await http.get(f"/api/v1/users/{alice}/conversations")).json()
    assert [(c["kind"], c["peer_id"], c["group_id"]) for c in convs["conversations"]] == [
        ("group", 0, gid),
        ("p2p", bob, 0),
    ]
    assert convs["more"] is False and convs["next_before"] is None
    first = (await http.get(f"/api/v1/users/{alice}/conversations", params={"limit": 1})).json()
    assert first["more"] and len(first["conversations"]) == 1
    rest = await http.get(
        f"/api/v1/users/{alice}/conversations", params={"before": first["next_before"]}
    )
    assert [c["peer_id"] for c in rest.json()["conversations"]] == [bob]
    error(await http.get("/api/v1/users/999/conversations"), 404, codes.NOT_FOUND)

    texts: list[str] = []
    params: dict[str, Any] = {"user_id": bob, "peer_id": alice, "limit": 2}
    for _ in range(5):
        page = (await http.get("/api/v1/conversations/history", params=params)).json()
        texts += [m["text"] for m in page["messages"]]
        if not page["more"]:
            break
        params["before"] = page["next_before"]
    assert texts == ["m4", "m3", "m2", "m1", "m0"]
    group = await http.get("/api/v1/conversations/history", params={"group_id": gid})
    assert [m["text"] for m in group.json()["messages"]] == ["g0"]
    hist = "/api/v1/conversations/history"
    for params, status, code in (
        ({"user_id": carol, "group_id": gid}, 403, codes.NOT_MEMBER),
        ({"group_id": 999}, 404, codes.NOT_FOUND),
        ({"user_id": alice, "peer_id": 999}, 404, codes.NOT_FOUND),
        ({"peer_id": alice}, 400, codes.INVALID_PACKET),
        ({"user_id": alice}, 400, codes.INVALID_PACKET),
        ({"user_id": alice, "peer_id": bob, "group_id": gid}, 400, codes.INVALID_PACKET),
    ):
        error(await http.get(hist, params=params), status, code)


# -- logout and bans ----------------------------------------------------------------------------


async def test_logout_closes_every_device_and_revokes_its_tokens(
    http: httpx.AsyncClient, clients: Clients
) -> None:
    alice = await user(http, "alice")
    phone = await clients.login("alice", device="phone")
    laptop = await clients.login("alice", device="laptop")
    other = await clients.login("bob")
    token = phone.token
    assert token
    reasons = [closed_reason(phone), closed_reason(laptop)]
    relogin: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    phone.on_relogin(lambda ok, exc: relogin.done() or relogin.set_result((ok, exc)))
    r = await http.post(f"/api/v1/users/{alice}/logout")
    assert r.status_code == 200 and r.json() == {"ok": True, "revoked_tokens": 2}
    assert await asyncio.wait_for(asyncio.gather(*reasons), WAIT) == [codes.LOGGED_OUT] * 2
    # The client reconnects, and does not log in again by itself.
    ok, exc = await asyncio.wait_for(relogin, WAIT)
    assert ok is None and exc.code == codes.LOGGED_OUT
    assert phone.token is None
    # The token is gone; others stay on.
    fresh = await clients.connect()
    with pytest.raises(RequestError) as info:
        await fresh.login(token=token)
    assert info.value.code == codes.LOGIN_FAILED
    assert [u.name for u in await other.online_users()] == ["bob"]
    # The password still works: a logout is no ban.
    again = await clients.login("alice", device="phone")
    assert again.user is not None and again.user.id == alice
    error(await http.post("/api/v1/users/999/logout"), 404, codes.NOT_FOUND)


async def test_a_ban_closes_sessions_refuses_logins_and_sends_and_is_lifted(
    http: httpx.AsyncClient, clients: Clients, server: Server
) -> None:
    alice, bob = await user(http, "alice"), await user(http, "bob")
    a = await clients.login("alice")
    token = a.token
    reason = closed_reason(a)
    r = await http.post(f"/api/v1/users/{alice}/ban")
    assert r.status_code == 200 and r.json() == {"id": alice, "name": "alice", "banned": True}
    assert await asyncio.wait_for(reason, WAIT) == codes.BANNED
    for login in ({"name": "alice", "password": "secret"}, {"token": token}):
        fresh = await clients.connect()
        with pytest.raises(RequestError) as info:
            await fresh.login(**login)
        assert info.value.code == (codes.BANNED if "name" in login else codes.LOGIN_FAILED)
    send = {"from": alice, "to": bob, "text": "x"}
    error(await http.post("/api/v1/messages", json=send), 403, codes.BANNED)
    assert (await http.get(f"/api/v1/users/{alice}")).json()["banned"] is True
    error(await http.post("/api/v1/users/999/ban"), 404, codes.NOT_FOUND)
    error(await http.delete("/api/v1/users/999/ban"), 404, codes.NOT_FOUND)

    r = await http.delete(f"/api/v1/users/{alice}/ban")
    assert r.status_code == 200 and r.json()["banned"] is False
    back = await clients.login("alice")
    assert back.user is not None and back.user.id == alice
    assert (await http.post("/api/v1/messages", json=send)).status_code == 201


async def test_a_ban_that_lands_during_a_login_keeps_the_user_out(
    http: httpx.AsyncClient, clients: Clients, server: Server
) -> None:
    alice = await user(http, "alice")
    users = server.data["im"].users
    issue = users.issue_token

    async def ban_meanwhile(*args: Any, **kw: Any) -> str:
        # The ban commits (and disconnects, revokes) between the login's check and its
        # attach: the login must not end with a live session.
        r = await http.post(f"/api/v1/users/{alice}/ban")
        assert r.json()["banned"] is True
        token: str = await issue(*args, **kw)
        return token

    users.issue_token = ban_meanwhile
    a = await clients.connect()
    with pytest.raises(RequestError) as info:
        await a.login("alice", "secret")
    assert info.value.code == codes.BANNED
    users.issue_token = issue
    assert alice not in await server.data["im"].connections.online_users()


async def test_a_bot_account_needs_no_password_and_an_empty_one_is_refused(tmp_path: Path) -> None:
    async with (
        im_server(tmp_path, admin_token=ADMIN, max_password_length=8) as server,
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port_of(server)}", timeout=WAIT, headers=auth()
        ) as http,
    ):
        r = await http.post("/api/v1/users", json={"name": "bot"})
        assert r.status_code == 201, r.text
        error(
            await http.post("/api/v1/users", json={"name": "b2", "password": ""}),
            400,
            codes.INVALID_PACKET,
        )


async def test_a_ban_outlives_a_restart(tmp_path: Path) -> None:
    async with im_server(tmp_path, admin_token=ADMIN) as s, httpx.AsyncClient() as http:
        base = f"http://127.0.0.1:{port_of(s)}/api/v1"
        r = await http.post(base + "/users", json={"name": "eve", "password": "pw"}, headers=auth())
        eve = r.json()["id"]
        assert (await http.post(f"{base}/users/{eve}/ban", headers=auth())).status_code == 200
    async with im_server(tmp_path, admin_token=ADMIN) as s, clients_of(s) as clients:
        im = await clients.connect()
        with pytest.raises(RequestError) as info:
            await im.login("eve", "pw")
        assert info.value.code == codes.BANNED


# -- the HTTP side -----------------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order(server: Server) -> None:
    def request(method: str, path: str, body: Any = None) -> bytes:
        data = b"" if body is None else orjson.dumps(body)
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        return head.encode() + data

    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
    try:
        # A slow answer first (a password hash), then quick ones: they wait their turn.
        writer.write(
            request("POST", "/api/v1/users", {"name": "alice", "password": "pw"})
            + request("GET", "/api/v1/users/1")
            + request("GET", "/api/v1/nothing")
            + request("GET", "/healthz")
            + request("GET", "/api/v1/users?name=alice")
        )
        await writer.drain()
        statuses = []
        for _ in range(5):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
            statuses.append(int(head.split(b" ", 2)[1]))
            length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
            await asyncio.wait_for(reader.readexactly(length), WAIT)
        assert statuses == [201, 200, 404, 200, 200]
    finally:
        writer.close()


async def test_a_request_in_absolute_form_is_read_as_one_in_origin_form(server: Server) -> None:
    body = orjson.dumps({"name": "dan"})
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
    try:
        writer.write(
            b"POST http://127.0.0.1/api/v1/users HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Authorization: Bearer {ADMIN}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 201 "), head
    finally:
        writer.close()


async def test_a_client_that_expects_100_continue_is_told_to_go_on(server: Server) -> None:
    body = orjson.dumps({"name": "carol", "password": "p" * 100})
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
    try:
        writer.write(
            f"POST /api/v1/users HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n"
            f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 201 ")
    finally:
        writer.close()


async def test_a_body_over_the_limit_is_refused_with_a_json_413(tmp_path: Path) -> None:
    async with im_server(tmp_path, admin_token=ADMIN, max_api_body_size=100) as s:
        base = f"http://127.0.0.1:{port_of(s)}"
        async with httpx.AsyncClient(base_url=base, headers=auth()) as http:
            ok = await http.post("/api/v1/users", json={"name": "a" * 20, "password": "p" * 40})
            assert ok.status_code == 201
            r = await http.post("/api/v1/users", json={"name": "b" * 200})
            message = error(r, 413, codes.BODY_TOO_LARGE)
            assert "100 bytes" in message
            # Other routes still take no body.
            assert (await http.post("/", content=b"x" * 200)).status_code in (405, 413)
            error(await http.get("/api/v1/users", params={"name": "b" * 200}), 404, "not_found")


# -- cluster mode ------------------------------------------------------------------------------


async def test_cluster_sends_logouts_and_bans_reach_every_node(
    redis_prefix: str, pg_dsn: str
) -> None:
    async with node_maker(redis_prefix, pg_dsn) as make:
        n1 = await make(1, admin_token=ADMIN)
        n2 = await make(2, admin_token=ADMIN)
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port_of(n1)}", headers=auth()) as http,
            clients_of(n2) as on_two,
        ):
            alice, bob = await user(http, "alice"), await user(http, "bob")
            b = await on_two.login("bob")
            b_in = Inbox(b)
            r = await http.post("/api/v1/messages", json={"from": alice, "to": bob, "text": "hey"})
            assert r.status_code == 201
            [got] = await b_in.wait_for(1)
            assert got.msg_id == r.json()["msg_id"]
            # What PostgreSQL cannot keep (U+0000 in text) is bad input, not a server error.
            nul = {"from": alice, "to": bob, "text": "a\x00b"}
            error(await http.post("/api/v1/messages", json=nul), 400, codes.INVALID_PACKET)
            nul_name = {"name": "x\x00y"}
            error(await http.post("/api/v1/users", json=nul_name), 400, codes.INVALID_PACKET)
            error(await http.get("/api/v1/users", params=nul_name), 404, codes.NOT_FOUND)

            reason = closed_reason(b)
            r = await http.post(f"/api/v1/users/{bob}/logout")
            assert r.json() == {"ok": True, "revoked_tokens": 1}
            assert await asyncio.wait_for(reason, WAIT) == codes.LOGGED_OUT

            b2 = await on_two.login("bob", device="tablet")
            reason = closed_reason(b2)
            assert (await http.post(f"/api/v1/users/{bob}/ban")).status_code == 200
            assert await asyncio.wait_for(reason, WAIT) == codes.BANNED
            fresh = await on_two.connect()
            with pytest.raises(RequestError) as info:
                await fresh.login("bob", "secret")
            assert info.value.code == codes.BANNED
            send = {"from": bob, "to": alice, "text": "x"}
            error(await http.post("/api/v1/messages", json=send), 403, codes.BANNED)
            assert (await http.delete(f"/api/v1/users/{bob}/ban")).json()["banned"] is False
            assert (await on_two.login("bob")).user is not None


# -- the stores' upgrade -----------------------------------------------------------------------


def _before_bans(migrations: list[Any]) -> int:
    """The version just before the step that adds bans (whatever its number)."""
    return next(i for i, m in enumerate(migrations) if isinstance(m, str) and "banned_at" in m)


async def test_sqlite_upgrades_a_database_of_the_previous_version_to_bans(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    previous = _before_bans(store.MIGRATIONS)
    saved = store.MIGRATIONS[:]
    store.MIGRATIONS[:] = saved[:previous]
    try:
        db = await store.open_db(str(path))  # as the previous version left it
    finally:
        store.MIGRATIONS[:] = saved
    try:
        await db.execute(
            "INSERT INTO users (name, password_hash, created_at, name_key, name_shape) "
            "VALUES ('alice', 'x', 0, 'alice', 'alice')"
        )
        columns = [r[1] for r in await db.execute_fetchall("PRAGMA table_info(users)")]
        assert "banned_at" not in columns
    finally:
        await db.close()
    alice_id = 1
    users = SqliteUserCenter(str(path))
    await users.start()
    try:
        [(version,)] = await users.db.execute_fetchall("SELECT version FROM schema_version")
        assert version == len(store.MIGRATIONS) == sql.SCHEMA_VERSION
        assert (await users.credentials("alice") or (0,))[0] == alice_id
        assert not await users.is_server_banned(alice_id)
        assert await users.set_banned(alice_id, True, 5)
        assert not await users.set_banned(999, True, 5)
    finally:
        await users.close()
    users = SqliteUserCenter(str(path))
    await users.start()
    try:
        assert await users.is_server_banned(alice_id)  # read back at start
    finally:
        await users.close()


async def test_postgresql_upgrades_a_database_of_the_previous_version_to_bans(
    pg_dsn: str,
) -> None:
    previous = _before_bans(pg.MIGRATIONS)
    con = await asyncpg.connect(pg_dsn)
    try:
        async with con.transaction():
            await pg_schema_at(con, previous)
            alice = await con.fetchval(
                "INSERT INTO users (name, password_hash, created_at, name_key, name_shape) "
                "VALUES ('alice', 'x', 0, 'alice', 'alice') RETURNING id"
            )
    finally:
        await con.close()
    users = PgUserCenter(PgDatabase(pg_dsn, cluster_settings()))
    await users.start()
    try:
        async with users.db.connection() as c:
            assert await c.fetchval("SELECT version FROM schema_version") == sql.SCHEMA_VERSION
        assert len(pg.MIGRATIONS) == sql.SCHEMA_VERSION
        assert not await users.is_server_banned(alice)
        assert await users.set_banned(alice, True, 5)
        assert await users.is_server_banned(alice)
        assert await users.set_banned(alice, False)
        assert not await users.is_server_banned(alice)
        assert not await users.set_banned(999, True)
    finally:
        await users.close()
