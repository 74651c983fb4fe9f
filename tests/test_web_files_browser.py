"""Files and images on the chat page, in real headless Chromium against a real server: an
image pasted into one tab's composer is uploaded (with the tab's login token) and sent; the
other user's tab shows its preview, fetched with that user's token into a blob: URL, and a
download link; a file chosen with the attach button arrives as a download link, and an
image dropped on the conversation as a preview."""

from __future__ import annotations

import base64
import re
import struct
import zlib

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


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A small valid PNG of one colour."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + bytes(rgb) * width
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


PASTE = """([data, name]) => {
  const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], name, { type: 'image/png' }));
  const box = document.getElementById('composer-input');
  box.focus();
  const paste = { clipboardData: dt, bubbles: true, cancelable: true };
  box.dispatchEvent(new ClipboardEvent('paste', paste));
}"""


DROP = """([data, name]) => {
  const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], name, { type: 'image/png' }));
  const zone = document.getElementById('conversation');
  const drag = { dataTransfer: dt, bubbles: true, cancelable: true };
  zone.dispatchEvent(new DragEvent('dragover', drag));
  zone.dispatchEvent(new DragEvent('drop', drag));
}"""


async def test_an_image_pasted_in_one_tab_shows_its_preview_in_the_others(
    server: Server, browser: Browser
) -> None:
    alice = await PageUser.open(browser, server)
    bob = await PageUser.open(browser, server)
    await alice.sign_in("alice", "alice-pw")  # user 1
    await bob.sign_in("bob", "bob-pw")  # user 2
    await ask_dialog(alice.page, "+ Message", "2", "Open")
    await alice.say("a picture for you")
    await bob.open_chat("alice")

    image = png(40, 30, (200, 30, 30))
    await alice.page.evaluate(PASTE, [base64.b64encode(image).decode(), "red.png"])
    # alice's tab: stored (it has an id), with its preview.
    mine = alice.page.locator(".msg.mine.sent").get_by_test_id("image")
    await expect(mine).to_have_count(1)
    # bob's tab: the preview, a blob: URL the page fetched with his token, really decoded.
    theirs = bob.page.locator(".msg.theirs").get_by_test_id("image")
    await expect(theirs).to_have_attribute("src", re.compile(r"^blob:"))
    await expect(theirs).to_have_js_property("complete", True)
    width = await theirs.evaluate("(img) => img.naturalWidth")
    assert width > 0
    link = bob.page.locator(".msg.theirs").get_by_test_id("file-link")
    await expect(link).to_contain_text("red.png")

    # bob downloads the full file from the link: the same bytes alice pasted.
    async with bob.page.expect_download() as info:
        await link.click()
    download = await info.value
    assert download.suggested_filename == "red.png"
    path = await download.path()
    assert path is not None and path.read_bytes() == image

    # A file chosen with the attach button: a download link in the other tab.
    await alice.page.get_by_test_id("file-input").set_input_files(
        files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"bring snacks\n"}]
    )
    notes = bob.page.locator(".msg.theirs").get_by_test_id("file-link").filter(has_text="notes.txt")
    await expect(notes).to_have_count(1)

    # An image dropped on the conversation: the same, as a preview.
    await alice.page.evaluate(
        DROP, [base64.b64encode(png(20, 20, (30, 30, 200))).decode(), "blue.png"]
    )
    blue = bob.page.locator(".msg.theirs").filter(has_text="blue.png").get_by_test_id("image")
    await expect(blue).to_have_attribute("src", re.compile(r"^blob:"))
    for user in (alice, bob):
        await user.close()
