"""The chat page in a real headless Chromium, against a real server on loopback.

Two browser users chat one-to-one and in a group; a browser user and a TCP
client (``IMClient``) chat both ways; a message sent while the page's user was
offline shows at login, and the page's ack really clears it; the page
reconnects by itself after its connection drops. Nothing the page loads comes
from anywhere but the server.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bitchat import Server
from bitchat.app import build_server
from bitchat.im.client import IMClient
from bitchat.im.delivery import DEVICE
from bitchat.im.packets import TypingEvent
from web_helpers import (
    WAIT,
    WAIT_MS,
    artifact,
    browser_fixture,  # noqa: F401 (fixture)
    running_server,
    server_fixture,  # noqa: F401 (fixture)
)

pytest.importorskip("playwright")
from playwright.async_api import Browser, Page, expect

expect.set_options(timeout=WAIT_MS)


def url(server: Server) -> str:
    return f"http://127.0.0.1:{server.address[1]}/"


class PageUser:
    """One person at the chat page, in a browser context of their own."""

    def __init__(self, page: Page, base: str) -> None:
        self.page = page
        self.base = base
        self.errors: list[str] = []
        self.foreign: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", self._console)
        page.on("request", self._request)

    def _console(self, msg: Any) -> None:
        if msg.type == "error":
            self.errors.append(msg.text)

    def _request(self, request: Any) -> None:
        target = request.url
        if not (
            target.startswith(self.base)
            or target.startswith(self.base.replace("http", "ws"))
            or target.startswith("data:")
            or target.startswith("blob:" + self.base)  # made by the page from its own fetch
        ):
            self.foreign.append(target)

    @classmethod
    async def open(cls, browser: Browser, server: Server, **context: Any) -> PageUser:
        ctx = await browser.new_context(viewport={"width": 1180, "height": 760}, **context)
        page = await ctx.new_page()
        page.set_default_timeout(WAIT_MS)
        user = cls(page, url(server))
        await page.goto(user.base)
        return user

    async def sign_in(self, name: str, password: str) -> None:
        page = self.page
        await page.get_by_label("Name").fill(name)
        await page.get_by_label("Password").fill(password)
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.locator("body")).to_have_attribute("data-state", "online")

    def conversation(self, title: str) -> Any:
        return self.page.get_by_test_id("conversation").filter(has_text=title)

    async def open_chat(self, title: str) -> None:
        await self.conversation(title).first.click()
        await expect(self.page.locator("#chat-name")).to_have_text(title)

    async def say(self, text: str) -> None:
        box = self.page.get_by_label("Message")
        await box.fill(text)
        await box.press("Enter")
        # Stored: the server's SendAck gave it an id.
        sent = self.page.locator(".msg.mine.sent").filter(has_text=text)
        await expect(sent).to_have_count(1)

    def message(self, text: str) -> Any:
        return self.page.get_by_test_id("message").filter(has_text=text)

    async def close(self, *, expected_errors: tuple[str, ...] = ()) -> None:
        errors = [e for e in self.errors if not any(x in e for x in expected_errors)]
        assert errors == [], errors
        assert self.foreign == [], f"the page loaded from elsewhere: {self.foreign}"
        await self.page.context.close()


async def ask_dialog(page: Page, button: str, value: str, ok: str) -> None:
    await page.get_by_role("button", name=button).click()
    dialog = page.locator("#dialog")
    await expect(dialog).to_be_visible()
    await dialog.locator("input").fill(value)
    await dialog.get_by_role("button", name=ok).click()
    await expect(dialog).to_be_hidden()


async def test_two_browser_users_chat_one_to_one_and_in_a_group(
    server: Server, browser: Browser
) -> None:
    alice = await PageUser.open(browser, server)
    bob = await PageUser.open(browser, server)
    await alice.sign_in("alice", "alice-pw")
    await bob.sign_in("bob", "bob-pw")

    # Bob came online after Alice: a Presence push puts him in her list.
    await expect(alice.conversation("bob")).to_have_count(1)
    await alice.open_chat("bob")
    await expect(alice.page.locator("#chat-sub")).to_have_text("Online")
    await alice.say("Hi Bob! Lunch at noon?")

    # Bob gets it live, with an unread badge until he opens it.
    await expect(bob.conversation("alice").get_by_test_id("unread")).to_have_text("1")
    await bob.open_chat("alice")
    await expect(bob.message("Hi Bob! Lunch at noon?")).to_have_count(1)
    await expect(bob.conversation("alice").get_by_test_id("unread")).to_have_count(0)
    await bob.say("Sounds good, see you there")
    await expect(alice.message("Sounds good, see you there")).to_have_count(1)

    # A group: Alice creates it, Bob joins with its number, both talk.
    await ask_dialog(alice.page, "+ Group", "Weekend trip", "Create")
    await expect(alice.page.locator("#chat-name")).to_have_text("Weekend trip")
    sub = await alice.page.locator("#chat-sub").text_content()
    assert sub is not None
    group_number = sub.split(" ")[1]
    await ask_dialog(bob.page, "Join", group_number, "Join")
    await expect(bob.page.locator("#chat-name")).to_have_text("Weekend trip")
    await bob.say("I'll bring the tent")
    await expect(alice.message("I'll bring the tent")).to_have_count(1)
    # A message from a new member refreshes the group's member count.
    await expect(alice.page.locator("#chat-sub")).to_contain_text("2 members")
    await expect(alice.message("I'll bring the tent").locator(".sender")).to_have_text("bob")
    await alice.say("Great, I'll drive")
    await expect(bob.message("Great, I'll drive")).to_have_count(1)

    # Back in the one-to-one chat, the history is there, in order.
    await alice.open_chat("bob")
    texts = await alice.page.locator(".msg .text").all_text_contents()
    assert texts == ["Hi Bob! Lunch at noon?", "Sounds good, see you there"]

    await alice.page.screenshot(path=str(artifact("chat-two-browsers.png")))
    await alice.close()
    await bob.close()


async def test_browser_and_tcp_client_chat_both_ways(server: Server, browser: Browser) -> None:
    port = server.address[1]
    async with IMClient("127.0.0.1", port) as carol:
        await carol.login("carol", "carol-pw")
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        carol.on_message(inbox.put_nowait)

        dave = await PageUser.open(browser, server)
        await dave.sign_in("dave", "dave-pw")
        await expect(dave.conversation("carol")).to_have_count(1)
        dave_id = int(await dave.page.locator("body").get_attribute("data-user-id") or 0)

        # TCP -> browser.
        await carol.send_p2p(dave_id, "Hello from the terminal 👋")
        await dave.open_chat("carol")
        await expect(dave.message("Hello from the terminal 👋")).to_have_count(1)

        # Browser -> TCP.
        await dave.say("Hello from the browser")
        got = await asyncio.wait_for(inbox.get(), WAIT)
        assert (got.text, got.sender_name, got.kind) == ("Hello from the browser", "dave", "p2p")
        assert got.to == carol.user.id if carol.user else False

        # Both sides see one transport each in the status API's view of the server.
        transports = sorted(s.transport_name for s in server.sessions.values() if s.user_id)
        assert transports == ["tcp", "ws"]
        await dave.page.screenshot(path=str(artifact("chat-browser-and-tcp.png")))
        await dave.close()


async def test_offline_message_shows_at_login_and_the_pages_ack_clears_it(
    server: Server, browser: Browser
) -> None:
    port = server.address[1]
    im = server.data["im"]
    async with IMClient("127.0.0.1", port) as erin:
        await erin.login("erin", "erin-pw")
        frank_id = (await erin.register("frank", "frank-pw")).id
        ack = await erin.send_p2p(frank_id, "You missed this while you were out")
        # A 64-bit snowflake: past what a JavaScript number holds exactly.
        assert ack.msg_id > 2**53
        (talk,) = await im.messages.conversations(frank_id, 0, 10)
        assert talk.unread == 1

        frank = await PageUser.open(browser, server)
        await frank.sign_in("frank", "frank-pw")
        body = frank.page.locator("body")
        await expect(body).to_have_attribute("data-pending", "1")
        await expect(frank.conversation("erin").get_by_test_id("unread")).to_have_text("1")
        await expect(frank.page.locator("#toast")).to_contain_text("arrived while you were away")
        # The page acked it (the server answered its Ack request) with the exact 64-bit id.
        await expect(body).to_have_attribute("data-acked", "1")
        page_device = next(
            s.data[DEVICE] for s in server.sessions.values() if s.user_id == frank_id
        )
        assert await im.messages.count_pending(frank_id, page_device.device_id) == 0
        await frank.open_chat("erin")
        shown = frank.message("You missed this while you were out")
        await expect(shown).to_have_attribute("data-msg-id", str(ack.msg_id))
        # The page's JSON keeps 64-bit ids exact both ways (parse from source, emit raw).
        echoed = await frank.page.evaluate(
            """async (text) => {
                const m = await import('/static/app.js');
                return m.stringifyJSON({msg_ids: [m.parseJSON(text).msg_id]});
            }""",
            f'{{"msg_id": {ack.msg_id}}}',
        )
        assert echoed == f'{{"msg_ids":[{ack.msg_id}]}}'
        await frank.page.screenshot(path=str(artifact("chat-offline-message.png")))
        await frank.close()

        # Opening it marked it read: another browser (a new device, which starts at
        # frank's read position) is pushed nothing; the conversation is in its sidebar
        # (the server's list) without a badge, the message in the history only.
        (talk,) = await im.messages.conversations(frank_id, 0, 10)
        assert talk.unread == 0
        again = await PageUser.open(browser, server)
        await again.sign_in("frank", "frank-pw")
        await expect(again.page.locator("body")).to_have_attribute("data-pending", "0")
        await expect(again.conversation("erin")).to_contain_text("You missed this")
        await expect(again.page.get_by_test_id("unread")).to_have_count(0)
        await again.open_chat("erin")
        await expect(again.message("You missed this while you were out")).to_have_count(1)
        await again.close()


async def test_page_reconnects_by_itself_after_a_drop(server: Server, browser: Browser) -> None:
    port = server.address[1]
    async with IMClient("127.0.0.1", port) as gina:
        await gina.login("gina", "gina-pw")
        henry = await PageUser.open(browser, server)
        await henry.sign_in("henry", "henry-pw")
        body = henry.page.locator("body")
        henry_id = int(await body.get_attribute("data-user-id") or 0)

        # Cut the page's WebSocket from the server side, without a close handshake.
        closed: asyncio.Queue[Any] = asyncio.Queue()
        server.on_session_close.append(closed.put_nowait)
        (ws,) = [s for s in server.sessions.values() if s.transport_name == "ws"]
        ws.abort()
        assert (await asyncio.wait_for(closed.get(), WAIT)) is ws

        # It comes back on its own, logged in with its token, and gets what was sent meanwhile.
        await gina.send_p2p(henry_id, "Are you back?")
        await expect(body).to_have_attribute("data-reconnects", "1")
        await expect(body).to_have_attribute("data-state", "online")
        await expect(henry.conversation("gina").get_by_test_id("unread")).to_have_text("1")
        await henry.open_chat("gina")
        await expect(henry.message("Are you back?")).to_have_count(1)
        [new] = [s for s in server.sessions.values() if s.transport_name == "ws"]
        assert new is not ws and new.user_id == henry_id
        await henry.close()


async def test_history_pages_back_through_a_long_conversation(
    server: Server, browser: Browser
) -> None:
    port = server.address[1]
    async with IMClient("127.0.0.1", port) as ivy, IMClient("127.0.0.1", port) as jack:
        await ivy.login("ivy", "ivy-pw")
        jack_me = await jack.login("jack", "jack-pw")
        for n in range(1, 61):
            await ivy.send_p2p(jack_me.user_id, f"note {n:02d}")
        # Read in the terminal: the page (a new device) is pushed none of them.
        await jack.mark_read(peer_id=ivy.user.id if ivy.user else 0)

        page_jack = await PageUser.open(browser, server)
        await page_jack.sign_in("jack", "jack-pw")
        await page_jack.open_chat("ivy")
        # The newest page (50) first, the oldest 10 on demand.
        await expect(page_jack.message("note 60")).to_have_count(1)
        await expect(page_jack.page.get_by_test_id("message")).to_have_count(50)
        await expect(page_jack.message("note 10")).to_have_count(0)
        await page_jack.page.get_by_role("button", name="Load earlier messages").click()
        await expect(page_jack.page.get_by_test_id("message")).to_have_count(60)
        await expect(
            page_jack.page.get_by_role("button", name="Load earlier messages")
        ).to_be_hidden()
        texts = await page_jack.page.locator(".msg .text").all_text_contents()
        assert texts == [f"note {n:02d}" for n in range(1, 61)]
        await page_jack.close()


async def test_page_survives_a_server_restart_and_sends_what_was_typed_meanwhile(
    server: Server, browser: Browser
) -> None:
    port = server.address[1]
    kate = await PageUser.open(browser, server)
    await kate.sign_in("kate", "kate-pw")
    async with IMClient("127.0.0.1", port) as leo_first:
        leo_id = (await leo_first.login("leo", "leo-pw")).user_id
    await expect(kate.conversation("leo")).to_have_count(0)  # he left again
    body = kate.page.locator("body")

    await server.stop()
    await expect(body).to_have_attribute("data-state", "reconnecting")
    await expect(kate.page.locator("#banner")).to_be_visible()
    # Typed while the server is down: it waits, marked as not yet stored.
    await kate.page.get_by_role("button", name="+ Message").click()
    await kate.page.locator("#dialog input").fill(str(leo_id))
    await kate.page.locator("#dialog").get_by_role("button", name="Open").click()
    box = kate.page.get_by_label("Message")
    await box.fill("Sent while the server was down")
    await box.press("Enter")
    await expect(kate.page.locator(".msg.mine.pending")).to_have_count(1)

    # The same server comes back on the same port and data: the page signs in again
    # with its token and the message goes out once.
    again = build_server(server.settings.replace(port=port))
    async with again, IMClient("127.0.0.1", port) as leo:
        await expect(body).to_have_attribute("data-reconnects", "1")
        await expect(kate.page.locator(".msg.mine.sent")).to_have_count(1)
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        leo.on_message(inbox.put_nowait)
        ok = await leo.login("leo", "leo-pw")
        got = await asyncio.wait_for(inbox.get(), WAIT)
        assert (got.text, got.sender_name) == ("Sent while the server was down", "kate")
        assert ok.pending == 1
        # Chromium logs each refused reconnect attempt itself.
        await kate.close(expected_errors=("ERR_CONNECTION_REFUSED",))


async def test_typing_shows_both_ways_and_clears(tmp_path: Path, browser: Browser) -> None:
    async with running_server(tmp_path, typing_timeout=1.0) as server:
        port = server.address[1]
        async with IMClient("127.0.0.1", port) as carol:
            await carol.login("carol", "carol-pw")
            assert carol.user is not None
            typings: asyncio.Queue[TypingEvent] = asyncio.Queue()
            carol.on_typing(typings.put_nowait)

            dave = await PageUser.open(browser, server)
            await dave.sign_in("dave", "dave-pw")
            dave_id = int(await dave.page.locator("body").get_attribute("data-user-id") or 0)
            await dave.open_chat("carol")
            indicator = dave.page.get_by_test_id("typing")

            # The page's user types: carol hears it once (throttled), and the stop when cleared.
            box = dave.page.get_by_label("Message")
            await box.press_sequentially("hel")
            e = await asyncio.wait_for(typings.get(), WAIT)
            assert (e.user_id, e.name, e.to, e.typing) == (dave_id, "dave", carol.user.id, True)
            assert e.expires_in == 1.0
            await box.fill("")
            await box.dispatch_event("input")
            e = await asyncio.wait_for(typings.get(), WAIT)
            assert (e.user_id, e.typing) == (dave_id, False)

            # carol types: the page shows it, and clears it on her stop.
            await carol.typing(to=dave_id)
            await expect(indicator).to_have_text("carol is typing…")
            await carol.typing(to=dave_id, typing=False)
            await expect(indicator).to_be_hidden()
            # ... on her message (the server relays the next start at once after it) ...
            await carol.send_p2p(dave_id, "first")
            await carol.typing(to=dave_id)
            await expect(indicator).to_have_text("carol is typing…")
            await carol.send_p2p(dave_id, "here it is")
            await expect(dave.message("here it is")).to_have_count(1)
            await expect(indicator).to_be_hidden()
            # ... and by itself once its expires_in (1 s here) is over.
            await carol.typing(to=dave_id)
            await expect(indicator).to_be_visible()
            await expect(indicator).to_be_hidden()
            assert typings.empty()
            await dave.page.screenshot(path=str(artifact("chat-typing.png")))
            await dave.close()
