"""The interactive client behind ``bitchat client`` (the seed's client example).

:class:`Repl` turns one command line into calls of :class:`~bitchat.im.client.IMClient`
and prints the answers; it prints incoming messages and connection changes as
they happen. Two front ends feed it lines:

- :meth:`Repl.run_interactive`: a prompt_toolkit prompt ``bitchat> ``; output
  goes through ``patch_stdout``, so a message that arrives while you type is
  printed above the prompt and your half-typed line stays as it was;
- :meth:`Repl.run_lines`: lines from a pipe or a file (stdin that is not a
  terminal), with the same output and no prompt, so the client can be scripted.

Commands are run one at a time, in order; each prints one answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from bitchat.client import State
from bitchat.errors import BitchatError, RequestError
from bitchat.im.packets import GROUP, ChatMessage, LoginOk

if TYPE_CHECKING:
    from prompt_toolkit import PromptSession

    from bitchat.im.client import IMClient

PROMPT = "bitchat> "
HISTORY_PAGE = 20

USAGE = """\
Usage: <cmd> [options]
  -lo userName password      log in (an unknown name is registered)
  -lu                        list online users
  -pc userId message         send a one-to-one message (the rest of the line)
  -gc groupId message        send a group message
  -gcreate groupName         create a group (you are its first member)
  -gjoin groupId             join a group
  -gleave groupId            leave a group
  -gl                        list my groups
  -gm groupId                list a group's members
  -hi userId [beforeId]      history with a user, 20 messages, oldest first
  -hi -g groupId [beforeId]  history of a group
  help                       show this
  bye                        quit"""

Output = Callable[[str], None]


def _cause(exc: BaseException) -> str:
    if isinstance(exc, RequestError):
        return exc.message or exc.code
    return str(exc) or type(exc).__name__


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


class Repl:
    """Runs commands against an :class:`IMClient` and prints what happens.

    ``out`` prints one line (``print`` by default); the connection's status
    changes and incoming messages go through it too.
    """

    def __init__(self, im: IMClient, out: Output | None = None, via: str | None = None) -> None:
        self.im = im
        self.out: Output = out or print
        self.via = via  # "router HOST:PORT" when a cluster router picks the server
        self._connected_once = False  # "Connected" the first time, then "Reconnected"
        self._up = False
        self._announced_retry = False
        self._commands: dict[str, Callable[[list[str], str], Any]] = {
            "-lo": self.login,
            "-lu": self.list_users,
            "-pc": self.p2p_chat,
            "-gc": self.group_chat,
            "-gcreate": self.group_create,
            "-gjoin": self.group_join,
            "-gleave": self.group_leave,
            "-gl": self.group_list,
            "-gm": self.group_members,
            "-hi": self.history,
        }
        im.on_message(self.show_message)
        im.on_relogin(self._relogged_in)
        im.client.on_state.append(self._state_changed)

    # -- events ---------------------------------------------------------------------------

    def show_message(self, m: ChatMessage) -> None:
        me = self.im.user
        if m.kind == GROUP:
            self.out(f"[group {m.to}] {m.sender_name}({m.sender_id}): {m.text}")
        elif me is not None and m.sender_id == me.id:
            # Sent from another connection of ours.
            self.out(f"{m.sender_name}({m.sender_id}) -> {m.to}: {m.text}")
        else:
            self.out(f"{m.sender_name}({m.sender_id}): {m.text}")

    def _state_changed(self, state: State) -> None:
        client = self.im.client
        where = f"{client.host}:{client.port}"
        if state is State.CONNECTED:
            self.out(f"{'Reconnected' if self._connected_once else 'Connected'} to {where}")
            self._connected_once = self._up = True
            self._announced_retry = False
        elif state is State.DISCONNECTED:
            if self._up:
                self.out("Connection lost; reconnecting...")
                self._up = False
                self._announced_retry = True  # "reconnecting" says it already
            elif not self._announced_retry:
                if self.via:
                    where = f"a server through the {self.via}"
                self.out(f"Cannot reach {where}; retrying...")
                self._announced_retry = True

    def _relogged_in(self, ok: LoginOk | None, error: Exception | None) -> None:
        if ok is not None:
            more = f", {ok.pending} missed message(s)" if ok.pending else ""
            self.out(f"Logged in again as {ok.name}({ok.user_id}){more}")
        elif error is not None:
            self.out(f"Login failed cause: {_cause(error)}")

    # -- commands -------------------------------------------------------------------------

    async def execute(self, line: str) -> bool:
        """Run one command line; False when it was ``bye``."""
        line = line.strip()
        if not line:
            return True
        if line == "bye":
            self.out("bye bye!")
            return False
        if line in ("help", "-h", "--help", "?"):
            self.out(USAGE)
            return True
        parts = line.split()
        command = self._commands.get(parts[0])
        if command is None:
            self.out(f"Unknown command: {parts[0]}")
            self.out(USAGE)
            return True
        try:
            await command(parts, line)
        except (BitchatError, OSError) as exc:
            # Every command handles its own RequestError; this is the connection.
            self.out(f"Failed cause: {_cause(exc)}")
        return True

    @staticmethod
    def _rest(line: str, words: int) -> str:
        """The line after its first ``words`` words, inner spaces kept."""
        parts = line.split(maxsplit=words)
        return parts[words].strip() if len(parts) > words else ""

    async def login(self, parts: list[str], line: str) -> None:
        if len(parts) != 3:
            self.out("Usage: -lo userName password")
            return
        try:
            await self.im.login(parts[1], parts[2])
        except RequestError as exc:
            self.out(f"Login failed cause: {_cause(exc)}")
            return
        self.out("Login success")

    async def list_users(self, parts: list[str], line: str) -> None:
        try:
            users = await self.im.online_users()
        except RequestError as exc:
            self.out(f"List online user failed cause: {_cause(exc)}")
            return
        self.out("userName(userId)")
        self.out("----------------")
        for u in users:
            self.out(f"{u.name}({u.id})")

    async def p2p_chat(self, parts: list[str], line: str) -> None:
        to = _int(parts[1]) if len(parts) >= 3 else None
        if to is None:
            self.out("Usage: -pc userId message")
            return
        try:
            await self.im.send_p2p(to, self._rest(line, 2))
        except RequestError as exc:
            self.out(f"Send p2p message failed cause: {_cause(exc)}")
            return
        self.out("Send p2p message success")

    async def group_chat(self, parts: list[str], line: str) -> None:
        group_id = _int(parts[1]) if len(parts) >= 3 else None
        if group_id is None:
            self.out("Usage: -gc groupId message")
            return
        try:
            await self.im.send_group(group_id, self._rest(line, 2))
        except RequestError as exc:
            self.out(f"Send group message failed cause: {_cause(exc)}")
            return
        self.out("Send group message success")

    async def group_create(self, parts: list[str], line: str) -> None:
        name = self._rest(line, 1)
        if not name:
            self.out("Usage: -gcreate groupName")
            return
        try:
            g = await self.im.create_group(name)
        except RequestError as exc:
            self.out(f"Create group failed cause: {_cause(exc)}")
            return
        self.out(f"Group created: {g.name}({g.group_id})")

    def _group_id(self, parts: list[str], usage: str) -> int | None:
        group_id = _int(parts[1]) if len(parts) == 2 else None
        if group_id is None:
            self.out(f"Usage: {usage}")
        return group_id

    async def group_join(self, parts: list[str], line: str) -> None:
        group_id = self._group_id(parts, "-gjoin groupId")
        if group_id is None:
            return
        try:
            g = await self.im.join_group(group_id)
        except RequestError as exc:
            self.out(f"Join group failed cause: {_cause(exc)}")
            return
        self.out(f"Joined group {g.name}({g.group_id}), {g.members} member(s)")

    async def group_leave(self, parts: list[str], line: str) -> None:
        group_id = self._group_id(parts, "-gleave groupId")
        if group_id is None:
            return
        try:
            await self.im.leave_group(group_id)
        except RequestError as exc:
            self.out(f"Leave group failed cause: {_cause(exc)}")
            return
        self.out(f"Left group {group_id}")

    async def group_list(self, parts: list[str], line: str) -> None:
        try:
            groups = await self.im.my_groups()
        except RequestError as exc:
            self.out(f"List groups failed cause: {_cause(exc)}")
            return
        self.out("groupName(groupId)\tmembers")
        self.out("----------------")
        for g in groups:
            self.out(f"{g['name']}({g['id']})\t{g['members']}")

    async def group_members(self, parts: list[str], line: str) -> None:
        group_id = self._group_id(parts, "-gm groupId")
        if group_id is None:
            return
        try:
            members = await self.im.group_members(group_id)
        except RequestError as exc:
            self.out(f"List members failed cause: {_cause(exc)}")
            return
        self.out("userName(userId)")
        self.out("----------------")
        for m in members:
            self.out(f"{m['name']}({m['id']})" + ("\tonline" if m["online"] else ""))

    async def history(self, parts: list[str], line: str) -> None:
        args = parts[1:]
        group = bool(args) and args[0] == "-g"
        if group:
            args = args[1:]
        ids = [_int(a) for a in args]
        if not 1 <= len(ids) <= 2 or any(i is None for i in ids):
            self.out("Usage: -hi userId [beforeId]  or  -hi -g groupId [beforeId]")
            return
        target = ids[0] or 0
        before = (ids[1] or 0) if len(ids) == 2 else 0
        try:
            if group:
                page = await self.im.history(group_id=target, before=before, limit=HISTORY_PAGE)
            else:
                page = await self.im.history(peer_id=target, before=before, limit=HISTORY_PAGE)
        except RequestError as exc:
            self.out(f"History failed cause: {_cause(exc)}")
            return
        messages = page.chat_messages()
        if not messages:
            self.out("No messages")
            return
        for m in reversed(messages):
            when = datetime.datetime.fromtimestamp(m.ts / 1000).strftime("%Y-%m-%d %H:%M:%S")
            self.out(f"{when} {m.sender_name}({m.sender_id}): {m.text}")
        if page.more:
            flag = "-g " if group else ""
            self.out(f"(older: -hi {flag}{target} {messages[-1].msg_id})")

    # -- front ends -----------------------------------------------------------------------

    async def run_lines(self, lines: AsyncIterator[str]) -> None:
        """Run commands from ``lines`` until ``bye`` or their end."""
        async for line in lines:
            if not await self.execute(line):
                return

    async def run_interactive(
        self, session: PromptSession[str] | None = None, *, patch: bool = True
    ) -> None:
        """Prompt with ``bitchat> `` until ``bye`` or Ctrl-D.

        With ``patch`` (the default), everything printed while the prompt is
        shown goes above it (prompt_toolkit's ``patch_stdout``).
        """
        from prompt_toolkit import PromptSession
        from prompt_toolkit.patch_stdout import patch_stdout

        prompt: PromptSession[str] = session or PromptSession()
        self.out("Type help for the commands, bye to quit.")
        with patch_stdout(raw=True) if patch else contextlib.nullcontext():
            while True:
                try:
                    line = await prompt.prompt_async(PROMPT)
                except KeyboardInterrupt:
                    continue  # Ctrl-C clears the line, as in a shell
                except EOFError:
                    self.out("bye bye!")
                    return
                if not await self.execute(line):
                    return


async def stdin_lines() -> AsyncIterator[str]:
    """Lines of stdin (a pipe, a file or a terminal), read by a daemon thread.

    A thread, not ``connect_read_pipe``: that cannot read a regular file, and a
    daemon thread stuck in ``readline`` never holds up the exit.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:
        try:
            for line in sys.stdin:
                loop.call_soon_threadsafe(queue.put_nowait, line.rstrip("\r\n"))
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=read, name="bitchat-stdin", daemon=True).start()
    while True:
        line = await queue.get()
        if line is None:
            return
        yield line
