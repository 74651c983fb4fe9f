"""The sync model end to end, over real sockets, in both modes: standalone (SQLite)
and a cluster of two nodes (PostgreSQL + Redis), where each user's devices sit on
the node the test puts them on.

Devices that come back get exactly what they missed; a new device starts at the
user's read position; reading on one device clears the others and reaches the
sender; delivered and read receipts; group read counts; the conversation list.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from bitchat import RequestError, Server, codes
from bitchat.app import build_server
from bitchat.im.client import IMClient
from bitchat.im.packets import (
    ConversationList,
    CreateGroup,
    GetConversations,
    GetReceipts,
    GroupInfo,
    JoinGroup,
    LeaveGroup,
    MarkRead,
    ReadState,
    Receipt,
    Receipts,
)
from bitchat.protocol.packets import Packet
from cluster_support import (
    REDIS_URL,
    cluster_settings,
    pg_dsn_fixture,  # noqa: F401 (fixture)
    redis_prefix_fixture,  # noqa: F401 (fixture)
)
from conftest import WAIT
from im_helpers import Inbox, clients_of, im_server, im_settings

MODES = ["standalone", "cluster"]


class Deployment:
    """One standalone server, or two cluster nodes; ``node(i)`` is where a client of
    side ``i`` connects (the same server twice when standalone)."""

    def __init__(self, make: Callable[[int], Server]) -> None:
        self._make = make
        self.servers: list[Server] = []
        self.clients: list[IMClient] = []

    async def start(self, count: int) -> None:
        for i in range(count):
            server = self._make(i)
            await server.start()
            self.servers.append(server)

    def node(self, i: int) -> Server:
        return self.servers[i % len(self.servers)]

    async def restart(self) -> None:
        """Every server stops and starts again on the same stores."""
        await self.close_clients()
        count = len(self.servers)
        for server in reversed(self.servers):
            await asyncio.wait_for(server.stop(), 4 * WAIT)
        self.servers = []
        await self.start(count)

    async def connect(self, side: int, device: str = "", **kw: Any) -> IMClient:
        port = self.node(side).address[1]
        im = IMClient("127.0.0.1", port, self.node(side).settings, device=device, **kw)
        self.clients.append(im)
        await im.connect(WAIT)
        return im

    async def login(self, side: int, name: str, device: str = "", **kw: Any) -> IMClient:
        im = await self.connect(side, device, **kw)
        await im.login(name, "secret")
        return im

    async def close_clients(self) -> None:
        for im in self.clients:
            await im.close()
        self.clients = []

    async def stop(self) -> None:
        await self.close_clients()
        for server in reversed(self.servers):
            await asyncio.wait_for(server.stop(), 4 * WAIT)


@pytest.fixture(autouse=True)
def _cluster_services(request: pytest.FixtureRequest) -> None:
    """The cluster's PostgreSQL database and Redis prefix, for the cluster cases (taken
    here: an async fixture cannot be asked for from inside a running test)."""
    if request.node.callspec.params.get("mode") == "cluster":
        request.node.services = (
            request.getfixturevalue("pg_dsn"),
            request.getfixturevalue("redis_prefix"),
        )


@contextlib.asynccontextmanager
async def deployment(
    request: pytest.FixtureRequest, tmp_path: Path, **changes: Any
) -> AsyncIterator[Deployment]:
    mode = request.node.callspec.params["mode"]
    if mode == "standalone":

        def make(i: int) -> Server:
            return build_server(im_settings(tmp_path, host="127.0.0.1", port=0, **changes))

        d = Deployment(make)
        await d.start(1)
    else:
        pg_dsn, redis_prefix = request.node.services

        def make(i: int) -> Server:
            settings = cluster_settings(
                host="127.0.0.1",
                port=0,
                mode="cluster",
                redis_url=REDIS_URL,
                pg_dsn=pg_dsn,
                node_id=i + 1,
                redis_prefix=redis_prefix,
                **changes,
            )
            return build_server(settings)

        d = Deployment(make)
        await d.start(2)
    try:
        yield d
    finally:
        await d.stop()


class Pushes:
    """The pushes of one type an IMClient gets, in order."""

    def __init__(self, im: IMClient, cls: type[Packet]) -> None:
        self.got: list[Any] = []
        self._changed = asyncio.Event()
        im.client.on(cls, self._add)

    def _add(self, p: Any) -> None:
        self.got.append(p)
        self._changed.set()

    async def until(self, check: Callable[[Any], bool]) -> Any:
        """The first push that passes ``check``, once it has arrived."""

        async def arrived() -> Any:
            while True:
                for p in self.got:
                    if check(p):
                        return p
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(arrived(), WAIT)


def uid(im: IMClient) -> int:
    assert im.user is not None
    return im.user.id


async def conversations(im: IMClient) -> list[dict[str, Any]]:
    page = await im.client.request(GetConversations())
    assert isinstance(page, ConversationList)
    return page.conversations


async def settled(im: IMClient) -> None:
    """The client's automatic acks have reached the server and been written: a round
    trip after them, then an empty cursor move through the store."""
    await im.online_users()


async def acked_through(server: Server) -> None:
    im = server.data["im"]
    await asyncio.wait_for(im.messages.ack(0, 0, []), WAIT)


@pytest.mark.parametrize("mode", MODES)
async def test_two_devices_of_one_user_both_offline_both_get_everything(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(request, tmp_path) as d:
        phone = await d.login(1, "houyi", "phone")
        laptop = await d.login(1, "houyi", "laptop")
        gris = await d.login(0, "gris", "gris-1")
        group = await gris.client.request(CreateGroup("moon"))
        assert isinstance(group, GroupInfo)
        await phone.client.request(JoinGroup(group.group_id))
        await phone.close()
        await laptop.close()

        sent = [await gris.send_p2p(uid(phone), f"p{i}") for i in range(5)]
        sent += [await gris.send_group(group.group_id, f"g{i}") for i in range(3)]
        assert [a.seq for a in sent] == [1, 2, 3, 4, 5, 1, 2, 3]
        for device in ("phone", "laptop"):
            back = await d.connect(1, device)
            inbox = Inbox(back)
            ok = await back.login("houyi", "secret")
            assert ok.device == device and ok.pending == 8
            got = await inbox.wait_for(8)
            assert [m.msg_id for m in got] == [a.msg_id for a in sent]
            await settled(back)
            await acked_through(d.node(1))
            await back.close()
        # Each device has acked: a third login of each gets nothing again.
        for device in ("phone", "laptop"):
            again = await d.connect(1, device)
            assert (await again.login("houyi", "secret")).pending == 0


@pytest.mark.parametrize("mode", MODES)
async def test_a_device_offline_across_a_restart_gets_what_it_missed(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(request, tmp_path) as d:
        phone = await d.login(1, "houyi", "phone")
        laptop = await d.login(1, "houyi", "laptop")
        Inbox(laptop)  # a consumer: what comes to the laptop is acked, not kept for one
        gris = await d.login(0, "gris", "g")
        houyi_id = uid(phone)
        await phone.close()
        # The laptop writes while the phone is away: the phone gets it later, the
        # laptop never gets its own message pushed back.
        mine = await laptop.send_p2p(uid(gris), "from the laptop")
        theirs = [await gris.send_p2p(houyi_id, f"m{i}") for i in range(3)]
        await settled(laptop)
        await acked_through(d.node(1))
        await d.restart()

        phone = await d.connect(1, "phone")
        inbox = Inbox(phone)
        ok = await phone.login("houyi", "secret")
        assert ok.pending == 4
        got = await inbox.wait_for(4)
        assert [m.msg_id for m in got] == [mine.msg_id] + [a.msg_id for a in theirs]
        assert [m.seq for m in got] == [1, 2, 3, 4]
        laptop = await d.connect(1, "laptop")
        assert (await laptop.login("houyi", "secret")).pending == 0


@pytest.mark.parametrize("mode", MODES)
async def test_a_new_device_starts_at_the_read_position(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(request, tmp_path) as d:
        phone = await d.login(1, "houyi", "phone")
        inbox = Inbox(phone)
        gris = await d.login(0, "gris", "g")
        for i in range(5):
            await gris.send_p2p(uid(phone), f"m{i}")
        await inbox.wait_for(5)
        state = await phone.client.request(MarkRead(peer_id=uid(gris), seq=3))
        assert state == ReadState(uid(gris), 0, 3, 2)

        tablet = await d.connect(1, "tablet")
        tablet_inbox = Inbox(tablet)
        ok = await tablet.login("houyi", "secret")
        assert ok.pending == 2
        assert [m.text for m in await tablet_inbox.wait_for(2)] == ["m3", "m4"]
        (talk,) = await conversations(tablet)
        assert (talk["kind"], talk["peer_id"], talk["name"]) == ("p2p", uid(gris), "gris")
        assert (talk["last_seq"], talk["read_seq"], talk["unread"]) == (5, 3, 2)
        assert talk["last_message"]["text"] == "m4"


@pytest.mark.parametrize("mode", MODES)
async def test_reading_on_one_device_clears_the_other_and_reaches_the_sender(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(request, tmp_path) as d:
        phone = await d.login(1, "houyi", "phone")
        laptop = await d.login(0, "houyi", "laptop")  # on the other node in a cluster
        laptop_reads = Pushes(laptop, ReadState)
        gris = await d.login(0, "gris", "g")
        receipts = Pushes(gris, Receipt)
        inbox = Inbox(phone)
        sent = [await gris.send_p2p(uid(phone), f"m{i}") for i in range(3)]
        await inbox.wait_for(3)
        # The phone's automatic acks make a "delivered" receipt.
        delivered = await receipts.until(lambda r: r.kind == "delivered" and r.seq == 3)
        assert (delivered.user_id, delivered.name, delivered.group_id) == (uid(phone), "houyi", 0)
        assert [c["unread"] for c in await conversations(laptop)] == [3]

        state = await phone.client.request(MarkRead(peer_id=uid(gris)))
        assert state == ReadState(uid(gris), 0, 3, 0)
        other = await laptop_reads.until(lambda s: s.read_seq == 3)
        assert other == ReadState(uid(gris), 0, 3, 0)
        read = await receipts.until(lambda r: r.kind == "read")
        assert (read.user_id, read.seq, read.group_id) == (uid(phone), 3, 0)
        assert [c["unread"] for c in await conversations(laptop)] == [0]
        (mine,) = await conversations(gris)
        assert (mine["peer_read_seq"], mine["peer_delivered_seq"]) == (3, 3)
        assert mine["read_seq"] == mine["last_seq"] == sent[-1].seq  # own messages are read
        # Reading never moves back.
        state = await phone.client.request(MarkRead(peer_id=uid(gris), seq=1))
        assert state.read_seq == 3


@pytest.mark.parametrize("mode", MODES)
async def test_group_read_counts_and_who(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(request, tmp_path) as d:
        gris = await d.login(0, "gris", "g")
        houyi = await d.login(1, "houyi", "h")
        chang = await d.login(1, "chang-e", "c")
        wu = await d.login(0, "wugang", "w", auto_ack=False)
        group = await gris.client.request(CreateGroup("moon"))
        assert isinstance(group, GroupInfo)
        gid = group.group_id
        for im in (houyi, chang, wu):
            await im.client.request(JoinGroup(gid))
        receipts = Pushes(gris, Receipt)
        inboxes = [Inbox(im) for im in (houyi, chang)]
        first = await gris.send_group(gid, "one")
        await gris.send_group(gid, "two")
        for inbox in inboxes:
            await inbox.wait_for(2)
        for im in (houyi, chang):
            await settled(im)
        for server in d.servers:
            await acked_through(server)

        await houyi.client.request(MarkRead(group_id=gid, seq=first.seq))
        read = await receipts.until(lambda r: r.kind == "read")
        assert (read.user_id, read.group_id, read.seq) == (uid(houyi), gid, first.seq)
        counts = await gris.client.request(GetReceipts(gid, first.seq, who=True))
        assert isinstance(counts, Receipts)
        # wugang never acked: he has it on no device the server knows of.
        assert (counts.delivered, counts.read) == (2, 1)
        assert counts.readers == [
            {"id": uid(houyi), "name": "houyi", "read": True},
            {"id": uid(chang), "name": "chang-e", "read": False},
        ]
        quiet = await gris.client.request(GetReceipts(gid, first.seq))
        assert isinstance(quiet, Receipts) and quiet.readers == []
        # Only members may ask.
        outsider = await d.login(0, "mallory", "m")
        with pytest.raises(RequestError) as info:
            await outsider.client.request(GetReceipts(gid, first.seq))
        assert info.value.code == codes.NOT_MEMBER
        # A member who joins later starts at the group's last message: nothing unread.
        late = await d.login(1, "late", "l")
        await late.client.request(JoinGroup(gid))
        (talk,) = await conversations(late)
        assert (talk["kind"], talk["group_id"], talk["name"]) == ("group", gid, "moon")
        assert (talk["unread"], talk["last_seq"]) == (0, 2)


@pytest.mark.parametrize("mode", MODES)
async def test_the_conversation_list_orders_by_activity_pages_and_survives_a_restart(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(request, tmp_path) as d:
        houyi = await d.login(0, "houyi", "h")
        peers = [await d.login(i % 2, f"peer{i}", f"p{i}") for i in range(5)]
        for i, peer in enumerate(peers):
            for n in range(i + 1):
                await peer.send_p2p(uid(houyi), f"{i}.{n}")
        await peers[1].send_p2p(uid(houyi), "latest")  # peer1's talk is the newest now
        houyi_id = uid(houyi)
        await d.restart()

        houyi = await d.login(1, "houyi", "h")
        first = await houyi.client.request(GetConversations(limit=2))
        assert isinstance(first, ConversationList) and first.more
        rest = await houyi.client.request(
            GetConversations(limit=10, before=first.conversations[-1]["activity"])
        )
        assert isinstance(rest, ConversationList) and not rest.more
        listed = first.conversations + rest.conversations
        assert [c["name"] for c in listed] == ["peer1", "peer4", "peer3", "peer2", "peer0"]
        assert [c["unread"] for c in listed] == [3, 5, 4, 3, 1]
        assert listed[0]["last_message"]["text"] == "latest"
        assert all(c["last_message"]["to"] == houyi_id for c in listed)


@pytest.mark.parametrize("mode", MODES)
async def test_a_login_without_a_device_gets_one_and_its_token_keeps_it(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(request, tmp_path) as d:
        old = await d.connect(0)  # an older client: it names no device
        ok = await old.login("houyi", "secret")
        assert ok.device.startswith("d-")
        again = await d.connect(1)
        by_token = await again.login(token=ok.token)
        assert by_token.device == ok.device
        # A token is its device's: naming another device does not change it.
        other = await d.connect(0, device="elsewhere")
        assert (await other.login(token=ok.token)).device == ok.device
        bad = await d.connect(0, device="no spaces")
        with pytest.raises(RequestError) as info:
            await bad.login("houyi", "secret")
        assert info.value.code == codes.INVALID_PACKET


@pytest.mark.parametrize("mode", MODES)
async def test_over_the_device_cap_the_device_seen_longest_ago_is_forgotten(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(request, tmp_path, max_devices_per_user=2) as d:
        first = await d.login(0, "houyi", "one")
        token = first.token
        await d.login(0, "houyi", "two")
        await d.login(1, "houyi", "three")  # "one" goes, with its token
        late = await d.connect(0)
        with pytest.raises(RequestError) as info:
            await late.login(token=token or "")
        assert info.value.code == codes.LOGIN_FAILED


async def test_acks_still_queued_when_a_device_comes_back_are_not_counted_again(
    tmp_path: Path,
) -> None:
    async with im_server(tmp_path) as server, clients_of(server) as c:
        houyi = await c.login("houyi")
        inbox = Inbox(houyi)
        gris = await c.login("gris")
        store = server.data["im"].messages
        gate = threading.Event()  # holds the writer thread on the batch with the ack
        write = store._write_batch

        def held(db: Any, stores: Any, acks: Any) -> Any:
            if acks:
                gate.wait(WAIT)
            return write(db, stores, acks)

        store._write_batch = held
        ack = store.ack

        def barrier_opens_the_gate(user_id: int, device_id: int, cursors: Any) -> Any:
            if not cursors:  # the login's barrier is queued behind the held ack
                gate.set()
            return ack(user_id, device_id, cursors)

        store.ack = barrier_opens_the_gate
        try:
            await gris.send_p2p(uid(houyi), "hi")
            await inbox.wait_for(1)
            await houyi.online_users()  # after the one-way ack: it is queued in the store
            await houyi.close()
            again = await c.connect(device="dev-houyi")
            ok = await asyncio.wait_for(again.login("houyi", "secret"), WAIT)
            assert ok.pending == 0
        finally:
            gate.set()


@pytest.mark.parametrize("mode", MODES)
async def test_a_member_who_left_gets_no_read_receipts_of_the_group(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(request, tmp_path) as d:
        gris = await d.login(0, "gris", "g")
        houyi = await d.login(0, "houyi", "h")
        group = await gris.client.request(CreateGroup("moon"))
        assert isinstance(group, GroupInfo)
        gid = group.group_id
        await houyi.client.request(JoinGroup(gid))
        inbox = Inbox(houyi)
        await gris.send_group(gid, "one")
        await inbox.wait_for(1)
        await gris.client.request(LeaveGroup(gid))
        await gris.send_p2p(uid(houyi), "hi")
        await inbox.wait_for(2)
        receipts = Pushes(gris, Receipt)
        await houyi.client.request(MarkRead(group_id=gid))
        # Pushed after the group's, on the same way: once it is here, so is that one.
        await houyi.client.request(MarkRead(peer_id=uid(gris)))
        await receipts.until(lambda r: r.kind == "read" and r.group_id == 0)
        assert [r for r in receipts.got if r.group_id == gid] == []


@pytest.mark.parametrize("mode", MODES)
async def test_a_member_who_leaves_and_joins_again_gets_each_message_once(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    """Back in a group on the same connection, the device starts at the new join: the
    group's seqs it skipped while away are no gap in what it was pushed."""
    async with deployment(request, tmp_path) as d:
        gris = await d.login(0, "gris", "g")
        houyi = await d.login(0, "houyi", "h", dedupe_window=0)
        group = await gris.client.request(CreateGroup("moon"))
        assert isinstance(group, GroupInfo)
        gid = group.group_id
        await houyi.client.request(JoinGroup(gid))
        inbox = Inbox(houyi)
        await gris.send_group(gid, "one")
        await inbox.wait_for(1)
        await houyi.client.request(LeaveGroup(gid))
        await gris.send_group(gid, "away")
        await houyi.client.request(JoinGroup(gid))
        await gris.send_group(gid, "two")
        await inbox.wait_for(2)
        await settled(houyi)  # its ack of "two" is in
        await conversations(houyi)
        await gris.send_group(gid, "three")
        got = await inbox.wait_for(3)
        assert [m.text for m in got] == ["one", "two", "three"]


