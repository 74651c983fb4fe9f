"""A server with a message type of its own: polls.

python examples/poll.py      # a standalone server on 127.0.0.1:8864 that knows "poll"

A client sends ``SendGroup(group_id, "Lunch? pizza / sushi", type="poll",
fields={"question": "Lunch?", "options": ["pizza", "sushi"]})``; the server checks the
fields against :class:`PollFields` (a bad one is ``bad_fields``) and, as it does for
any type, keeps ``text`` as the fallback a client that does not know polls shows.
"""

import asyncio
import sys
from typing import Annotated, Any

from bitchat import Packet, Server, Settings
from bitchat.app import build_server
from bitchat.errors import RequestError, codes
from bitchat.protocol.packets import Limit
from bitchat.session import Session

POLL = "poll"


class PollFields(Packet):
    """A poll's fields: a question and 2 to 10 options (each a short string)."""

    question: Annotated[str, Limit("max_group_name_length")]
    options: list[Annotated[str, Limit("max_name_length")]]
    multiple: bool = False


async def check_poll(session: Session, fields: dict[str, Any]) -> None:
    """What a schema cannot say: the number of options, and no option twice."""
    options = fields["options"]
    if not 2 <= len(options) <= 10 or len(set(options)) != len(options):
        raise RequestError(codes.BAD_FIELDS, "a poll has 2 to 10 different options")


def poll_server(settings: Settings) -> Server:
    """An IM server whose clients may send polls."""
    server = build_server(settings)
    im = server.data["im"]
    im.register_type(POLL, PollFields)
    im.type_validator(POLL, check_poll)
    return server


async def main(port: int) -> None:
    server = poll_server(Settings(host="127.0.0.1", port=port))
    async with server:
        print(f"a server with polls on port {server.address[1]}", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 8864))
