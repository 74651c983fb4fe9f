"""The chat page shows when an offline user was last seen, and its switch hides the
page user's own (issue 11, item 6), in a real headless Chromium."""

from __future__ import annotations

import pytest

from bitchat import Server
from bitchat.im.client import IMClient
from bitchat.im.service import IMService
from cluster_support import eventually
from web_helpers import (
    WAIT,
    WAIT_MS,
    artifact,
    browser_fixture,  # noqa: F401 (fixture)
    server_fixture,  # noqa: F401 (fixture)
)

pytest.importorskip("playwright")
from playwright.async_api import Browser, expect

from test_web_browser import PageUser, ask_dialog

expect.set_options(timeout=WAIT_MS)


async def test_an_offline_member_shows_last_seen_and_the_switch_hides_mine(
    server: Server, browser: Browser
) -> None:
    im = server.data["im"]
    assert isinstance(im, IMService)
    dave = await PageUser.open(browser, server)
    await dave.sign_in("dave", "dave-pw")
    dave_id = int(await dave.page.locator("body").get_attribute("data-user-id") or 0)
    async with IMClient("127.0.0.1", server.address[1]) as carol:
        await carol.login("carol", "carol-pw")
        group = await carol.create_group("Night shift")
        await carol.send_p2p(dave_id, "see you tonight")
        await expect(dave.conversation("carol")).to_have_count(1)
        await ask_dialog(dave.page, "Join", str(group.group_id), "Join")
        await expect(dave.page.locator("#chat-name")).to_have_text("Night shift")
        await carol.logout()

    # The Presence push says when carol went: her row and her chat say so.
    await expect(dave.conversation("carol")).to_have_count(1)
    await dave.open_chat("carol")
    await expect(dave.page.locator("#chat-sub")).to_have_text("last seen just now")
    # So does the group's member list.
    await dave.open_chat("Night shift")
    await dave.page.locator("#members").click()
    dialog = dave.page.locator("#dialog")
    await expect(dialog.get_by_test_id("last-seen")).to_have_text("last seen just now")
    await dave.page.screenshot(path=str(artifact("chat-last-seen.png")))
    await dialog.get_by_role("button", name="Close").click()

    # Dave hides his own.
    switch = dave.page.get_by_label("Show my last seen")
    await expect(switch).to_be_checked()
    await switch.uncheck()

    async def hidden() -> bool:
        return not await im.users.show_last_seen(dave_id)

    await eventually(hidden, WAIT, "the switch reaching the server")
    await dave.close()
