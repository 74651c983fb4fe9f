"""Messages that live, on the chat page in real headless Chromium against a real server,
two users in two tabs: a reaction from the message's menu (counts, who on hover, a click
on the count toggles one's own), a reply by quoting, an edit (marked "edited", the quote
follows), a recall ("message recalled" in both tabs, the quote too), an admin's recall in a
group, ``@`` completion of a member's name, the mention highlighted and its badge."""

from __future__ import annotations

from typing import Any

import pytest

from bitchat import Server
from test_web_browser import PageUser, ask_dialog
from web_helpers import (
    WAIT_MS,
    browser_fixture,  # noqa: F401 (fixture)
    server_fixture,  # noqa: F401 (fixture)
)

pytest.importorskip("playwright")
from playwright.async_api import Browser, expect

expect.set_options(timeout=WAIT_MS)


def msg(user: PageUser, text: str) -> Any:
    """The message whose own text (not a quote of it) has ``text``."""
    own = user.page.locator("div.text").filter(has_text=text)
    return user.page.get_by_test_id("message").filter(has=own)


async def menu(user: PageUser, text: str, item: str, **attrs: str) -> None:
    """Open the menu of the message showing ``text`` and click ``item`` (a test id)."""
    row = msg(user, text)
    await row.hover()
    await row.get_by_test_id("msg-menu").click()
    entry = row.get_by_test_id("menu").get_by_test_id(item)
    for key, value in attrs.items():
        entry = entry.and_(user.page.locator(f"[data-{key}='{value}']"))
    await entry.click()
    await expect(row.get_by_test_id("menu")).to_have_count(0)


def reaction(user: PageUser, text: str, emoji: str) -> Any:
    return msg(user, text).locator(f"[data-testid=reaction][data-emoji='{emoji}']")


async def test_react_reply_edit_recall_across_two_tabs(server: Server, browser: Browser) -> None:
    alice = await PageUser.open(browser, server)
    bob = await PageUser.open(browser, server)
    await alice.sign_in("alice", "alice-pw")  # user 1
    await bob.sign_in("bob", "bob-pw")  # user 2
    await ask_dialog(alice.page, "+ Message", "2", "Open")
    await alice.say("see you at noon")
    await bob.open_chat("alice")
    await expect(msg(bob, "see you at noon")).to_have_count(1)

    # bob reacts from the menu: both tabs count one, and say who on hover.
    await menu(bob, "see you at noon", "menu-react", emoji="👍")
    thumbs = reaction(alice, "see you at noon", "👍")
    await expect(thumbs).to_have_attribute("data-count", "1")
    await expect(thumbs).to_have_attribute("title", "bob")
    # alice adds hers with a click on the count; bob's click takes his back.
    await thumbs.click()
    await expect(reaction(bob, "see you at noon", "👍")).to_have_attribute("data-count", "2")
    await expect(reaction(bob, "see you at noon", "👍")).to_have_attribute("title", "You, alice")
    await reaction(bob, "see you at noon", "👍").click()
    await expect(thumbs).to_have_attribute("data-count", "1")
    await expect(thumbs).to_have_attribute("aria-pressed", "true")

    # bob replies by quoting: the quote (sender and snippet) sits above his bubble, both tabs.
    await menu(bob, "see you at noon", "menu-reply")
    await expect(bob.page.get_by_test_id("compose-bar")).to_contain_text("Reply to alice")
    await bob.say("works for me")
    await expect(bob.page.get_by_test_id("compose-bar")).to_be_hidden()
    quote = alice.message("works for me").get_by_test_id("quote")
    await expect(quote).to_have_text("Yousee you at noon")
    await expect(bob.message("works for me").get_by_test_id("quote")).to_have_text(
        "alicesee you at noon"
    )

    # alice edits hers: the new text, marked edited, in both tabs; bob's quote follows.
    await menu(alice, "see you at noon", "menu-edit")
    box = alice.page.get_by_label("Message")
    await expect(box).to_have_value("see you at noon")
    await box.fill("see you at one")
    await box.press("Enter")
    edited = msg(bob, "see you at one")
    await expect(edited.get_by_test_id("edited")).to_have_text("edited")
    await expect(msg(alice, "see you at one").get_by_test_id("edited")).to_have_count(1)
    await expect(bob.message("works for me").get_by_test_id("quote")).to_have_text(
        "alicesee you at one"
    )
    # The reaction stays on the edited message.
    await expect(reaction(bob, "see you at one", "👍")).to_have_attribute("data-count", "1")

    # alice recalls it: a placeholder in both tabs, and the quote says so.
    await menu(alice, "see you at one", "menu-recall")
    for user in (alice, bob):
        await expect(user.page.get_by_test_id("recalled")).to_have_text("message recalled")
        await expect(msg(user, "see you at one")).to_have_count(0)
        await expect(user.message("works for me").get_by_test_id("quote")).to_contain_text(
            "message recalled"
        )
    # bob's menu on alice's message offers no edit and no recall.
    await bob.page.get_by_label("Message").fill("")
    await bob.say("one more")
    await alice.page.get_by_label("Message").fill("")
    await alice.say("and mine")
    row = msg(bob, "and mine")
    await row.hover()
    await row.get_by_test_id("msg-menu").click()
    await expect(row.get_by_test_id("menu-reply")).to_have_count(1)
    await expect(row.get_by_test_id("menu-edit")).to_have_count(0)
    await expect(row.get_by_test_id("menu-recall")).to_have_count(0)
    await bob.page.keyboard.press("Escape")
    await expect(row.get_by_test_id("menu")).to_have_count(0)

    # After a reload the page shows the same conversation (the history carries it all).
    await bob.page.reload()
    await expect(bob.page.locator("body")).to_have_attribute("data-state", "online")
    await bob.open_chat("alice")
    await expect(bob.page.get_by_test_id("recalled")).to_have_text("message recalled")
    await expect(bob.message("works for me").get_by_test_id("quote")).to_contain_text(
        "message recalled"
    )
    for user in (alice, bob):
        await user.close()