@pytest.mark.parametrize("mode", MODES)
async def test_a_backlog_over_many_conversations_comes_in_id_order_once(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(request, tmp_path, offline_batch=4) as d:
        houyi = await d.login(1, "houyi", "phone")
        peers = [await d.login(i % 2, f"peer{i}", f"p{i}") for i in range(3)]
        group = await peers[0].client.request(CreateGroup("moon"))
        assert isinstance(group, GroupInfo)
        for im in (houyi, peers[1]):
            await im.client.request(JoinGroup(group.group_id))
        await houyi.close()
        sent = []
        for n in range(5):  # interleaved: every page of 4 mixes conversations
            for peer in peers:
                sent.append(await peer.send_p2p(uid(houyi), f"{n}"))
            sent.append(await peers[1].send_group(group.group_id, f"g{n}"))
        back = await d.connect(1, "phone")
        inbox = Inbox(back)
        assert (await back.login("houyi", "secret")).pending == 20
        got = await inbox.wait_for(20)
        assert [m.msg_id for m in got] == [a.msg_id for a in sent]
        await settled(back)
        for server in d.servers:
            await acked_through(server)
        again = await d.connect(1, "phone")
        assert (await again.login("houyi", "secret")).pending == 0


async def test_a_page_of_long_messages_is_cut_to_fit_in_a_frame(tmp_path: Path) -> None:
    # Texts of control characters: six bytes each in JSON. At 64 KiB a frame, a page
    # of 50 would not fit; the server sends what fits and says there is more.
    async with im_server(tmp_path, max_frame_size=64 * 1024) as server, clients_of(server) as c:
        houyi = await c.login("houyi")
        peers = [await c.login(f"peer{i}") for i in range(5)]
        text = "\x01" * 4000
        for peer in peers:
            await peer.send_p2p(uid(houyi), text)
        listed: list[dict[str, Any]] = []
        before = 0
        while True:
            page = await houyi.client.request(GetConversations(limit=50, before=before))
            assert isinstance(page, ConversationList) and 1 <= len(page.conversations) <= 2
            listed += page.conversations
            if not page.more:
                break
            before = page.conversations[-1]["activity"]
        assert sorted(c["name"] for c in listed) == [f"peer{i}" for i in range(5)]
        for _ in range(4):
            await peers[0].send_p2p(uid(houyi), text)
        first = await houyi.history(peer_id=uid(peers[0]), limit=50)
        assert 1 <= len(first.messages) <= 2 and first.more


async def test_a_page_at_its_largest_fits_in_a_frame(tmp_path: Path) -> None:
    # Every field of an entry counts, at its largest once encoded, not only the text:
    # client message ids of control characters (six bytes each in JSON) where they may
    # be long, and group names of four-byte characters.
    async with (
        im_server(tmp_path, max_client_msg_id_length=1024) as server,
        clients_of(server) as c,
    ):
        gris = await c.login("gris")
        houyi = await c.login("houyi")
        text, cmid = "\x01" * 4096, "\x01" * 1020
        for i in range(45):
            g = await gris.create_group(f"{i:02d}" + "\U0001f600" * 62)
            await gris.send_group(g.group_id, text, client_msg_id=f"{cmid}g{i:02d}")
            await gris.send_p2p(uid(houyi), text, client_msg_id=f"{cmid}p{i:02d}")
        listed: list[dict[str, Any]] = []
        before = 0
        for _ in range(46):  # bounded: at least one entry a page
            page = await gris.client.request(GetConversations(limit=200, before=before))
            assert isinstance(page, ConversationList) and page.conversations
            listed += page.conversations
            if not page.more:
                break
            before = page.conversations[-1]["activity"]
        assert len(listed) == 46
        seen: list[int] = []
        before_seq = 0
        for _ in range(45):
            history = await houyi.history(peer_id=uid(gris), limit=200, before_seq=before_seq)
            assert history.messages
            seen += [m["seq"] for m in history.messages]
            if not history.more:
                break
            before_seq = history.messages[-1]["seq"]
        assert sorted(seen) == list(range(1, 46))


@pytest.mark.parametrize("mode", MODES)
async def test_a_token_from_before_devices_becomes_one_device(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    async with deployment(request, tmp_path) as d:
        houyi = await d.login(0, "houyi", "phone")
        im = d.node(0).data["im"]
        old = await im.users.issue_token(uid(houyi), 60.0)  # no device: as before version 5
        first = await (await d.connect(0)).login(token=old)
        again = await (await d.connect(1)).login(token=old)
        assert first.token == again.token == old
        assert first.device == again.device != "phone"


@pytest.mark.parametrize("mode", MODES)
async def test_two_first_uses_of_a_token_from_before_devices_at_once(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    # Two logins with one token from before devices, at once, naming two devices: the
    # token is bound to one of them; the other login gets a token of its own device.
    async with deployment(request, tmp_path) as d:
        houyi = await d.login(0, "houyi", "phone")
        im = d.node(0).data["im"]
        for round_ in range(5):
            old = await im.users.issue_token(uid(houyi), 60.0)
            a, b = await d.connect(0, f"a{round_}"), await d.connect(1, f"b{round_}")
            oks = await asyncio.gather(a.login(token=old), b.login(token=old))
            for ok in oks:
                back = await (await d.connect(0)).login(token=ok.token)
                assert back.device == ok.device, "a token of another device"
