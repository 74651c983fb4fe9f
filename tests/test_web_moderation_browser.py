"""Group moderation on the chat page, in real headless Chromium against a real server:
the members dialog shows roles and mutes, the owner promotes, mutes and kicks from it,
and another member's open dialog and tab follow through the server's GroupEvents;
group options, an invite link that lets a user in, a join request approved, a block."""

from __future__ import annotations

import asyncio

import pytest

from bitchat import RequestError, Server, codes
from bitchat.im.client import IMClient
from test_web_browser import PageUser, ask_dialog
from web_helpers import (
    WAIT,
    WAIT_MS,
    browser_fixture,  # noqa: F401 (fixture)
    server_fixture,  # noqa: F401 (fixture)
)

pytest.importorskip("playwright")
from playwright.async_api import Browser, Locator, expect

expect.set_options(timeout=WAIT_MS)


def member(user: PageUser, user_id: int) -> Locator:
    """A member's row in the user's open members dialog."""
    return user.page.locator(f"#dialog [data-testid=member][data-user-id='{user_id}']")


async def test_admin_moderates_and_the_others_see_it_live(server: Server, browser: Browser) -> None:
    port = server.address[1]
    alice = await PageUser.open(browser, server, permissions=["clipboard-read", "clipboard-write"])
    bob = await PageUser.open(browser, server)
    await alice.sign_in("alice", "alice-pw")  # user 1
    await bob.sign_in("bob", "bob-pw")  # user 2
    async with IMClient("127.0.0.1", port) as carol:
        await carol.login("carol", "carol-pw")  # user 3
        await ask_dialog(alice.page, "+ Group", "moon", "Create")
        await expect(alice.page.locator("#chat-name")).to_have_text("moon")
        await ask_dialog(bob.page, "Join", "1", "Join")
        await expect(bob.page.locator("#chat-name")).to_have_text("moon")
        await carol.join_group(1)

        # bob, a member: roles shown, no moderation buttons, but he may block someone.
        await bob.page.locator("#members").click()
        await expect(member(bob, 1).get_by_test_id("role")).to_have_text("Owner")
        await expect(member(bob, 3)).to_have_attribute("data-role", "member")
        await expect(bob.page.locator("#dialog [data-testid=kick]")).to_have_count(0)
        await expect(member(bob, 3).get_by_test_id("block")).to_have_count(1)

        # alice, the owner, makes bob an admin: bob's open dialog follows (GroupEvent "role"),
        # and now offers him the buttons on carol (a member), not on alice (the owner).
        await alice.page.locator("#members").click()
        await member(alice, 2).get_by_test_id("promote").click()
        await expect(member(alice, 2)).to_have_attribute("data-role", "admin")
        await expect(member(bob, 2).get_by_test_id("role")).to_have_text("Admin")
        await expect(member(bob, 3).get_by_test_id("kick")).to_have_count(1)
        await expect(member(bob, 1).get_by_test_id("kick")).to_have_count(0)

        # alice mutes carol for 10 minutes: both dialogs show it; carol cannot write.
        await member(alice, 3).get_by_test_id("mute").select_option(label="Mute 10 min")
        await expect(member(alice, 3)).to_have_attribute("data-muted", "true")
        await expect(member(bob, 3).get_by_test_id("muted")).to_contain_text("muted until")
        with pytest.raises(RequestError) as refused:
            await carol.send_group(1, "can I speak?")
        assert refused.value.code == codes.MUTED

        # alice kicks bob: bob's tab says so, his dialog closes and the group leaves his sidebar.
        await member(alice, 2).get_by_test_id("kick").click()
        await expect(member(alice, 2)).to_have_count(0)
        await expect(bob.page.locator("#toast")).to_have_text("alice removed you from moon")
        await expect(bob.page.locator("#dialog")).to_be_hidden()
        await expect(bob.conversation("moon")).to_have_count(0)
        await expect(bob.page.locator("#conversation")).to_be_hidden()

        # Invite only: bob's join now waits as a request, which alice's dialog shows live.
        await alice.page.get_by_test_id("invite-only").check()
        await expect(alice.page.get_by_test_id("invite-only")).to_be_checked()
        await alice.page.get_by_test_id("history-visible").check()
        await expect(alice.page.get_by_test_id("history-visible")).to_be_checked()
        await expect(alice.page.get_by_test_id("invite-only")).to_be_checked()  # the other kept
        await ask_dialog(bob.page, "Join", "1", "Join")
        await expect(bob.page.locator("#toast")).to_contain_text("waits for an admin")
        request = alice.page.get_by_test_id("join-request").filter(has_text="bob")
        await expect(request).to_have_count(1)
        await request.get_by_test_id("approve").click()
        await expect(member(alice, 2)).to_have_count(1)
        await expect(bob.conversation("moon")).to_have_count(1)  # GroupEvent: bob is back
        await expect(bob.page.locator("#toast")).to_have_text("alice added you to moon")

        # An invite link: copyable, and a user who opens it joins once signed in.
        await alice.page.get_by_test_id("create-invite").click()
        link = await alice.page.get_by_test_id("invite-link").input_value()
        assert f"127.0.0.1:{port}/#invite=1." in link
        await alice.page.get_by_test_id("copy-invite").click()
        await expect(alice.page.locator("#toast")).to_have_text("Invite link copied")
        assert await alice.page.evaluate("navigator.clipboard.readText()") == link
        dan = await PageUser.open(browser, server)
        await dan.page.goto(link)
        await dan.sign_in("dan", "dan-pw")  # user 4
        await expect(dan.page.locator("#chat-name")).to_have_text("moon")
        assert await dan.page.evaluate("location.hash") == ""
        await expect(member(alice, 4)).to_have_count(1)

        # alice blocks carol: the button turns, and carol's messages to alice are refused.
        await member(alice, 3).get_by_test_id("block").click()
        await expect(member(alice, 3).get_by_test_id("unblock")).to_have_count(1)
        with pytest.raises(RequestError) as refused:
            await asyncio.wait_for(carol.send_p2p(1, "hello alice"), WAIT)
        assert refused.value.code == codes.BLOCKED

        # The one-to-one conversation's header says so too, and unblocks.
        await alice.page.locator("#dialog-ok").click()
        await ask_dialog(alice.page, "+ Message", "3", "Open")
        block = alice.page.locator("#block")
        await expect(block).to_have_text("Unblock")
        await block.click()
        await expect(block).to_have_text("Block")
        await carol.send_p2p(1, "hello alice")
        await expect(alice.message("hello alice")).to_have_count(1)

        # The owner hands the group over to dan, in two clicks: alice is an admin then.
        await alice.open_chat("moon")
        await alice.page.locator("#members").click()
        make_owner = member(alice, 4).get_by_test_id("make-owner")
        await make_owner.click()
        await expect(make_owner).to_have_text("Confirm: make owner")
        await expect(member(alice, 4)).to_have_attribute("data-role", "member")
        await make_owner.click()
        await expect(member(alice, 4)).to_have_attribute("data-role", "owner")
        await expect(member(alice, 1)).to_have_attribute("data-role", "admin")
        await expect(member(alice, 4).get_by_test_id("kick")).to_have_count(0)

    for user in (alice, bob, dan):
        await user.close()
