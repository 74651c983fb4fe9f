"""The chat page when the server ends a session for good, in real headless Chromium
against a real server: the server API's logout and ban close the page's connection with
an Error push (``logged_out``, ``banned``); the page goes back to the sign-in screen and
says why, and does not log in again by itself."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from test_web_browser import PageUser
from web_helpers import (
    WAIT,
    WAIT_MS,
    browser_fixture,  # noqa: F401 (fixture)
    running_server,
)

pytest.importorskip("playwright")
from playwright.async_api import Browser, expect

expect.set_options(timeout=WAIT_MS)

ADMIN = "an-admin-token-for-the-page-tests"


@pytest.mark.parametrize(
    ("action", "code", "says"),
    [
        ("logout", "logged_out", "You were logged out. Please sign in again."),
        ("ban", "banned", "This account is banned."),
    ],
)
async def test_a_forced_logout_sticks_and_the_page_says_why(
    tmp_path: Path, browser: Browser, action: str, code: str, says: str
) -> None:
    async with running_server(tmp_path, admin_token=ADMIN) as server:
        port = server.address[1]
        lena = await PageUser.open(browser, server)
        logins: list[str] = []
        # Every Login frame the page sends after the first (type 103 in the header's bytes 4-5).
        lena.page.on(
            "websocket",
            lambda ws: ws.on(
                "framesent",
                lambda data: (
                    logins.append("login")
                    if isinstance(data, bytes) and data[4:6] == b"\x00\x67"
                    else None
                ),
            ),
        )
        await lena.sign_in("lena", "lena-pw")
        assert logins == ["login"]
        user_id = await lena.page.locator("body").get_attribute("data-user-id")
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}/api/v1",
            headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=WAIT,
        ) as api:
            answer = await api.post(f"/users/{user_id}/{action}")
            assert answer.status_code == 200, answer.text
        body = lena.page.locator("body")
        await expect(body).to_have_attribute("data-signed-out", code)
        await expect(body).to_have_attribute("data-state", "login")
        await expect(lena.page.locator("#login-error")).to_have_text(says)
        await expect(lena.page.locator("#login-screen")).to_be_visible()
        # No login of its own afterwards: the page did not schedule a reconnect.
        assert await lena.page.evaluate("sessionStorage.getItem('bitchat.session')") is None
        assert logins == ["login"]
        await lena.close()
