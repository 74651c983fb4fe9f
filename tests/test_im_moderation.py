"""Group moderation and user blocks end to end, over real sockets, in both modes
(standalone SQLite; two cluster nodes on PostgreSQL + Redis, the users spread over
them): roles and the hand-over, kick, ban, mute, invite-only groups with invite
codes and join requests, history visibility, blocks; every refusal with its code,
nothing changed; the GroupEvents pushed; the upgrade of a database of the
previous schema version in both stores."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bitchat import RequestError, Server, codes
from bitchat.cluster import pg
from bitchat.cluster.pg import PgDatabase, PgUserCenter
from bitchat.im import sql
from bitchat.im import sqlite as store
from bitchat.im.centers import Invite, UserCenter
from bitchat.im.packets import ChatMessage, GroupEvent, Presence, Receipt, TypingEvent
from bitchat.im.sqlite import SqliteUserCenter
from cluster_support import (
    cluster_settings,
    eventually,
    pg_dsn_fixture,  # noqa: F401 (fixture)
    pg_schema_at,
    redis_prefix_fixture,  # noqa: F401 (fixture)
)
from conftest import WAIT
from im_helpers import Inbox
from test_im_sync import (  # noqa: F401 (_cluster_services: fixture)
    MODES,
    Deployment,
    Pushes,
    _cluster_services,
    deployment,
    uid,
)


async def refused(code: str, call: Awaitable[Any]) -> RequestError:
    with pytest.raises(RequestError) as info:
        await call
    assert info.value.code == code, info.value
    return info.value


def roles(members: list[dict[str, Any]]) -> dict[int, str]:
    return {m["id"]: m["role"] for m in members}


def users_of(server: Server) -> UserCenter:
    users: UserCenter = server.data["im"].users
    return users


async def heard(d: Deployment, check: Any, what: str) -> None:
    """Every node's caches have caught up with a change (another node hears of it
    from PostgreSQL a moment after its commit)."""

    async def all_nodes() -> bool:
        return all(check(users_of(s)) for s in d.servers)

    await eventually(all_nodes, what=what)


def not_muted(group_id: int, user_id: int) -> Any:
    def check(users: UserCenter) -> bool:
        mutes = users.known_mutes(group_id)
        return mutes is None or user_id not in mutes

    return check


def muted(group_id: int, user_id: int) -> Any:
    def check(users: UserCenter) -> bool:
        mutes = users.known_mutes(group_id)
        return mutes is None or mutes.get(user_id, 0) > time.time() * 1000

    return check


def blocks_known(user_id: int, other: int, on: bool) -> Any:
    def check(users: UserCenter) -> bool:
        blocks = users.known_blocks(user_id)
        return blocks is None or blocks.either(other) == on

    return check


@pytest.mark.parametrize("mode", MODES)
async def test_roles_kick_ban_and_the_hand_over(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(request, tmp_path) as d:
        owner = await d.login(0, "owner")
        adam = await d.login(1, "adam")
        bob = await d.login(1, "bob")
        carol = await d.login(0, "carol")
        dave = await d.login(1, "dave")  # never joins
        g = (await owner.create_group("moon")).group_id
        assert (await owner.my_groups())[0]["role"] == "owner"
        for im in (adam, bob, carol):
            await im.join_group(g)
        events = {im: Pushes(im, GroupEvent) for im in (owner, adam, bob, carol, dave)}

        await owner.set_role(g, uid(adam), "admin")
        for im in (owner, adam, bob, carol):
            e = await events[im].until(lambda e: e.event == "role")
            assert (e.user_id, e.by_id, e.role, e.user_name) == (
                uid(adam),
                uid(owner),
                "admin",
                "adam",
            )
        assert roles(await bob.group_members(g)) == {
            uid(owner): "owner",
            uid(adam): "admin",
            uid(bob): "member",
            uid(carol): "member",
        }
        before = await owner.group_members(g)

        # Refusals, each with its code; nothing changes.
        await refused(codes.FORBIDDEN, bob.set_role(g, uid(carol), "admin"))
        await refused(codes.FORBIDDEN, adam.set_role(g, uid(carol), "admin"))
        await refused(codes.INVALID_PACKET, owner.set_role(g, uid(carol), "king"))
        await refused(codes.NOT_MEMBER, owner.set_role(g, uid(dave), "admin"))
        await refused(codes.FORBIDDEN, owner.set_role(g, uid(owner), "member"))
        await refused(codes.FORBIDDEN, adam.kick(g, uid(owner)))
        await refused(codes.FORBIDDEN, bob.kick(g, uid(carol)))
        await refused(codes.FORBIDDEN, adam.kick(g, uid(adam)))
        await refused(codes.NOT_MEMBER, adam.kick(g, uid(dave)))
        await refused(codes.NOT_FOUND, adam.kick(g, 9999))
        await refused(codes.NOT_FOUND, adam.kick(9999, uid(bob)))
        await refused(codes.NOT_MEMBER, dave.kick(g, uid(bob)))
        await refused(codes.FORBIDDEN, adam.ban(g, uid(owner)))
        await refused(codes.FORBIDDEN, carol.ban(g, uid(bob)))
        await refused(codes.NOT_MEMBER, dave.group_members(g))
        await refused(codes.NOT_FOUND, dave.group_members(9999))
        assert await owner.group_members(g) == before

        # A kick: the user learns of it and may come back (an open group).
        await adam.kick(g, uid(bob))
        e = await events[bob].until(lambda e: e.event == "kicked")
        assert (e.user_id, e.by_id, e.by_name) == (uid(bob), uid(adam), "adam")
        await events[carol].until(lambda e: e.event == "kicked")
        assert uid(bob) not in roles(await owner.group_members(g))
        await refused(codes.NOT_MEMBER, bob.send_group(g, "still here?", retries=0))
        await bob.join_group(g)
        assert roles(await owner.group_members(g))[uid(bob)] == "member"

        # A ban removes the member and keeps them out, invites and adds included.
        await adam.ban(g, uid(bob))
        assert (await events[bob].until(lambda e: e.event == "banned")).by_id == uid(adam)
        assert uid(bob) not in roles(await owner.group_members(g))
        await refused(codes.BANNED, bob.join_group(g))
        code = (await owner.create_invite(g)).code
        await refused(codes.BANNED, bob.join_group(g, code))
        await refused(codes.BANNED, carol.add_member(g, uid(bob)))
        # A user who never was a member can be banned too.
        await adam.ban(g, uid(dave))
        await refused(codes.BANNED, dave.join_group(g))
        await adam.ban(g, uid(bob), False)
        await events[bob].until(lambda e: e.event == "unbanned")
        assert (await bob.join_group(g)).members == 4

        # The hand-over: the old owner becomes an admin.
        await owner.set_role(g, uid(carol), "owner")
        info = await carol.join_group(g)  # already in: the group as it is
        assert (info.owner_id, info.role) == (uid(carol), "owner")
        assert roles(await owner.group_members(g))[uid(owner)] == "admin"
        await refused(codes.FORBIDDEN, owner.set_role(g, uid(bob), "admin"))
        await carol.kick(g, uid(owner))  # the owner may kick an admin
        # The owner leaves: the group goes to the admin (adam), not to a member.
        await carol.leave_group(g)
        members = await adam.group_members(g)
        assert roles(members)[uid(adam)] == "owner"
        assert (await adam.my_groups())[0]["owner_id"] == uid(adam)


@pytest.mark.parametrize("mode", MODES)
async def test_a_muted_member_cannot_send_until_unmuted(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(request, tmp_path, max_mute_seconds=3600) as d:
        owner = await d.login(0, "owner")
        carol = await d.login(1, "carol")
        g = (await owner.create_group("moon")).group_id
        await carol.join_group(g)
        await carol.send_group(g, "before")  # the members are cached on carol's node
        events = Pushes(carol, GroupEvent)

        await refused(codes.INVALID_PACKET, owner.mute(g, uid(carol), 3601))
        await refused(codes.INVALID_PACKET, owner.mute(g, uid(carol), -1))
        await refused(codes.FORBIDDEN, carol.mute(g, uid(owner), 60))
        assert (await owner.group_members(g))[1]["muted_until"] == 0

        start = time.time() * 1000
        await owner.mute(g, uid(carol), 60)
        e = await events.until(lambda e: e.event == "muted")
        assert start + 59_000 <= e.until <= time.time() * 1000 + 60_000
        assert (await owner.group_members(g))[1]["muted_until"] == e.until
        await heard(d, muted(g, uid(carol)), "the mute")
        exc = await refused(codes.MUTED, carol.send_group(g, "can you hear me?", retries=0))
        assert "until" in exc.message
        page = await owner.history(group_id=g)
        assert [m["text"] for m in page.messages] == ["before"]  # nothing stored
        await owner.send_group(g, "only I speak")

        # A mute runs out by itself.
        past = int(time.time() * 1000) - 1
        await users_of(d.node(0)).set_muted(g, uid(carol), past)
        await heard(d, lambda u: (u.known_mutes(g) or {}).get(uid(carol), 0) <= past, "the end")
        await carol.send_group(g, "it ran out")
        await owner.mute(g, uid(carol), 60)
        await heard(d, muted(g, uid(carol)), "the mute again")
        await refused(codes.MUTED, carol.send_group(g, "again?", retries=0))

        await owner.mute(g, uid(carol), 0)
        await events.until(lambda e: e.event == "unmuted")
        await heard(d, not_muted(g, uid(carol)), "the unmute")
        await carol.send_group(g, "back")


@pytest.mark.parametrize("mode", MODES)
async def test_invite_only_groups_invites_and_join_requests(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(
        request, tmp_path, max_invites_per_group=2, max_join_requests_per_group=2
    ) as d:
        owner = await d.login(0, "owner")
        adam = await d.login(1, "adam")  # admin
        mia = await d.login(0, "mia")  # member
        names = ["dave", "erin", "frank", "gina", "hal"]
        dave, erin, frank, gina, hal = [await d.login(i % 2, n) for i, n in enumerate(names)]
        g = (await owner.create_group("moon")).group_id
        await adam.join_group(g)
        await mia.join_group(g)
        await owner.set_role(g, uid(adam), "admin")
        admin_events = Pushes(adam, GroupEvent)
        member_events = Pushes(mia, GroupEvent)

        await refused(codes.FORBIDDEN, mia.set_group_options(g, invite_only=True))
        info = await adam.set_group_options(g, invite_only=True)
        assert (info.invite_only, info.history_visible, info.role) == (True, False, "admin")
        await member_events.until(lambda e: e.event == "options")

        # A join without an invite is a request: the admins hear of it.
        asked = await dave.join_group(g)
        assert asked.pending and asked.members == 3 and asked.role == ""
        e = await admin_events.until(lambda e: e.event == "join_requested")
        assert (e.user_id, e.user_name) == (uid(dave), "dave")
        assert not [e for e in member_events.got if e.event == "join_requested"]
        assert (await dave.join_group(g)).pending  # asking twice is one request
        await erin.join_group(g)
        await refused(codes.FORBIDDEN, gina.join_group(g))  # max_join_requests_per_group
        await refused(codes.FORBIDDEN, mia.join_requests(g))
        reqs = await adam.join_requests(g)
        assert [(r["user_id"], r["name"]) for r in reqs] == [
            (uid(dave), "dave"),
            (uid(erin), "erin"),
        ]
        await refused(codes.NOT_MEMBER, dave.send_group(g, "am I in?", retries=0))
        await refused(codes.FORBIDDEN, mia.answer_join_request(g, uid(dave), True))

        await adam.answer_join_request(g, uid(dave), True)
        await member_events.until(lambda e: e.event == "member_added" and e.user_id == uid(dave))
        await dave.send_group(g, "in")
        await owner.answer_join_request(g, uid(erin), False)
        await refused(codes.NOT_FOUND, owner.answer_join_request(g, uid(erin), True))
        assert await adam.join_requests(g) == []
        assert uid(erin) not in roles(await owner.group_members(g))

        # Invites: only admins in an invite-only group; used up; unknown; expired.
        await refused(codes.FORBIDDEN, mia.create_invite(g))
        await refused(codes.FORBIDDEN, mia.add_member(g, uid(hal)))
        await refused(codes.INVALID_PACKET, adam.create_invite(g, ttl=-1))
        await refused(codes.INVALID_PACKET, adam.create_invite(g, max_uses=-1))
        await refused(codes.INVALID_PACKET, adam.create_invite(g, max_uses=2**40))
        await refused(codes.INVALID_PACKET, adam.create_invite(g, ttl=10**9))
        once = await adam.create_invite(g, ttl=60, max_uses=1)
        assert once.max_uses == 1 and once.expires_at > time.time() * 1000 + 50_000
        await adam.create_invite(g)
        await refused(codes.FORBIDDEN, adam.create_invite(g))  # max_invites_per_group
        joined = await frank.join_group(g, once.code)
        assert not joined.pending and joined.role == "member" and joined.invite_only
        await refused(codes.BAD_INVITE, gina.join_group(g, once.code))  # used up
        await refused(codes.BAD_INVITE, gina.join_group(g, "no-such-code"))
        other = (await gina.create_group("other")).group_id
        elsewhere = await gina.create_invite(other)
        await refused(codes.BAD_INVITE, hal.join_group(g, elsewhere.code))  # another group's
        past = Invite("expired-code", g, int(time.time() * 1000) - 1)
        await users_of(d.node(0)).add_invite(past, uid(owner), 10)
        await refused(codes.BAD_INVITE, gina.join_group(g, "expired-code"))
        assert uid(gina) not in roles(await owner.group_members(g))
        await adam.add_member(g, uid(hal))
        e = await member_events.until(lambda e: e.event == "member_added" and e.user_id == uid(hal))
        assert e.by_id == uid(adam)
        await refused(codes.NOT_FOUND, adam.add_member(g, 9999))

        # An open group again: any member invites.
        await owner.set_group_options(g, invite_only=False)
        await mia.add_member(g, uid(gina))
        assert uid(gina) in roles(await owner.group_members(g))


@pytest.mark.parametrize("mode", MODES)
async def test_an_approval_that_cannot_be_let_in_leaves_the_request_waiting(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(request, tmp_path, max_group_size=2) as d:
        owner = await d.login(0, "owner")
        dave = await d.login(1, "dave")
        erin = await d.login(0, "erin")
        g = (await owner.create_group("moon")).group_id
        await owner.set_group_options(g, invite_only=True)
        assert (await dave.join_group(g)).pending
        await owner.add_member(g, uid(erin))  # now full
        await refused(codes.GROUP_FULL, owner.answer_join_request(g, uid(dave), True))
        assert [r["user_id"] for r in await owner.join_requests(g)] == [uid(dave)]
        await erin.leave_group(g)
        await owner.answer_join_request(g, uid(dave), True)
        assert await owner.join_requests(g) == []
        assert sorted(roles(await dave.group_members(g))) == sorted([uid(owner), uid(dave)])


@pytest.mark.parametrize("mode", MODES)
async def test_a_group_its_last_member_left_belongs_to_the_next_to_join(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(request, tmp_path) as d:
        owner = await d.login(0, "owner")
        bob = await d.login(1, "bob")
        g = (await owner.create_group("moon")).group_id
        await owner.leave_group(g)  # the last member: nobody to hand it to
        joined = await bob.join_group(g)
        assert (joined.owner_id, joined.role) == (uid(bob), "owner")
        assert roles(await bob.group_members(g)) == {uid(bob): "owner"}
        await bob.set_group_options(g, invite_only=True)  # someone runs it again
        back = await owner.join_group(g)
        assert back.pending and back.owner_id == uid(bob)


async def test_two_hand_overs_at_once_leave_one_owner(pg_dsn: str) -> None:
    users = PgUserCenter(PgDatabase(pg_dsn, cluster_settings()))
    await users.start()
    try:
        a, b, c = [(await users.register(n, "secret")).id for n in ("ann", "ben", "cat")]
        for _ in range(5):
            g = (await users.create_group(a, "moon")).id
            for u in (b, c):
                await users.join_group(g, u, 10)
            await asyncio.gather(users.set_role(g, b, "owner"), users.set_role(g, c, "owner"))
            owners = [m.user_id for m in await users.members_info(g) if m.role == "owner"]
            group = await users.get_group(g)
            assert group is not None and owners == [group.owner_id]
    finally:
        await users.close()


@pytest.mark.parametrize("mode", MODES)
async def test_history_visible_lets_a_new_member_read_what_came_before(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(request, tmp_path) as d:
        owner = await d.login(0, "owner")
        late = await d.login(1, "late")
        later = await d.login(1, "later")
        g = (await owner.create_group("moon")).group_id
        for i in range(3):
            await owner.send_group(g, f"old {i}")
        await late.join_group(g)
        assert (await late.history(group_id=g)).messages == []  # from the join on
        assert (await late.history(group_id=g, after_seq=0)).messages == []
        await owner.send_group(g, "new")
        assert [m["text"] for m in (await late.history(group_id=g)).messages] == ["new"]

        info = await owner.set_group_options(g, history_visible=True)
        assert info.history_visible and not info.invite_only
        inbox = Inbox(later)
        await later.join_group(g)
        texts = [m["text"] for m in (await later.history(group_id=g)).messages]
        assert texts == ["new", "old 2", "old 1", "old 0"]
        # Its device starts at the group's start too: the next message shows the gap
        # before it, and what came before is pushed in order.
        await owner.send_group(g, "newer")
        got = await inbox.wait_for(5)
        assert sorted(m.seq for m in got) == [1, 2, 3, 4, 5]
        # The start of a member is fixed at the join.
        assert [m["text"] for m in (await late.history(group_id=g)).messages] == ["newer", "new"]


@pytest.mark.parametrize("mode", MODES)
async def test_a_block_stops_messages_both_ways_and_hides_the_blocker(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(request, tmp_path, max_blocks_per_user=2) as d:
        alice = await d.login(0, "alice")
        cleo = await d.login(0, "cleo")  # on alice's node: her pushes go out in order
        bob = await d.login(1, "bob")
        zed = await d.login(1, "zed")
        g = (await alice.create_group("moon")).group_id
        for im in (bob, cleo):
            await im.join_group(g)
        await bob.send_p2p(uid(alice), "hi alice")  # the path is warm, caches filled
        await alice.send_p2p(uid(bob), "hi bob")

        await refused(codes.INVALID_PACKET, alice.block(uid(alice)))
        await refused(codes.NOT_FOUND, alice.block(9999))
        await alice.block(uid(bob))
        await alice.block(uid(bob))  # twice is harmless
        assert [(u.id, u.name) for u in await alice.blocked()] == [(uid(bob), "bob")]
        assert await bob.blocked() == []
        await heard(d, blocks_known(uid(bob), uid(alice), True), "the block")

        exc = await refused(codes.BLOCKED, bob.send_p2p(uid(alice), "hello?", retries=0))
        assert exc.message == "you cannot message this user"
        exc = await refused(codes.BLOCKED, alice.send_p2p(uid(bob), "bye", retries=0))
        assert exc.message == "you blocked this user"
        page = await alice.history(peer_id=uid(bob))
        assert [m["text"] for m in page.messages] == ["hi bob", "hi alice"]  # nothing stored

        # Alice shows offline to bob: online list, member list, presence, typing.
        assert uid(alice) not in [u.id for u in await bob.online_users()]
        assert uid(alice) in [u.id for u in await zed.online_users()]
        seen = {m["id"]: m for m in await bob.group_members(g)}
        assert not seen[uid(alice)]["online"] and seen[uid(alice)]["last_seen"] is None
        assert {m["id"]: m for m in await cleo.group_members(g)}[uid(alice)]["online"]

        typing = {im: Pushes(im, TypingEvent) for im in (bob, cleo)}
        await alice.typing(group_id=g)
        await typing[cleo].until(lambda e: e.user_id == uid(alice))
        await cleo.typing(group_id=g)
        await typing[bob].until(lambda e: e.user_id == uid(cleo))
        assert not [e for e in typing[bob].got if e.user_id == uid(alice)]

        presence = {im: Pushes(im, Presence) for im in (bob, zed)}
        await bob.online_users(watch=True)
        await zed.online_users(watch=True)
        await alice.close()
        await presence[zed].until(lambda p: p.user_id == uid(alice) and not p.online)
        await cleo.close()  # a later presence, from the same node
        await presence[bob].until(lambda p: p.user_id == uid(cleo) and not p.online)
        assert not [p for p in presence[bob].got if p.user_id == uid(alice)]
        alice = await d.login(0, "alice")

        # Groups are not affected.
        chat = Pushes(alice, ChatMessage)
        await bob.send_group(g, "to the group")
        await chat.until(lambda m: m.text == "to the group")

        # The limit, then the unblock.
        await alice.block(uid(zed))
        await refused(codes.FORBIDDEN, alice.block(uid(cleo)))
        assert [u.id for u in await alice.blocked()] == sorted([uid(bob), uid(zed)])
        await alice.block(uid(bob), False)
        await heard(d, blocks_known(uid(bob), uid(alice), False), "the unblock")
        await bob.send_p2p(uid(alice), "friends again")
        await alice.send_p2p(uid(bob), "yes")


@pytest.mark.parametrize("mode", MODES)
async def test_a_blocked_user_gets_no_read_receipts_of_the_blocker(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(request, tmp_path) as d:
        alice = await d.login(0, "alice")
        bob = await d.login(1, "bob")
        receipts = Pushes(bob, Receipt)
        one = await bob.send_p2p(uid(alice), "one")
        two = await bob.send_p2p(uid(alice), "two")
        await alice.block(uid(bob))
        await heard(d, blocks_known(uid(bob), uid(alice), True), "the block")
        await alice.mark_read(peer_id=uid(bob), seq=one.seq)  # bob must not learn it
        await alice.block(uid(bob), False)
        await heard(d, blocks_known(uid(bob), uid(alice), False), "the unblock")
        await alice.mark_read(peer_id=uid(bob), seq=two.seq)
        # Receipts from alice's node reach bob in order: the first read one is the last.
        first = await receipts.until(lambda r: r.kind == "read")
        assert (first.user_id, first.seq) == (uid(alice), two.seq)


# -- the CLI ----------------------------------------------------------------------------------


async def test_the_moderation_commands(tmp_path: Path) -> None:
    from im_helpers import im_server, port_of
    from test_repl import repl_for

    async with im_server(tmp_path) as server:
        port, s = port_of(server), server.settings
        async with (
            repl_for(port, s) as (houyi, h_out),
            repl_for(port, s) as (gris, g_out),
            repl_for(port, s) as (chang, c_out),
        ):
            for repl, name in ((houyi, "houyi"), (gris, "gris"), (chang, "chang")):
                await repl.execute(f"-lo {name} 1")
            await houyi.execute("-gcreate moon")
            await gris.execute("-gjoin 1")
            await h_out.expect("[group 1] gris(2) joined")

            async def answer(repl: Any, out: Any, line: str) -> list[str]:
                """The lines a command printed, but the group events among them."""
                m = out.mark()
                await repl.execute(line)
                return [x for x in out.since(m) if not x.startswith("[group ")]

            assert await answer(houyi, h_out, "-grole 1 2 admin") == [
                "User 2 is now admin in group 1"
            ]
            await g_out.expect("[group 1] houyi(1) made gris(2) admin")
            assert await answer(houyi, h_out, "-gopts 1 invite_only=on history=off") == [
                "Group moon(1): invite_only=on history=off"
            ]
            assert await answer(chang, c_out, "-gjoin 1") == [
                "Asked to join group moon(1); an admin will answer"
            ]
            await g_out.expect("[group 1] chang(3) asks to join (-gapprove 1 3)")
            table = await answer(gris, g_out, "-greqs 1")
            assert table[0].split() == ["userName(userId)", "asked"]
            assert len(table) == 3 and table[2].startswith("chang(3)  ")
            assert await answer(gris, g_out, "-gdeny 1 3") == ["Refused user 3 into group 1"]
            assert await answer(gris, g_out, "-greqs 1") == ["No join requests"]
            await chang.execute("-gjoin 1")
            assert await answer(gris, g_out, "-gapprove 1 3") == ["Let user 3 into group 1"]
            await c_out.expect("[group 1] gris(2) added chang(3)")
            assert await answer(gris, g_out, "-gmute 1 3 5") == [
                "Muted user 3 in group 1 for 5 minute(s)"
            ]
            await c_out.expect("[group 1] gris(2) muted chang(3) until ")
            [failed] = await answer(chang, c_out, "-gc 1 hello?")
            assert failed.startswith(
                "Send group message failed cause: you are muted in group 1 until"
            )
            assert await answer(gris, g_out, "-gmute 1 3 0") == ["Unmuted user 3 in group 1"]
            assert await answer(gris, g_out, "-gkick 1 3") == ["Kicked user 3 from group 1"]
            await c_out.expect("[group 1] gris(2) kicked chang(3)")
            assert await answer(gris, g_out, "-gban 1 3") == ["Banned user 3 from group 1"]
            assert await answer(chang, c_out, "-gjoin 1") == [
                "Join group failed cause: you are banned from group 1"
            ]
            assert await answer(gris, g_out, "-gunban 1 3") == [
                "Lifted the ban of user 3 in group 1"
            ]
            link = await answer(houyi, h_out, "-glink 1")
            code = link[0].split(": ", 1)[1].split(" ")[0]
            assert link[0].startswith("Invite code for group 1: ")
            assert await answer(chang, c_out, f"-gjoin 1 {code}") == [
                "Joined group moon(1), 3 member(s)"
            ]
            assert await answer(houyi, h_out, "-gleave 1") == ["Left group 1"]
            assert await answer(gris, g_out, "-ginvite 1 1") == ["Added user 1 to group 1"]
            assert await answer(gris, g_out, "-grole 1 3 owner") == ["User 3 now owns group 1"]

            assert await answer(houyi, h_out, "-block 2") == ["Blocked user 2"]
            assert await answer(houyi, h_out, "-blocked") == [
                "userName(userId)",
                "----------------",
                "gris(2)",
            ]
            assert await answer(gris, g_out, "-pc 1 hi") == [
                "Send p2p message failed cause: you cannot message this user"
            ]
            assert await answer(houyi, h_out, "-unblock 2") == ["Unblocked user 2"]
            assert await answer(houyi, h_out, "-blocked") == ["No blocked users"]

            for line, answer_line in [
                ("-gkick 1", "Usage: -gkick groupId userId"),
                ("-gban x 1", "Usage: -gban groupId userId"),
                ("-gmute 1 2", "Usage: -gmute groupId userId minutes"),
                ("-grole 1 2 king", "Usage: -grole groupId userId admin|member|owner"),
                ("-gopts 1 color=red", "Usage: -gopts groupId invite_only=on|off history=on|off"),
                ("-gopts 1", "Usage: -gopts groupId invite_only=on|off history=on|off"),
                ("-glink", "Usage: -glink groupId"),
                ("-block", "Usage: -block userId"),
                ("-blocked 2", "Usage: -blocked"),
                (
                    "-gkick 1 2",
                    "Kick failed cause: only an admin or the owner of the group may do that",
                ),
                ("-gkick 42 2", "Kick failed cause: no group 42"),
                ("-block 99", "Block failed cause: no user 99"),
            ]:
                failures = houyi.failures
                assert await answer(houyi, h_out, line) == [answer_line], line
                assert houyi.failures == failures + 1, line


# -- the upgrade from the previous schema version ----------------------------------------------


def _before_blocks(migrations: list[Any]) -> int:
    """The schema version before the moderation step (later steps follow it)."""
    return next(
        i for i, m in enumerate(migrations) if isinstance(m, str) and "CREATE TABLE blocks" in m
    )


async def test_sqlite_upgrades_a_database_of_the_previous_version(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    before = _before_blocks(store.MIGRATIONS)
    saved = store.MIGRATIONS[:]
    store.MIGRATIONS[:] = saved[:before]
    users = SqliteUserCenter(str(path))
    try:
        await users.start()
        alice = await users.register("alice", "pw")
        bob = await users.register("bob", "pw")
        await users.db.execute(
            "INSERT INTO groups (id, name, owner_id, created_at) VALUES (7, 'moon', ?, 0)",
            (alice.id,),
        )
        for u in (alice, bob):
            await users.db.execute(
                "INSERT INTO group_members (group_id, user_id, joined_at) VALUES (7, ?, 0)",
                (u.id,),
            )
    finally:
        store.MIGRATIONS[:] = saved
        await users.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(before,)]
        assert not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'blocks'").fetchall()
    finally:
        db.close()
    users = SqliteUserCenter(str(path))
    await users.start()
    try:
        await check_upgraded(users, alice.id, bob.id)
    finally:
        await users.close()


async def test_postgresql_upgrades_a_database_of_the_previous_version(pg_dsn: str) -> None:
    before = _before_blocks(pg.MIGRATIONS)
    con = await asyncpg.connect(pg_dsn)
    try:
        async with con.transaction():
            await pg_schema_at(con, before)
            for i, name in ((1, "alice"), (2, "bob")):
                await con.execute(
                    "INSERT INTO users (id, name, password_hash, created_at, name_key, name_shape) "
                    "VALUES ($1, $2, 'x', 0, $2, $2)",
                    i,
                    name,
                )
            await con.execute("INSERT INTO groups VALUES (7, 'moon', 1, 0)")
            for i in (1, 2):
                await con.execute(
                    "INSERT INTO group_members (group_id, user_id, joined_at) VALUES (7, $1, 0)", i
                )
            assert await con.fetchval("SELECT to_regclass('blocks')") is None
    finally:
        await con.close()
    users = PgUserCenter(PgDatabase(pg_dsn, cluster_settings()))
    await users.start()
    try:
        async with users.db.connection() as c:
            assert await c.fetchval("SELECT version FROM schema_version") == sql.SCHEMA_VERSION
        await check_upgraded(users, 1, 2)
    finally:
        await users.close()


async def check_upgraded(users: UserCenter, alice: int, bob: int) -> None:
    """The owner's row became the owner; the rest works on the old rows."""
    assert [(m.user_id, m.role, m.muted_until) for m in await users.members_info(7)] == [
        (alice, "owner", 0),
        (bob, "member", 0),
    ]
    group = await users.get_group(7)
    assert group is not None and not group.invite_only and not group.history_visible
    assert [g.role for g in await users.user_groups(bob)] == ["member"]
    assert await users.set_block(alice, bob, True, 10)
    assert (await users.blocks(bob)).by == frozenset({alice})
    assert await users.set_ban(7, bob, alice, True)
    assert await users.is_banned(7, bob)
    await users.set_muted(7, alice, 5)
    await asyncio.wait_for(users.leave_group(7, alice), WAIT)
    assert [(m.user_id, m.role) for m in await users.members_info(7)] == [(bob, "owner")]
