"""What a sync reads ahead of what it pushes (:class:`bitchat.im.service.Backlog`), on
a real standalone server: a device with a backlog in many conversations."""

from __future__ import annotations

from pathlib import Path

from bitchat.im.service import Backlog
from im_helpers import Inbox, clients_of, im_server

GROUPS = 30
EACH = 10
PAGE = 10


async def test_the_backlog_of_many_conversations_is_read_within_its_bound(
    tmp_path: Path,
) -> None:
    async with im_server(tmp_path, offline_batch=PAGE) as server, clients_of(server) as c:
        gris = await c.login("gris")
        houyi = await c.login("houyi")
        groups = [(await gris.create_group(f"g{i}")).group_id for i in range(GROUPS)]
        for g in groups:
            await houyi.join_group(g)
        await houyi.close()
        for g in groups:
            for n in range(EACH):
                await gris.send_group(g, f"{g}/{n}")

        im = server.data["im"]
        assert houyi.user is not None
        user_id = houyi.user.id
        device_id, new = await im.users.device(user_id, "dev-houyi", 32)
        assert not new
        backlog = Backlog(im.messages, await im.messages.positions(user_id, device_id), PAGE)
        got = []
        most = 0
        for _ in range(GROUPS * EACH // PAGE + 2):  # bounded: one page per round
            batch = await backlog.next_batch()
            most = max(most, sum(len(b) for b in backlog.buffers.values()))
            got.extend(batch)
            if len(batch) < PAGE:
                break
        # Everything once, each group in seq order; never more than a few pages held
        # (not a page of every conversation).
        assert sorted(m.id for m in got) == sorted({m.id for m in got})
        assert len(got) == GROUPS * EACH
        for g in groups:
            assert [m.seq for m in got if m.to == g] == list(range(1, EACH + 1))
        assert most <= 4 * PAGE

        # And end to end: the device comes back and is pushed all of it.
        again = await c.connect(device="dev-houyi")
        inbox = Inbox(again)
        ok = await again.login("houyi", "secret")
        assert ok.pending == GROUPS * EACH
        assert len(await inbox.wait_for(GROUPS * EACH)) == GROUPS * EACH
