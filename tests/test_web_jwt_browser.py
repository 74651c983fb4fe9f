"""The chat page signs in with a JWT from its URL fragment (``/#jwt=TOKEN``), in a real
headless Chromium against a real server that takes HS256 JWTs: the token is taken
out of the address bar, never sent anywhere, a refused one shows the server's
cause, a query string's ``jwt`` is not read, a reload keeps the session, and a new
fragment signs another user in (the one before is logged out)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from bitchat import RequestError, codes
from bitchat.im.client import IMClient
from web_helpers import WAIT_MS, chromium, running_server

pytest.importorskip("playwright")
from playwright.async_api import expect

expect.set_options(timeout=WAIT_MS)

SECRET = "a-secret-of-the-product-backend-32+bytes"


def token(key: str = SECRET, **claims: Any) -> str:
    claims.setdefault("exp", int(time.time()) + 3600)
    return jwt.encode(claims, key, algorithm="HS256")


async def test_page_signs_in_with_the_jwt_of_its_fragment(tmp_path: Path) -> None:
    async with running_server(tmp_path, jwt_secret=SECRET) as server, chromium() as browser:
        base = f"http://127.0.0.1:{server.address[1]}/"
        ctx = await browser.new_context()
        page = await ctx.new_page()
        page.set_default_timeout(WAIT_MS)
        errors: list[str] = []
        sent: list[str] = []  # every URL the page asked for (HTTP and the WebSocket)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("request", lambda request: sent.append(request.url))
        page.on("websocket", lambda ws: sent.append(ws.url))
        ada = token(sub="u-1", name="Ada Lovelace")

        await page.goto(f"{base}#jwt={ada}")
        body = page.locator("body")
        await expect(body).to_have_attribute("data-state", "online")
        await expect(page.locator("#me-name")).to_contain_text("Ada_Lovelace")
        await expect(page.locator("#login-screen")).to_be_hidden()
        # Out of the address bar (replaced, not a new history entry), and sent nowhere.
        assert await page.evaluate("location.href") == base
        assert sent and not [u for u in sent if "jwt" in u or ada in u], sent

        # A reload logs in again with the session's login token: the JWT is not needed.
        await page.reload()
        await expect(body).to_have_attribute("data-state", "online")
        await expect(page.locator("#me-name")).to_contain_text("Ada_Lovelace")

        # The product signs another user in by changing the fragment; ada's session ends.
        old = await page.evaluate("JSON.parse(sessionStorage.getItem('bitchat.session')).token")
        await page.evaluate("(t) => { location.hash = 'jwt=' + t; }", token(sub="u-2", name="bo"))
        await expect(page.locator("#me-name")).to_contain_text("bo")
        await expect(body).to_have_attribute("data-state", "online")
        assert await page.evaluate("location.href") == base
        assert errors == []
        await ctx.close()
        async with IMClient("127.0.0.1", server.address[1]) as im:
            with pytest.raises(RequestError) as refused:
                await im.login(token=old)
            assert refused.value.code == codes.LOGIN_FAILED

        # A refused token: the sign-in form, with the server's cause.
        for bad, cause in [
            (token(sub="u-1", exp=int(time.time()) - 3600), "the JWT has expired"),
            (token(SECRET[::-1], sub="u-1"), "the JWT has a bad signature"),
        ]:
            ctx = await browser.new_context()
            page = await ctx.new_page()
            page.set_default_timeout(WAIT_MS)
            await page.goto(f"{base}#jwt={bad}")
            await expect(page.locator("#login-error")).to_have_text(f"Sign-in failed: {cause}")
            await expect(page.locator("#login-screen")).to_be_visible()
            await expect(page.locator("body")).to_have_attribute("data-state", "login")
            assert await page.evaluate("location.href") == base
            await ctx.close()

        # The query string is not a way in: a token there would reach the server's logs.
        ctx = await browser.new_context()
        page = await ctx.new_page()
        page.set_default_timeout(WAIT_MS)
        await page.goto(f"{base}?jwt={ada}")
        await expect(page.locator("#login-screen")).to_be_visible()
        await expect(page.locator("body")).to_have_attribute("data-state", "login")
        await ctx.close()
