"""The server API against its own OpenAPI document: property-based, with schemathesis.

A real standalone server runs on its own event loop in a thread (schemathesis calls
it with ``requests``, synchronously); its document is read from
``/api/v1/openapi.json``. Every operation gets valid and invalid requests (a
bounded number of each, so the run stays short); every answer must be no server
error and match the document: a status it lists, a body of its schema. A few
users and a group exist first, so generated ids find something.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bitchat import Server
from bitchat.app import build_server
from im_helpers import im_settings

if os.environ.get("CI") == "true":
    import schemathesis
else:
    schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

ADMIN = "schema-admin-token-0123456789"
EXAMPLES = int(os.environ.get("BITCHAT_TEST_API_EXAMPLES", "12"))
"""Examples per operation and mode (valid, invalid)."""


class ServerThread:
    """A started server on an event loop of its own thread."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)
        return f"http://127.0.0.1:{self.server.address[1]}"

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data: Path = tmp_path_factory.mktemp("api-schema")
    server = build_server(im_settings(data, host="127.0.0.1", port=0, admin_token=ADMIN))
    with ServerThread(server) as url:
        headers = {"authorization": f"Bearer {ADMIN}"}
        with httpx.Client(base_url=url + "/api/v1", headers=headers) as http:
            for name in ("alice", "bob", "carol"):
                assert http.post("/users", json={"name": name}).status_code == 201
            assert http.post("/groups", json={"owner_id": 1, "name": "g"}).status_code == 201
            assert http.post("/groups/1/members", json={"user_id": 2}).status_code == 200
            assert (
                http.post("/messages", json={"from": 1, "to": 2, "text": "hi"}).status_code == 201
            )
        yield url


def no_server_error(ctx: Any, response: Any, case: Any) -> None:
    body = response.json() if response.content else {}
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {body}"


CHECKS = [no_server_error, status_code_conformance, response_schema_conformance]


def test_every_operation_conforms_to_the_document(base_url: str) -> None:
    schema = schemathesis.openapi.from_url(base_url + "/api/v1/openapi.json")
    headers = {"authorization": f"Bearer {ADMIN}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 13
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                response = case.call(base_url=base_url, headers=headers, timeout=10)
                case.validate_response(response, checks=CHECKS)

            run()


def test_no_key_gets_documented_refusals(base_url: str) -> None:
    schema = schemathesis.openapi.from_url(base_url + "/api/v1/openapi.json")
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=3, deadline=None, database=None, derandomize=True)
        @given(case=operation.as_strategy())
        def run(case: Any) -> None:
            response = case.call(base_url=base_url, headers={"authorization": ""}, timeout=10)
            assert response.status_code == 401
            case.validate_response(response, checks=CHECKS)

        run()
