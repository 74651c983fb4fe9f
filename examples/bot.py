"""A bot in 30 lines: an account that answers every one-to-one message it gets.

bitchat server &            # a server on 127.0.0.1:8864
python examples/bot.py      # logs in as "echo-bot" (registered at its first login)
bitchat client              # -lo houyi 123456, then -pc <the bot's id> hello
"""

import asyncio
import sys

from bitchat.im.client import IMClient
from bitchat.im.packets import P2P, ChatMessage


async def run(host: str = "127.0.0.1", port: int = 8864, replies: int = 0) -> None:
    """Answer one-to-one messages: ``replies`` of them, or for ever if 0."""
    answered: list[int] = []
    done = asyncio.Event()
    async with IMClient(host, port, device="bot") as bot:

        async def answer(m: ChatMessage) -> None:
            if m.kind == P2P and bot.user and m.sender_id != bot.user.id:
                await bot.send_p2p(m.sender_id, f"you said: {m.text}")
                answered.append(m.msg_id)
                if len(answered) == replies:
                    done.set()

        bot.on_message(answer)  # before the login: what came while away is answered too
        ok = await bot.login("echo-bot", "bot-password")
        print(f"echo-bot is user {ok.user_id}", flush=True)
        await done.wait()


if __name__ == "__main__":
    asyncio.run(run(port=int(sys.argv[1]) if len(sys.argv) > 1 else 8864))
