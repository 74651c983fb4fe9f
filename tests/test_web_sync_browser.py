"""The chat page on the sync model, in a real headless Chromium against a real server.

The sidebar is the server's conversation list (all its pages, by activity, with
unread badges): it survives a reload and a time offline. Reading a conversation
in one tab clears its badge in another tab of the same user (another device).
The ticks on one's own messages go from stored to delivered to read as the peer
gets and reads them, one-to-one and in a group, and stay after a reload; a reply
from the peer ticks what came before it read.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bitchat.im.client import IMClient
from test_web_browser import PageUser, ask_dialog
from web_helpers import (
    WAIT,
    WAIT_MS,
    artifact,
    browser_fixture,  # noqa: F401 (fixtures)
    running_server,
)

pytest.importorskip("playwright")
from playwright.async_api import Browser, expect

expect.set_options(timeout=WAIT_MS)


async def user_id(user: PageUser) -> int:
    return int(await user.page.locator("body").get_attribute("data-user-id") or 0)


def row(user: PageUser, title: str) -> Any:
    """The sidebar row of the conversation named exactly ``title`` (a preview may name
    someone too: "sam: chapter 3?")."""
    name = user.page.locator(".conv-name").get_by_text(title, exact=True)
    return user.page.get_by_test_id("conversation").filter(has=name)


def badge(user: PageUser, title: str) -> Any:
    return row(user, title).get_by_test_id("unread")


async def open_row(user: PageUser, title: str) -> None:
    await row(user, title).click()
    await expect(user.page.locator("#chat-name")).to_have_text(title)


async def chat_titles(user: PageUser) -> list[str]:
    return await user.page.locator("#chats .conv-name").all_text_contents()


async def expect_chats(user: PageUser, expected: list[tuple[str, int]]) -> None:
    """The Chats list is exactly these conversations, in this order, with these badges."""
    rows = user.page.locator("#chats").get_by_test_id("conversation")
    await expect(rows.locator(".conv-name")).to_have_text([t for t, _ in expected])
    await expect(rows).to_have_count(len(expected))
    for title, unread in expected:
        await expect(row(user, title)).to_have_attribute("data-unread", str(unread))
        if unread:
            await expect(badge(user, title)).to_have_text(str(unread))
        else:
            await expect(badge(user, title)).to_have_count(0)


async def test_reload_keeps_the_servers_sidebar_and_its_unread_counts(
    tmp_path: Path, browser: Browser
) -> None:
    # Two conversations a page: the sidebar needs every page of the list.
    async with running_server(tmp_path, conversations_max_page=2) as server:
        port = server.address[1]
        ruth = await PageUser.open(browser, server)
        await ruth.sign_in("ruth", "ruth-pw")
        ruth_id = await user_id(ruth)
        device = await ruth.page.locator("body").get_attribute("data-device")
        assert device
        async with IMClient("127.0.0.1", port) as sam, IMClient("127.0.0.1", port) as tess:
            await sam.login("sam", "sam-pw")
            await tess.login("tess", "tess-pw")
            club = await sam.create_group("Book club")
            await ask_dialog(ruth.page, "Join", str(club.group_id), "Join")
            await expect(ruth.page.locator("#chat-name")).to_have_text("Book club")

            await tess.send_p2p(ruth_id, "hi ruth")
            await expect(badge(ruth, "tess")).to_have_text("1")
            await open_row(ruth, "tess")
            await expect(badge(ruth, "tess")).to_have_count(0)

            # In tess's conversation: sam's messages count up in his row, which goes to the top.
            await sam.send_p2p(ruth_id, "one")
            await sam.send_p2p(ruth_id, "two")
            await expect(badge(ruth, "sam")).to_have_text("2")
            assert (await chat_titles(ruth))[0] == "sam"
            await sam.send_group(club.group_id, "chapter 3?")
            await expect_chats(ruth, [("Book club", 1), ("sam", 2), ("tess", 0)])

            # Offline: the page is gone, tess writes meanwhile.
            closed: asyncio.Queue[Any] = asyncio.Queue()
            server.on_session_close.append(closed.put_nowait)
            await ruth.page.goto("about:blank")
            gone = await asyncio.wait_for(closed.get(), WAIT)
            assert gone.user_id == ruth_id
            await tess.send_p2p(ruth_id, "while you were away")

            # Back (a token login, this tab's session): the list is the server's.
            await ruth.page.goto(ruth.base)
            await expect(ruth.page.locator("body")).to_have_attribute("data-state", "online")
            await expect_chats(ruth, [("tess", 1), ("Book club", 1), ("sam", 2)])
            await expect(row(ruth, "tess")).to_contain_text("while you were away")
            await expect(ruth.page).to_have_title("(4) bitchat")

            # A reload: the same list, the same device.
            await ruth.page.reload()
            await expect(ruth.page.locator("body")).to_have_attribute("data-state", "online")
            await expect_chats(ruth, [("tess", 1), ("Book club", 1), ("sam", 2)])
            body = ruth.page.locator("body")
            await expect(body).to_have_attribute("data-device", device)
            await expect(body).to_have_attribute("data-conversations", "3")

            # Reading is stored too: open sam's, reload, only the others are left.
            await open_row(ruth, "sam")
            await expect(badge(ruth, "sam")).to_have_count(0)
            await expect(row(ruth, "sam")).to_have_attribute("data-read-seq", "2")  # stored
            await ruth.page.reload()
            await expect(ruth.page.locator("body")).to_have_attribute("data-state", "online")
            await expect_chats(ruth, [("tess", 1), ("Book club", 1), ("sam", 0)])
            await ruth.page.screenshot(path=str(artifact("chat-sync-sidebar.png")))

            # Signing out and in with the password: this browser is still the same device.
            await ruth.page.get_by_role("button", name="Sign out").click()
            await expect(body).to_have_attribute("data-state", "login")
            await ruth.sign_in("ruth", "ruth-pw")
            await expect(body).to_have_attribute("data-device", device)
            await expect(body).to_have_attribute("data-pending", "0")
            await expect_chats(ruth, [("tess", 1), ("Book club", 1), ("sam", 0)])
        await ruth.close()


async def test_reading_in_one_tab_clears_the_badge_in_another(
    tmp_path: Path, browser: Browser
) -> None:
    async with running_server(tmp_path) as server:
        port = server.address[1]
        # Two browser profiles of one user: two devices.
        tab_a = await PageUser.open(browser, server)
        await tab_a.sign_in("vera", "vera-pw")
        tab_b = await PageUser.open(browser, server)
        await tab_b.sign_in("vera", "vera-pw")
        vera_id = await user_id(tab_a)
        device_a = await tab_a.page.locator("body").get_attribute("data-device")
        device_b = await tab_b.page.locator("body").get_attribute("data-device")
        assert device_a and device_b and device_a != device_b

        async with IMClient("127.0.0.1", port) as walt:
            await walt.login("walt", "walt-pw")
            await walt.send_p2p(vera_id, "first")
            await walt.send_p2p(vera_id, "second")
            await expect(badge(tab_a, "walt")).to_have_text("2")
            await expect(badge(tab_b, "walt")).to_have_text("2")

            # Tab A opens it: read on every device, tab B's badge goes.
            await open_row(tab_a, "walt")
            await expect(tab_a.message("second")).to_have_count(1)
            await expect(badge(tab_b, "walt")).to_have_count(0)
            await expect(row(tab_b, "walt")).to_have_attribute("data-unread", "0")
            await expect(badge(tab_a, "walt")).to_have_count(0)

            # A message while tab A shows the conversation: read there at once, so tab B,
            # which has it too, shows no badge for it either.
            await walt.send_p2p(vera_id, "third")
            await expect(tab_a.message("third")).to_have_count(1)
            await expect(row(tab_b, "walt")).to_contain_text("third")
            await expect(row(tab_b, "walt")).to_have_attribute("data-unread", "0")

            # And the other way: tab B reads a group tab A is not looking at.
            club = await walt.create_group("Chess")
            await ask_dialog(tab_a.page, "Join", str(club.group_id), "Join")
            await open_row(tab_a, "walt")
            await walt.send_group(club.group_id, "e4")
            await expect(badge(tab_a, "Chess")).to_have_text("1")
            await expect(badge(tab_b, "Chess")).to_have_text("1")
            await open_row(tab_b, "Chess")
            await expect(tab_b.message("e4")).to_have_count(1)
            await expect(badge(tab_a, "Chess")).to_have_count(0)
            await expect(tab_a.page).to_have_title("bitchat")
            await tab_b.page.screenshot(path=str(artifact("chat-sync-two-tabs.png")))

            # A second tab of the same browser is the same device, and still a session of
            # its own: what it sends shows live in the first tab too.
            page_c = await tab_a.page.context.new_page()
            page_c.set_default_timeout(WAIT_MS)
            tab_c = PageUser(page_c, tab_a.base)
            await page_c.goto(tab_c.base)
            await tab_c.sign_in("vera", "vera-pw")
            await expect(page_c.locator("body")).to_have_attribute("data-device", device_a)
            await open_row(tab_c, "walt")
            await tab_c.say("from the third tab")
            await expect(tab_a.message("from the third tab")).to_have_count(1)
            await expect(row(tab_b, "walt")).to_contain_text("You: from the third tab")
            await expect(row(tab_b, "walt")).to_have_attribute("data-unread", "0")
            assert tab_c.errors == []
        await tab_a.close()
        await tab_b.close()


HIKERS = '<img src="/x" onerror="window.pwned=1">Hikers'


async def test_ticks_go_from_stored_to_delivered_to_read(tmp_path: Path, browser: Browser) -> None:
    async with running_server(tmp_path) as server:
        port = server.address[1]
        xena = await PageUser.open(browser, server)
        await xena.sign_in("xena", "xena-pw")
        xena_id = await user_id(xena)
        async with IMClient("127.0.0.1", port) as yuri_first:
            yuri_id = (await yuri_first.login("yuri", "yuri-pw")).user_id
        # yuri is offline: the message is stored, no more.
        await xena.page.get_by_role("button", name="+ Message").click()
        await xena.page.locator("#dialog input").fill(str(yuri_id))
        await xena.page.locator("#dialog").get_by_role("button", name="Open").click()
        await xena.say("are you there?")
        sent = xena.message("are you there?")
        await expect(sent).to_have_attribute("data-tick", "sent")
        await expect(sent.get_by_test_id("tick")).to_have_text("✓")

        async with IMClient("127.0.0.1", port) as yuri:
            inbox: asyncio.Queue[Any] = asyncio.Queue()
            yuri.on_message(inbox.put_nowait)
            # He logs in: the message is pushed to him and his client acks it.
            await yuri.login("yuri", "yuri-pw")
            got = await asyncio.wait_for(inbox.get(), WAIT)
            assert got.text == "are you there?"
            await expect(sent).to_have_attribute("data-tick", "delivered")
            await expect(sent.get_by_test_id("tick")).to_have_text("✓✓")

            # He reads it: "read".
            state = await yuri.mark_read(peer_id=xena_id)
            assert (state.read_seq, state.unread) == (got.seq, 0)
            await expect(sent).to_have_attribute("data-tick", "read")
            await expect(sent.get_by_test_id("tick")).to_have_attribute("title", "Read")

            # A second message, online this time: delivered at once, then read.
            await xena.say("great, see you")
            second = xena.message("great, see you")
            await asyncio.wait_for(inbox.get(), WAIT)
            await expect(second).to_have_attribute("data-tick", "delivered")
            await expect(sent).to_have_attribute("data-tick", "read")
            await yuri.mark_read(peer_id=xena_id)
            await expect(second).to_have_attribute("data-tick", "read")

            # A group: "read" once a member has read it. Its name is markup, shown as text.
            await ask_dialog(xena.page, "+ Group", HIKERS, "Create")
            sub = await xena.page.locator("#chat-sub").text_content()
            assert sub is not None
            group_id = int(sub.split(" ")[1])
            await yuri.join_group(group_id)
            await xena.say("saturday?")
            in_group = xena.message("saturday?")
            await expect(in_group).to_have_attribute("data-tick", "sent")
            await asyncio.wait_for(inbox.get(), WAIT)
            await yuri.mark_read(group_id=group_id)
            await expect(in_group).to_have_attribute("data-tick", "read")

            # One more to yuri, which he gets but does not read.
            await open_row(xena, "yuri")
            await xena.say("one more thing")
            await asyncio.wait_for(inbox.get(), WAIT)
            await expect(xena.message("one more thing")).to_have_attribute("data-tick", "delivered")

            # The stored state after a reload: the list (p2p) and GetReceipts (group).
            await xena.page.reload()
            await expect(xena.page.locator("body")).to_have_attribute("data-state", "online")
            await open_row(xena, "yuri")
            await expect(xena.message("one more thing")).to_have_attribute("data-tick", "delivered")
            await expect(xena.message("great, see you")).to_have_attribute("data-tick", "read")
            await expect(xena.message("are you there?")).to_have_attribute("data-tick", "read")
            await expect(row(xena, HIKERS)).to_have_count(1)  # the list's name, as text
            assert await xena.page.locator("#chats img, #chat-name img").count() == 0
            await open_row(xena, HIKERS)
            await expect(xena.message("saturday?")).to_have_attribute("data-tick", "read")
            assert await xena.page.evaluate("window.pwned") is None
            await xena.page.screenshot(path=str(artifact("chat-sync-ticks.png")))

            # His reply says he has read what came before it (sending moves his read
            # position to his message; no receipt comes for that): the page ticks it.
            await open_row(xena, "yuri")
            await expect(xena.message("one more thing")).to_have_attribute("data-tick", "delivered")
            reply = await yuri.send_p2p(xena_id, "yes, here")
            await expect(xena.message("yes, here")).to_be_visible()
            await expect(xena.message("one more thing")).to_have_attribute("data-tick", "read")
            [mine] = [
                c for c in (await yuri.conversations()).conversations if c["peer_id"] == xena_id
            ]
            assert mine["read_seq"] == reply.seq  # the server's rule the page follows
        await xena.close()