async def test_mentions_completion_badge_and_an_admins_recall(
    server: Server, browser: Browser
) -> None:
    alice = await PageUser.open(browser, server)
    bob = await PageUser.open(browser, server)
    await alice.sign_in("alice", "alice-pw")  # user 1
    await bob.sign_in("bob", "bob-pw")  # user 2
    await ask_dialog(alice.page, "+ Group", "moon", "Create")
    await ask_dialog(bob.page, "Join", "1", "Join")
    await expect(bob.page.locator("#chat-name")).to_have_text("moon")
    await bob.say("hello moon")
    # bob looks elsewhere, so the mention counts as unread for him.
    await ask_dialog(bob.page, "+ Message", "1", "Open")

    # alice types "@b": the members whose name starts so are offered; Enter takes one.
    await alice.open_chat("moon")
    await expect(msg(alice, "hello moon")).to_have_count(1)
    box = alice.page.get_by_label("Message")
    await box.fill("")
    await box.press_sequentially("look @b")
    options = alice.page.get_by_test_id("mention-option")
    await expect(options).to_have_text(["@bob"])
    await box.press("Enter")
    await expect(box).to_have_value("look @bob ")
    await box.press_sequentially("up")
    await box.press("Enter")
    sent = alice.page.locator(".msg.mine.sent").filter(has_text="look @bob up")
    await expect(sent).to_have_count(1)

    # bob's sidebar badges the mention; opening the group shows it highlighted, badge gone.
    moon = bob.conversation("moon")
    await expect(moon.get_by_test_id("mention-badge")).to_have_text("@")
    await expect(moon).to_have_attribute("data-mentions", "1")
    await bob.open_chat("moon")
    mention = bob.message("look @bob up").get_by_test_id("mention")
    await expect(mention).to_have_text("@bob")
    await expect(mention).to_have_class("mention me")
    await expect(moon.get_by_test_id("mention-badge")).to_have_count(0)

    # alice owns the group: she may recall bob's message, from its menu.
    await menu(alice, "hello moon", "menu-recall")
    await expect(bob.page.get_by_test_id("recalled")).to_have_text("message recalled")
    await expect(msg(bob, "hello moon")).to_have_count(0)
    for user in (alice, bob):
        await user.close()


async def test_unread_badges_count_messages_not_events(server: Server, browser: Browser) -> None:
    alice = await PageUser.open(browser, server)
    bob = await PageUser.open(browser, server)
    await alice.sign_in("alice", "alice-pw")  # user 1
    await bob.sign_in("bob", "bob-pw")  # user 2
    await ask_dialog(alice.page, "+ Message", "2", "Open")
    await alice.say("first")
    await alice.say("second")
    row = bob.conversation("alice")
    await expect(row).to_have_attribute("data-unread", "2")
    # An edit and a reaction are events of the conversation, no unread messages.
    await menu(alice, "second", "menu-edit")
    box = alice.page.get_by_label("Message")
    await box.fill("second, edited")
    await box.press("Enter")
    await menu(alice, "first", "menu-react", emoji="🎉")
    await expect(msg(alice, "first").get_by_test_id("reaction")).to_have_count(1)
    await expect(row).to_have_attribute("data-unread", "2")
    # The same after a reload (the server's list, whose last row is the reaction)...
    await bob.page.reload()
    await expect(bob.page.locator("body")).to_have_attribute("data-state", "online")
    await expect(row).to_have_attribute("data-unread", "2")
    # ... and a new message counts one more.
    await alice.say("third")
    await expect(row).to_have_attribute("data-unread", "3")
    await bob.open_chat("alice")
    await expect(row).to_have_attribute("data-unread", "0")
    await expect(msg(bob, "second, edited").get_by_test_id("edited")).to_have_count(1)
    for user in (alice, bob):
        await user.close()
