"""The IM service's seams with its connection center, seen on a standalone server.

What a cluster adds (presence from other nodes, a re-sync of pushes lost in
transit, a login undone when a backend fails half-way) goes through the
:class:`~bitchat.im.ConnectionCenter` interface, so one IMService serves both
modes; here the in-memory center stands in for Redis.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bitchat import RequestError, Server, ServiceUnavailable, Session, codes
from bitchat.im.delivery import DEVICE
from bitchat.im.memory import MemoryConnectionCenter
from bitchat.im.packets import Presence
from bitchat.im.service import IMService
from conftest import WAIT
from im_helpers import Inbox, clients_of, im_server


def im_of(server: Server) -> IMService:
    im = server.data["im"]
    assert type(im) is IMService
    return im


def session_of(server: Server, user_id: int) -> Session:
    (session,) = [s for s in server.sessions.values() if s.user_id == user_id]
    return session


class HeldPushes:
    """Holds back the pushes of the messages whose text is ``text`` (as pushes on
    their way between nodes, or lost there) until :meth:`release`; :meth:`stop`
    pushes the rest as usual again, and what it held stays lost."""

    def __init__(self, center: Any, text: str) -> None:
        self.center, self.text = center, text
        self.real = center.deliver
        self.held: list[tuple[Any, Any, int]] = []
        center.deliver = self._deliver

    def _deliver(self, message: Any, user_ids: Any, exclude_session: int = 0) -> None:
        if message.text == self.text:
            self.held.append((message, user_ids, exclude_session))
        else:
            self.real(message, user_ids, exclude_session)

    def stop(self) -> None:
        self.center.deliver = self.real

    def release(self) -> None:
        self.stop()
        for args in self.held:
            self.real(*args)
        self.held.clear()


class HeldAnswers:
    """Holds back the store's answers to ``user_id``'s sends (committed, as by a
    slower node) until :meth:`release`."""

    def __init__(self, im: IMService, user_id: int) -> None:
        self.im, self.user_id = im, user_id
        self.real = im._stored
        self.held: list[tuple[Any, ...]] = []
        self.holding = asyncio.Event()
        im._stored = self._stored  # type: ignore[method-assign]

    def _stored(self, *args: Any) -> None:
        if args[3].sender_id != self.user_id:
            self.real(*args)
            return
        self.held.append(args)
        self.holding.set()

    def release(self) -> None:
        self.im._stored = self.real  # type: ignore[method-assign]
        for args in self.held:
            self.real(*args)


def watch_gaps(server: Server, user_id: int) -> tuple[Any, list[Session]]:
    """The device state of ``user_id``'s session, and the sessions its gaps would
    push again (recorded instead)."""
    device = session_of(server, user_id).data[DEVICE]
    gaps: list[Session] = []
    device.on_gap = gaps.append
    return device, gaps


async def test_the_service_subscribes_to_its_connection_center(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        center = im_of(server).connections
        assert isinstance(center, MemoryConnectionCenter)
        assert center.on_presence is not None and center.on_resync is not None
        houyi = await clients.login("houyi")
        seen: asyncio.Queue[Presence] = asyncio.Queue()
        houyi.on_presence(seen.put_nowait)
        await houyi.online_users(watch=True)
        # A presence change from "another node" reaches this node's watchers.
        center.on_presence(99, "zed", True, 0)
        p = await asyncio.wait_for(seen.get(), WAIT)
        assert (p.user_id, p.name, p.online) == (99, "zed", True)


async def test_the_memory_center_publishes_presence_to_no_one(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        center = im_of(server).connections
        published: list[tuple[int, str, bool]] = []
        real = center.publish_presence

        def publish(user_id: int, name: str, online: bool, last_seen: int = 0) -> None:
            published.append((user_id, name, online))
            real(user_id, name, online, last_seen)  # a no-op in memory

        center.publish_presence = publish  # type: ignore[method-assign]
        gris = await clients.login("gris")
        assert gris.user is not None
        gris_id = gris.user.id
        await gris.logout()
        assert published == [(gris_id, "gris", True), (gris_id, "gris", False)]


async def test_a_resync_pushes_the_pending_messages_again(tmp_path: Path) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        # No acks, and no deduplication by the client: the second push is seen.
        houyi = await clients.login("houyi", auto_ack=False, dedupe_window=0)
        gris = await clients.login("gris")
        assert houyi.user is not None
        inbox = Inbox(houyi)
        await gris.send_p2p(houyi.user.id, "not acked")
        await inbox.wait_for(1)
        center = im_of(server).connections
        assert center.on_resync is not None
        center.on_resync(session_of(server, houyi.user.id))
        got = await inbox.wait_for(2)
        assert [m.text for m in got] == ["not acked", "not acked"]
        assert got[0].msg_id == got[1].msg_id


async def test_a_login_that_fails_half_way_leaves_the_session_logged_out(
    tmp_path: Path,
) -> None:
    """The connection center fails after the session took the user's id: the login
    is undone (not logged in, no pushes held back), and the next one works."""
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        center = im_of(server).connections
        real = center.attach
        calls = 0

        async def attach(user_id: int, session: Session) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise ServiceUnavailable("the connection center is down")
            return await real(user_id, session)

        center.attach = attach  # type: ignore[method-assign]
        houyi = await clients.connect()
        with pytest.raises(RequestError) as err:
            await houyi.login("houyi", "secret")
        assert err.value.code == codes.UNAVAILABLE
        (session,) = server.sessions.values()
        assert session.user_id is None and session.user_name is None
        assert not session.data  # no token, no sync holding pushes back
        with pytest.raises(RequestError) as err:
            await houyi.online_users()
        assert err.value.code == codes.UNAUTHENTICATED
        ok = await houyi.login("houyi", "secret")
        assert session.user_id == ok.user_id
        assert [u.name for u in await houyi.online_users()] == ["houyi"]


async def test_acks_after_a_gap_do_not_skip_the_lost_message(tmp_path: Path) -> None:
    """A push is lost in transit: the ack that shows the gap starts a re-sync (after
    push_gap_wait, short here), and an ack that comes while it is on its way (of a
    message pushed before it) must not move the cursor past the lost message, or
    the re-sync finds nothing to push."""
    async with im_server(tmp_path, push_gap_wait=0.05) as server, clients_of(server) as clients:
        houyi = await clients.login("houyi", auto_ack=False, dedupe_window=0)
        gris = await clients.login("gris")
        assert houyi.user is not None
        inbox = Inbox(houyi)
        im = im_of(server)
        await gris.send_p2p(houyi.user.id, "one")
        (one,) = await inbox.wait_for(1)
        houyi.ack([one.msg_id])
        await houyi.online_users()
        # "two" never reaches houyi's session (as a push lost between nodes).
        lost = HeldPushes(im.connections, "two")
        for text in ("two", "three", "four"):
            await gris.send_p2p(houyi.user.id, text)
        _, three, four = await inbox.wait_for(3)
        assert [three.text, four.text] == ["three", "four"]
        lost.stop()
        # The re-sync's read of what the device misses waits until the second ack is in.
        asked, release = asyncio.Event(), asyncio.Event()
        real_pending = im.messages.positions

        async def pending(*args: Any, **kw: Any) -> Any:
            asked.set()
            await asyncio.wait_for(release.wait(), WAIT)
            return await real_pending(*args, **kw)

        im.messages.positions = pending  # type: ignore[method-assign]
        houyi.ack([three.msg_id])  # shows the gap: a re-sync starts
        await asyncio.wait_for(asked.wait(), WAIT)
        houyi.ack([four.msg_id])
        await houyi.online_users()
        await asyncio.wait_for(im.messages.ack(0, 0, []), WAIT)
        release.set()
        got = await inbox.wait_for(4)
        assert got[3].text == "two"


async def test_a_device_registered_by_a_login_that_failed_still_starts_at_the_read_position(
    tmp_path: Path,
) -> None:
    """The login that registers a device fails right after: the device exists, so the
    next login of it is no longer its first, and it must have its cursors all the same
    (not start from each conversation's beginning)."""
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        houyi = await clients.login("houyi", device="phone")
        gris = await clients.login("gris")
        assert houyi.user is not None
        inbox = Inbox(houyi)
        await gris.send_p2p(houyi.user.id, "read already")
        await inbox.wait_for(1)
        await houyi.mark_read(peer_id=gris.user.id if gris.user else 0)
        im = im_of(server)
        real = im.messages.start_device
        calls = 0

        async def start_device(user_id: int, device_id: int) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise ServiceUnavailable("the message store is down")
            await real(user_id, device_id)

        im.messages.start_device = start_device  # type: ignore[method-assign]
        tablet = await clients.connect(device="tablet")
        with pytest.raises(RequestError):
            await tablet.login("houyi", "secret")
        ok = await tablet.login("houyi", "secret")
        assert ok.pending == 0


async def test_a_sync_that_fails_skips_nothing(tmp_path: Path) -> None:
    """The read of what a device missed fails at login while a live message is held:
    the device must not ack the live one past what it never got. The connection
    closes instead; the client comes back and gets it."""
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        houyi = await clients.login("houyi")
        gris = await clients.login("gris")
        assert houyi.user is not None
        houyi_id = houyi.user.id
        await houyi.close()
        await gris.send_p2p(houyi_id, "missed")
        im = im_of(server)
        real = im.messages.positions
        asked, go = asyncio.Event(), asyncio.Event()
        calls = 0

        async def pending(*args: Any, **kw: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                asked.set()
                await asyncio.wait_for(go.wait(), WAIT)
                raise ServiceUnavailable("the message store is down")
            return await real(*args, **kw)

        im.messages.positions = pending  # type: ignore[method-assign]
        back = await clients.connect(device="dev-houyi")
        got: asyncio.Queue[str] = asyncio.Queue()
        back.on_message(lambda m: got.put_nowait(m.text))
        await back.login("houyi", "secret")
        await asyncio.wait_for(asked.wait(), WAIT)
        await gris.send_p2p(houyi_id, "live")  # held: the sync is on its way
        go.set()
        texts: list[str] = []
        while "missed" not in texts:
            texts.append(await asyncio.wait_for(got.get(), WAIT))


async def test_a_push_lost_before_any_other_of_its_conversation_is_not_skipped(
    tmp_path: Path,
) -> None:
    """The first push a connection gets in a conversation is no proof it has what came
    before: with that push lost (a forward queue full), the next one must show a gap,
    in a conversation the device had from an earlier login and in a new one."""
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        houyi = await clients.login("houyi")
        gris = await clients.login("gris")
        chang = await clients.login("chang-e")
        assert houyi.user is not None
        houyi_id = houyi.user.id
        first = Inbox(houyi)
        await gris.send_p2p(houyi_id, "one")
        await first.wait_for(1)
        await houyi.online_users()
        await houyi.close()
        back = await clients.login("houyi")  # the same device: nothing pending
        got: asyncio.Queue[str] = asyncio.Queue()
        back.on_message(lambda m: got.put_nowait(m.text))
        center = im_of(server).connections
        real_deliver = center.deliver

        def deliver(message: Any, user_ids: Any, exclude_session: int = 0) -> None:
            if message.text not in ("two", "first"):
                real_deliver(message, user_ids, exclude_session)

        center.deliver = deliver  # type: ignore[method-assign]
        await gris.send_p2p(houyi_id, "two")
        await gris.send_p2p(houyi_id, "three")
        await chang.send_p2p(houyi_id, "first")
        await chang.send_p2p(houyi_id, "second")
        center.deliver = real_deliver  # type: ignore[method-assign]
        texts: set[str] = set()
        while not {"two", "first"} <= texts:
            texts.add(await asyncio.wait_for(got.get(), WAIT))


async def test_a_device_that_sent_last_is_pushed_what_came_after_once(tmp_path: Path) -> None:
    """The device's own message sits between its cursor and what it missed: it has
    that one (it sent it), so what comes after it is no gap to push again."""
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        houyi = await clients.login("houyi")
        gris = await clients.login("gris")
        assert houyi.user is not None and gris.user is not None
        await houyi.send_p2p(gris.user.id, "hi")
        await houyi.close()
        await gris.send_p2p(houyi.user.id, "yo")
        back = await clients.connect(device="dev-houyi", dedupe_window=0)
        got: list[str] = []
        came = asyncio.Event()

        def add(m: Any) -> None:
            got.append(m.text)
            came.set()

        back.on_message(add)
        ok = await back.login("houyi", "secret")
        assert ok.pending == 1
        await asyncio.wait_for(came.wait(), WAIT)
        # Its ack is in, and whatever it would start has had its round trips.
        for _ in range(3):
            await back.online_users()
            await asyncio.wait_for(im_of(server).messages.ack(0, 0, []), WAIT)
            await back.conversations()
        assert got == ["yo"]


async def test_a_sync_moves_the_cursor_over_the_devices_own_messages(tmp_path: Path) -> None:
    """A device that only sends is pushed nothing to ack: its next sync moves its
    cursor over its own messages, or each login would read them all again."""
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        houyi = await clients.login("houyi")
        gris = await clients.login("gris")
        assert houyi.user is not None and gris.user is not None
        houyi_id, gris_id = houyi.user.id, gris.user.id
        for text in ("a", "b"):
            await houyi.send_p2p(gris_id, text)
        await houyi.close()
        await gris.send_p2p(houyi_id, "c")  # after them: not passed over
        im = im_of(server)
        real = im.messages.ack
        moved: asyncio.Queue[list[tuple[str, int]]] = asyncio.Queue()

        def ack(user_id: int, device_id: int, cursors: Any) -> Any:
            if user_id == houyi_id and cursors:  # not the login's empty barrier
                moved.put_nowait(list(cursors))
            return real(user_id, device_id, cursors)

        im.messages.ack = ack  # type: ignore[method-assign]
        back = await clients.connect(device="dev-houyi", auto_ack=False)
        ok = await back.login("houyi", "secret")
        assert ok.pending == 1
        conv = f"p:{min(houyi_id, gris_id)}:{max(houyi_id, gris_id)}"
        assert await asyncio.wait_for(moved.get(), WAIT) == [(conv, 2)]


async def test_a_device_forgotten_while_connected_is_not_pushed_everything_again(
    tmp_path: Path,
) -> None:
    """Over the device cap the server forgets a device that is still connected, and
    its cursors with it: a re-sync of that connection would push every message from
    the start. It closes instead; the client logs in again as a new device."""
    async with im_server(tmp_path, max_devices_per_user=2) as server, clients_of(server) as clients:
        phone = await clients.login("houyi", device="phone", dedupe_window=0)
        gris = await clients.login("gris")
        assert phone.user is not None and gris.user is not None
        inbox = Inbox(phone)
        for text in ("a", "b", "c"):
            await gris.send_p2p(phone.user.id, text)
        await inbox.wait_for(3)
        await phone.mark_read(peer_id=gris.user.id)
        await clients.login("houyi", device="two")
        await clients.login("houyi", device="three")  # "phone" is forgotten
        (session,) = [
            s
            for s in server.sessions.values()
            if s.user_id == phone.user.id and s.data[DEVICE].name == "phone"
        ]
        relogged: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        phone.on_relogin(lambda ok, error: relogged.done() or relogged.set_result(ok))
        center = im_of(server).connections
        assert center.on_resync is not None
        center.on_resync(session)
        assert await asyncio.wait_for(relogged, WAIT) is not None
        await phone.online_users()
        assert len(inbox.messages) == 3


async def test_a_lost_first_push_in_a_group_joined_on_the_connection_is_pushed_again(
    tmp_path: Path,
) -> None:
    """The group's start is known from the join: a lost first message there is a gap
    at the ack of the next, and the re-sync pushes it."""
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        gris = await clients.login("gris")
        group = await gris.create_group("moon")
        await gris.send_group(group.group_id, "before the join")
        houyi = await clients.login("houyi")
        inbox = Inbox(houyi)
        await houyi.join_group(group.group_id)
        center = im_of(server).connections
        real_deliver = center.deliver

        def deliver(message: Any, user_ids: Any, exclude_session: int = 0) -> None:
            if message.text != "first":  # lost between nodes, as it were
                real_deliver(message, user_ids, exclude_session)

        center.deliver = deliver  # type: ignore[method-assign]
        await gris.send_group(group.group_id, "first")
        await gris.send_group(group.group_id, "second")
        got = await inbox.wait_for(2)  # "second", then "first" from the re-sync
        assert sorted(m.text for m in got) == ["first", "second"]


async def test_a_join_is_answered_joined_when_reading_its_start_fails(tmp_path: Path) -> None:
    """The join is committed; where the group starts for the user's connections is
    read after it, only to show a lost first push as a gap. That read failing must
    not answer the join with an error: the user is in the group."""
    async with im_server(tmp_path) as server, clients_of(server) as clients:
        gris = await clients.login("gris")
        houyi = await clients.login("houyi")
        group = await gris.create_group("moon")
        im = im_of(server)
        real = im.messages.positions

        async def positions(*args: Any, **kw: Any) -> Any:
            raise ServiceUnavailable("the message store is down")

        im.messages.positions = positions  # type: ignore[method-assign]
        try:
            info = await houyi.join_group(group.group_id)
        finally:
            im.messages.positions = real  # type: ignore[method-assign]
        assert info.members == 2
        inbox = Inbox(houyi)
        await gris.send_group(group.group_id, "welcome")
        assert [m.text for m in await inbox.wait_for(1)] == ["welcome"]


async def test_a_partner_message_pushed_before_the_own_commit_is_no_gap(tmp_path: Path) -> None:
    """In a cluster a partner's message can be pushed to a device before its own
    earlier send is answered by the store (another node stored the partner's). The
    ack of the partner's message then sees a gap: the device's own message fills it,
    so nothing is pushed again. A real gap behind a send in flight is still pushed
    again, once that send is answered (no wait here: push_gap_wait 0)."""
    async with im_server(tmp_path, push_gap_wait=0) as server, clients_of(server) as clients:
        houyi = await clients.login("houyi", auto_ack=False, dedupe_window=0)
        gris = await clients.login("gris")
        assert houyi.user is not None and gris.user is not None
        inbox = Inbox(houyi)
        im = im_of(server)
        device, gaps = watch_gaps(server, houyi.user.id)
        # houyi's own send is committed, but its answer waits (as a slower node's).
        answers = HeldAnswers(im, houyi.user.id)
        mine = asyncio.ensure_future(houyi.send_p2p(gris.user.id, "mine"))
        await asyncio.wait_for(answers.holding.wait(), WAIT)
        await gris.send_p2p(houyi.user.id, "theirs")
        (theirs,) = await inbox.wait_for(1)
        assert theirs.text == "theirs" and theirs.seq == 2  # seq 1 is houyi's, unanswered
        houyi.ack([theirs.msg_id])
        await houyi.online_users()  # the ack is handled
        assert gaps == []  # a send is in flight: the gap waits for its answer
        answers.release()
        assert (await asyncio.wait_for(mine, WAIT)).seq == 1
        await houyi.online_users()
        assert gaps == [] and not device.ahead  # its own message filled the gap

        # Now a push really lost behind a send in flight: seq 4 never reaches houyi.
        lost = HeldPushes(im.connections, "lost")
        assert (await houyi.send_p2p(gris.user.id, "answered")).seq == 3
        await gris.send_p2p(houyi.user.id, "lost")
        await gris.send_p2p(houyi.user.id, "after")
        (_, after) = await inbox.wait_for(2)
        assert after.text == "after" and after.seq == 5
        lost.stop()
        answers = HeldAnswers(im, houyi.user.id)
        flying = asyncio.ensure_future(houyi.send_p2p(gris.user.id, "in flight"))
        await asyncio.wait_for(answers.holding.wait(), WAIT)  # stored, its answer held
        houyi.ack([after.msg_id])
        await houyi.online_users()
        assert gaps == []  # not yet: the send in flight might have filled it
        answers.release()
        await asyncio.wait_for(flying, WAIT)
        await houyi.online_users()
        assert len(gaps) == 1  # it did not: the device gets what it misses again


async def test_a_message_late_from_another_node_within_the_wait_is_no_gap(tmp_path: Path) -> None:
    """A partner's message n is still on its way (its node committed, then forwards)
    when n + 1 is pushed and acked: the gap waits push_gap_wait, and once n
    arrives the check finds nothing to push again."""
    async with im_server(tmp_path, push_gap_wait=3600) as server, clients_of(server) as clients:
        houyi = await clients.login("houyi", auto_ack=False, dedupe_window=0)
        gris = await clients.login("gris")
        assert houyi.user is not None
        inbox = Inbox(houyi)
        center = im_of(server).connections
        device, gaps = watch_gaps(server, houyi.user.id)
        late = HeldPushes(center, "late")
        await gris.send_p2p(houyi.user.id, "late")
        await gris.send_p2p(houyi.user.id, "next")
        (nxt,) = await inbox.wait_for(1)
        houyi.ack([nxt.msg_id])
        await houyi.online_users()
        assert device.gap_checks and gaps == []  # waiting, not re-syncing
        late.release()
        (_, arrived) = await inbox.wait_for(2)
        assert arrived.text == "late" and not device.ahead
        _waits_over(device)  # the gap closed meanwhile
        assert gaps == [] and not device.gap_checks

        # A gap that opens while the wait for an earlier one runs gets a wait of its own.
        late = HeldPushes(center, "late")
        await gris.send_p2p(houyi.user.id, "late")
        await gris.send_p2p(houyi.user.id, "one")
        one = (await inbox.wait_for(3))[-1]
        houyi.ack([one.msg_id])
        await houyi.online_users()
        late.release()  # the first gap closes...
        await inbox.wait_for(4)
        late = HeldPushes(center, "late")
        await gris.send_p2p(houyi.user.id, "late")  # ...and a second one opens
        await gris.send_p2p(houyi.user.id, "two")
        (*_, two) = await inbox.wait_for(5)
        houyi.ack([two.msg_id])
        await houyi.online_users()
        _waits_over(device)  # the first one's wait: the second one waits again
        assert gaps == [] and device.gap_checks
        late.release()
        await inbox.wait_for(6)
        _waits_over(device)
        assert gaps == [] and not device.gap_checks


def _waits_over(device: Any) -> None:
    """What the timers of the gaps waited for do when they fire (the wait is an hour
    in these tests, so none does by itself)."""
    for conv, wait in list((device.gap_checks or {}).items()):
        device.gap_due(conv, wait)


async def test_each_conversation_s_gap_waits_its_own_time(tmp_path: Path) -> None:
    """Gaps in two conversations, the second shown while the first one's wait runs:
    the first one's wait ending decides only the first; a re-sync cancels the
    waits of the others."""
    async with im_server(tmp_path, push_gap_wait=3600) as server, clients_of(server) as clients:
        houyi = await clients.login("houyi", auto_ack=False, dedupe_window=0)
        gris = await clients.login("gris")
        chang = await clients.login("chang")
        assert houyi.user is not None
        inbox = Inbox(houyi)
        device, gaps = watch_gaps(server, houyi.user.id)
        lost = HeldPushes(im_of(server).connections, "lost")
        await gris.send_p2p(houyi.user.id, "lost")
        await gris.send_p2p(houyi.user.id, "after")
        (first,) = await inbox.wait_for(1)
        houyi.ack([first.msg_id])
        await houyi.online_users()
        await chang.send_p2p(houyi.user.id, "lost")
        await chang.send_p2p(houyi.user.id, "after")
        second = (await inbox.wait_for(2))[-1]
        houyi.ack([second.msg_id])
        await houyi.online_users()
        lost.stop()
        checks = dict(device.gap_checks or {})
        assert len(checks) == 2
        (gris_conv, gris_wait), (chang_conv, chang_wait) = checks.items()
        device.gap_due(gris_conv, gris_wait)  # gris's wait is over: only it is decided
        assert len(gaps) == 1 and list(device.gap_checks or {}) == [chang_conv]
        device.reset()  # the re-sync it starts: the other wait is cancelled
        assert not device.gap_checks and chang_wait.timer.cancelled()
