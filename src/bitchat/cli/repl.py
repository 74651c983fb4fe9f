"""The interactive client behind ``bitchat client`` (the seed's client example).

:class:`Repl` turns one command line into calls of :class:`~bitchat.im.client.IMClient`
and prints the answers; it prints incoming messages and connection changes as
they happen. Two front ends feed it lines:

- :meth:`Repl.run_interactive`: a prompt_toolkit prompt ``bitchat> ``; output
  goes through ``patch_stdout``, so a message that arrives while you type is
  printed above the prompt and your half-typed line stays as it was;
- :meth:`Repl.run_lines`: lines from a pipe or a file (stdin that is not a
  terminal), with the same output and no prompt, so the client can be scripted.

Commands are run one at a time, in order; each prints one answer, and a
failure is one line naming its cause (``Login failed cause: ...``). Every line
goes out through :func:`~bitchat.cli.sanitize.visible`: a name, a message or an
error from the server never writes a control character to the terminal (it is
shown as an escape such as ``\x1b``), and never starts a line of its own. While the
client is not connected, a command fails at once rather than waiting for the
connection; :attr:`Repl.failures` counts failed commands (``bitchat client``
exits with status 1 after a script in which any failed).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import sys
import threading
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from bitchat.cli.devices import jwt_subject
from bitchat.cli.sanitize import visible
from bitchat.client import State
from bitchat.errors import (
    BitchatError,
    ConnectionClosed,
    RequestError,
    RequestTimeout,
    TLSError,
    UsageError,
    codes,
)
from bitchat.im.files_client import file_of
from bitchat.im.packets import GROUP, P2P, ChatMessage, GroupEvent, Hidden, LoginOk, Receipt

if TYPE_CHECKING:
    from prompt_toolkit import PromptSession

    from bitchat.cli.devices import DeviceStore
    from bitchat.im.client import IMClient

PROMPT = "bitchat> "
HISTORY_PAGE = 20
CONVERSATION_PAGE = 20
LAST_MESSAGE_WIDTH = 40
SEEN_MESSAGES = 1000
"""Messages whose conversation the REPL remembers, for -reply."""
"""Columns of a conversation's last message in ``-cl`` (a longer one is cut, ``...``)."""

USAGE = """\
Usage: <cmd> [options]
  -lo userName password      log in (an unknown name is registered)
  -jwt token                 log in with a JWT the product's backend signed
  -reg userName password     sign up (where sign-ups are open)
  -lu                        list online users
  -pc userId message         send a one-to-one message (the rest of the line)
  -gc groupId message        send a group message
  -gcreate groupName         create a group (you are its first member)
  -gjoin groupId [code]      join a group (with an invite code for an invite-only one)
  -gleave groupId            leave a group
  -gl                        list my groups
  -gm groupId                list a group's members
  -gkick groupId userId      remove a member (admins, owner)
  -gban groupId userId       ban a user from a group; -gunban groupId userId lifts it
  -gmute groupId userId min  mute a member for some minutes (0 unmutes)
  -ginvite groupId userId    add a user to a group
  -glink groupId             make an invite code for a group
  -grole groupId userId role make a member admin or member, or hand over (owner)
  -gopts groupId invite_only=on|off history=on|off   change a group's options
  -greqs groupId             list the join requests of an invite-only group
  -gapprove groupId userId   let a user in; -gdeny groupId userId refuses
  -block userId              block a user; -unblock userId; -blocked lists them
  -edit msgId text           replace the text of your message
  -recall msgId              take back a message (yours; any, as a group admin)
  -reply msgId text          answer a message (one you saw here or in -hi)
  -react msgId emoji         react to a message; -unreact msgId emoji takes it back
  -delete msgId              delete a message for you only (all your devices)
  -file userId path          send a file or an image (the rest of the line is its path)
  -file -g groupId path      send a file or an image to a group
  -getfile msgId [folder]    save the file of a message shown here (default folder: .)
  -hi userId [beforeId]      history with a user, 20 messages, oldest first
  -hi -g groupId [beforeId]  history of a group
  -cl [before]               list my conversations: unread count, last message
  -read userId [seq]         mark the conversation with a user read (up to seq)
  -read -g groupId [seq]     mark a group read (default: up to its last message)
  help                       show this
  bye                        quit"""

_FILES_KEPT = 1000
"""File messages -getfile remembers (the most recent)."""

Output = Callable[[str], None]
Command = Callable[[list[str], str], Awaitable[None]]


class _Usage(UsageError):
    """A command line that does not fit its command: print its usage."""


# What to do about a TLS failure, in the terms of bitchat client's options.
_TLS_HINTS = {
    TLSError.SERVER_SPEAKS_TLS: ": use --tls",
    TLSError.SERVER_SPEAKS_PLAIN: ": connect without --tls",
}


def _cause(exc: BaseException) -> str:
    if isinstance(exc, RequestError):
        return exc.message or exc.code
    if isinstance(exc, TLSError):
        return exc.message + _TLS_HINTS.get(exc.reason, "")
    return str(exc) or type(exc).__name__


def _int(text: str) -> int | None:
    """A number of the command line: ids, seqs and paging keys are never negative."""
    try:
        n = int(text)
    except ValueError:
        return None
    return n if n >= 0 else None


def _missed(ok: LoginOk) -> str:
    """What a login line adds when the server pushes missed messages after it."""
    return f", {ok.pending} missed message(s)" if ok.pending else ""


def _conversation_args(parts: list[str], usage: str) -> tuple[bool, int, int]:
    """``[-g] id [n]`` of a command on one conversation: whether it is a group, its
    user or group id, and the number after it (0 if none)."""
    args = parts[1:]
    group = bool(args) and args[0] == "-g"
    if group:
        args = args[1:]
    ids = [_int(a) for a in args]
    if not 1 <= len(ids) <= 2 or any(i is None for i in ids):
        raise _Usage(usage)
    return group, ids[0] or 0, (ids[1] or 0) if len(ids) == 2 else 0


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _when(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M")


def _muted(until: int) -> bool:
    return until > datetime.datetime.now().timestamp() * 1000


def _who(user_id: int, name: str) -> str:
    if not user_id:
        return "the server"
    return f"{name}({user_id})" if name else f"user {user_id}"


def format_group_event(e: GroupEvent) -> str:
    """What happened, e.g. ``alice(1) kicked bob(2)`` (without the group)."""
    user, by = _who(e.user_id, e.user_name), _who(e.by_id, e.by_name)
    if e.event == "member_added":
        return f"{user} joined" if e.by_id == e.user_id else f"{by} added {user}"
    if e.event == "member_removed":
        return f"{user} left"
    if e.event in ("kicked", "banned", "unbanned", "unmuted"):
        return f"{by} {e.event} {user}"
    if e.event == "muted":
        return f"{by} muted {user} until {_when(e.until)}"
    if e.event == "role":
        return f"{by} made {user} {e.role}"
    if e.event == "options":
        return f"{by} changed the group's options"
    if e.event == "join_requested":
        return f"{user} asks to join (-gapprove {e.group_id} {e.user_id})"
    return f"{e.event}: {user} by {by}"


def _lively(m: ChatMessage, body: str | None = None) -> str:
    """A message's text as ``-hi`` shows it: recalled, edited, the reply, reactions
    (``body``: what stands for its text, its type included, e.g. a file's line)."""
    text = "(recalled)" if m.recalled else m.text if body is None else body
    if m.edited_at and not m.recalled:
        text += " (edited)"
    if m.reply:
        quoted = "(recalled)" if m.reply.get("recalled") else m.reply.get("snippet", "")
        text = f"[reply to {m.reply.get('sender_name', '')}: {quoted}] {text}"
    if m.type != "text" and body is None:
        text = f"[{m.type}] {text}"
    if m.reactions:
        counts = " ".join(f"{e} {len(u)}" for e, u in m.reactions.items())
        text += f" [{counts}]"
    return text


def _width(text: str) -> int:
    """Columns ``text`` takes on a terminal: East Asian wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _clip(text: str, width: int = LAST_MESSAGE_WIDTH) -> str:
    """``text`` as printed (escaped), cut to ``width`` columns with ``...`` if longer."""
    text = visible(text)
    if _width(text) <= width:
        return text
    out, used = [], 0
    for c in text:
        used += _width(c)
        if used > width - 3:
            break
        out.append(c)
    return "".join(out) + "..."


def table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()
) -> list[str]:
    """Lines of a table: a header, a rule under each column, the rows.

    Columns are as wide as their widest cell and two spaces apart; the columns
    whose index is in ``right`` are aligned to the right (numbers). Cells are
    measured as they will be printed, control characters escaped.
    """
    headers = [visible(h) for h in headers]
    rows = [[visible(c) for c in r] for r in rows]
    widths = [max([_width(h)] + [_width(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, (cell, width) in enumerate(zip(cells, widths, strict=True)):
            pad = " " * (width - _width(cell))
            out.append(pad + cell if i in right else cell + pad)
        return "  ".join(out).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


class Repl:
    """Runs commands against an :class:`IMClient` and prints what happens.

    ``out`` prints one line (``print`` by default); the connection's status
    changes and incoming messages go through it too. It is only ever given
    lines made visible (:func:`~bitchat.cli.sanitize.visible`): no control
    character, no line break inside.
    """

    def __init__(
        self,
        im: IMClient,
        out: Output | None = None,
        via: str | None = None,
        *,
        device: str | None = None,
        devices: DeviceStore | None = None,
    ) -> None:
        self.im = im
        self._write: Output = out or print
        self.via = via  # "router HOST:PORT" when a cluster router picks the server
        # The device id to log in with (--device); else the one ``devices`` keeps for
        # the user, else the server names one and ``devices`` keeps it.
        self.device = device
        self.devices = devices
        # The JWT subject the session's device is kept under; None: a password login
        # (kept under the name); "": a JWT without a subject (not kept).
        self._subject: str | None = None
        self._group_names: dict[int, str] = {}  # for receipt lines: [group 1] moon
        # The files of file/image messages shown (pushed or listed), for -getfile.
        self._files: collections.OrderedDict[int, dict[str, Any]] = collections.OrderedDict()
        self.failures = 0
        """Commands that failed (a refusal, a lost connection, a bad command line)."""
        self._connected_once = False  # "Connected" the first time, then "Reconnected"
        self._relogin_start = 0  # pushes counted when the connection came back
        self._quiet = False  # a drop not worth telling: the next "Connected" is not said
        self._up = False
        self._status: str | None = None  # the status line printed for the current outage
        # Lines (or messages, formatted when printed: a login's own messages need the
        # user it names, known once its answer is in) that wait for a login line.
        self._held: list[str | ChatMessage] | None = None
        # Chat pushes counted (duplicates too), and the count at which the last login's
        # missed messages are all in: the end of a script waits for them.
        self._pushed = 0
        self._due = 0
        self._all_in = asyncio.Event()
        self._all_in.set()
        # Set when a connection attempt has ended (connected or not), cleared while one
        # runs: a command waits for an attempt under way rather than failing at once.
        self._attempted = asyncio.Event()
        # command -> (what it does, its failure's name: "<name> failed cause: ...")
        self._commands: dict[str, tuple[Command, str]] = {
            "-lo": (self.login, "Login"),
            "-jwt": (self.login_jwt, "Login"),
            "-reg": (self.register, "Register"),
            "-lu": (self.list_users, "List online user"),
            "-pc": (self.p2p_chat, "Send p2p message"),
            "-gc": (self.group_chat, "Send group message"),
            "-gcreate": (self.group_create, "Create group"),
            "-gjoin": (self.group_join, "Join group"),
            "-gleave": (self.group_leave, "Leave group"),
            "-gl": (self.group_list, "List groups"),
            "-gm": (self.group_members, "List members"),
            "-hi": (self.history, "History"),
            "-file": (self.send_file, "Send file"),
            "-getfile": (self.get_file, "Get file"),
            "-cl": (self.conversation_list, "List conversations"),
            "-read": (self.mark_read, "Mark read"),
            "-gkick": (self.group_kick, "Kick"),
            "-gban": (self.group_ban, "Ban"),
            "-gunban": (self.group_unban, "Unban"),
            "-gmute": (self.group_mute, "Mute"),
            "-ginvite": (self.group_invite, "Add member"),
            "-glink": (self.group_link, "Create invite"),
            "-grole": (self.group_role, "Set role"),
            "-gopts": (self.group_options, "Set group options"),
            "-greqs": (self.group_requests, "List join requests"),
            "-gapprove": (self.group_approve, "Approve"),
            "-gdeny": (self.group_deny, "Deny"),
            "-block": (self.block, "Block"),
            "-unblock": (self.unblock, "Unblock"),
            "-blocked": (self.blocked, "List blocked users"),
            "-edit": (self.edit, "Edit"),
            "-recall": (self.recall, "Recall"),
            "-reply": (self.reply, "Reply"),
            "-react": (self.react, "React"),
            "-unreact": (self.unreact, "Unreact"),
            "-delete": (self.delete, "Delete"),
        }
        # Where messages seen here belong (a reply names the conversation): the newest.
        self._seen: collections.OrderedDict[int, tuple[str, int]] = collections.OrderedDict()
        im.on_message(self.show_message)
        im.on_edit(self.show_event)
        im.on_recall(self.show_event)
        im.on_reaction(self.show_event)
        im.on_hidden(self.show_hidden)
        im.client.on(ChatMessage, self._count_push)  # after the IMClient's own handler
        im.on_receipt(self.show_receipt)
        im.on_group_event(self.show_group_event)
        im.on_relogin(self._relogged_in)
        im.client.on_state.append(self._state_changed)

    def out(self, line: str) -> None:
        """Print one line; what came from the server in it is shown, not obeyed."""
        self._write(visible(line))

    # -- events ---------------------------------------------------------------------------

    def show_message(self, m: ChatMessage) -> None:
        """Print an incoming message (after a login line under way)."""
        self._remember(m)
        self._show(m)

    def _remember(self, m: ChatMessage) -> None:
        me = self.im.user
        if m.kind == GROUP:
            where = (GROUP, m.to)
        else:
            peer = m.to if me is not None and m.sender_id == me.id else m.sender_id
            where = (P2P, peer)
        self._seen[m.msg_id] = where
        if len(self._seen) > SEEN_MESSAGES:
            self._seen.popitem(last=False)

    def format_event(self, m: ChatMessage) -> str:
        """An edit, a recall or a reaction: ``gris(2) edited 253...: new text (edited)``."""
        where = f"[group {m.to}] " if m.kind == GROUP else ""
        who = f"{where}{m.sender_name}({m.sender_id})"
        if m.op == "edit":
            return f"{who} edited {m.target}: {m.text} (edited)"
        if m.op == "recall":
            return f"{who} recalled message {m.target}"
        if m.op == "react":
            return f"{who} reacted {m.emoji} to message {m.target}"
        return f"{who} took back {m.emoji} from message {m.target}"

    def show_event(self, m: ChatMessage) -> None:
        self._show(self.format_event(m))

    def show_hidden(self, h: Hidden) -> None:
        ids = " ".join(str(i) for i in h.msg_ids)
        self._show(f"Deleted for you: {ids}")

    def format_message(self, m: ChatMessage) -> str:
        """``gris(2): text``; one of ours sent from another device names the recipient,
        ``houyi(1) -> 2: text``; a group's is ``[group 1] gris(2): text``, ours too
        (the group is the recipient)."""
        me = self.im.user
        text = self._text_of(m)
        if m.kind == GROUP:
            return f"[group {m.to}] {m.sender_name}({m.sender_id}): {text}"
        if me is not None and m.sender_id == me.id:
            return f"{m.sender_name}({m.sender_id}) -> {m.to}: {text}"
        return f"{m.sender_name}({m.sender_id}): {text}"

    def _text_of(self, m: ChatMessage) -> str:
        """A message's text; a file's name, size and how to fetch it (remembered)."""
        fields = file_of(m)
        if fields is None:
            return m.text
        self._files[m.msg_id] = fields
        self._files.move_to_end(m.msg_id)
        while len(self._files) > _FILES_KEPT:
            self._files.popitem(last=False)
        kind = "image" if m.type == "image" else "file"
        return (
            f"[{kind}] {fields.get('name', '')} ({fields.get('size', 0)} bytes): "
            f"-getfile {m.msg_id}"
        )

    def _show(self, item: str | ChatMessage) -> None:
        """Print a line about something that came in, after a login line under way."""
        if self._held is not None:
            self._held.append(item)
        else:
            self.out(item if isinstance(item, str) else self.format_message(item))

    def _count_push(self, m: ChatMessage) -> None:
        self._pushed += 1
        if self._pushed >= self._due:
            self._all_in.set()

    def _expect(self, start: int, ok: LoginOk) -> None:
        """The login that began when ``start`` pushes were counted said ``ok.pending``
        messages follow it."""
        self._due = start + ok.pending
        if self._pushed < self._due:
            self._all_in.clear()
        else:
            self._all_in.set()

    async def show_receipt(self, r: Receipt) -> None:
        """A "read" receipt is one line: ``houyi(1) read your messages up to 17``, in a
        group ``... in [group 1] moon up to 17``; "delivered" ones are not shown."""
        if r.kind != "read":
            return
        who = f"{r.name}({r.user_id}) read your messages"
        if not r.group_id:
            self._show(f"{who} up to {r.seq}")
            return
        name = await self._group_name(r.group_id)
        where = f"[group {r.group_id}]" + (f" {name}" if name else "")
        self._show(f"{who} in {where} up to {r.seq}")

    def show_group_event(self, e: GroupEvent) -> None:
        """One line, e.g. ``[group 5] alice(1) kicked bob(2)``."""
        self._show(f"[group {e.group_id}] {format_group_event(e)}")

    async def _group_name(self, group_id: int) -> str:
        """The group's name, asked of the server the first time ("" if it cannot say)."""
        if group_id not in self._group_names:
            with contextlib.suppress(BitchatError, OSError):
                self._remember_groups(await self.im.my_groups())
        return self._group_names.get(group_id, "")

    def _remember_groups(self, groups: Sequence[dict[str, Any]]) -> None:
        for g in groups:
            self._group_names[g["id"]] = g["name"]

    def _hold(self) -> None:
        """Hold incoming messages back until :meth:`_release`: the server pushes the
        missed ones right behind its login answer, and they read better after the
        login line than before it."""
        if self._held is None:
            self._held = []

    def _release(self) -> None:
        held, self._held = self._held, None
        for item in held or ():
            self.out(item if isinstance(item, str) else self.format_message(item))

    def _where(self) -> str:
        client = self.im.client
        return f"{client.host}:{client.port}"

    def _state_changed(self, state: State) -> None:
        if state is State.CONNECTING:
            self._attempted.clear()
            return
        self._attempted.set()
        if state is State.CONNECTED:
            if not self._quiet:
                self.out(
                    f"{'Reconnected' if self._connected_once else 'Connected'} to {self._where()}"
                )
            self._quiet = False
            self._connected_once = self._up = True
            self._status = None
            if self.im.user is not None:
                self._hold()  # until "Logged in again" (or the connection drops)
                self._relogin_start = self._pushed
        elif state is State.CLOSED:
            error = self.im.client.last_error
            if isinstance(error, TLSError):  # the client gave up: say why, once
                self._release()
                self._up = False
                self._status = f"Cannot connect to {self._where()}: {_cause(error)}; not retrying"
                self.out(self._status)
        elif state is State.DISCONNECTED:
            self._release()
            reason = self.im.client.close_reason
            if (
                self._up
                and self.im.user is None
                and reason is not None
                and reason.code in (codes.LOGIN_TIMEOUT, codes.IDLE_TIMEOUT)
            ):
                # Not logged in, the server let an idle connection go: nothing is lost,
                # the client connects again at once; no need to tell the user.
                self._quiet = True
                return
            if self._up:
                self._up = False
                self._status = "Connection lost; reconnecting..."
                self.out(self._status)
                return
            status = self._outage_status()
            if status is not None and status != self._status:
                self._status = status
                self.out(status)

    def _outage_status(self) -> str | None:
        """The line that says why the client cannot connect, or None when said already.

        Said once per outage; through a router, again when the reason changes
        (the router went down, or no server is alive).
        """
        error = self.im.client.last_error
        if self.via is not None:
            if isinstance(error, RequestError):
                if error.code == codes.NO_SERVER:
                    return f"No server is alive in the cluster ({self.via}); retrying..."
                return f"The {self.via} cannot give a server ({_cause(error)}); retrying..."
            if isinstance(error, (ConnectionClosed, RequestTimeout)):
                return f"Cannot reach the {self.via}; retrying..."
        if self._status is not None:
            return None  # "Connection lost; reconnecting..." says it already
        if self.via is not None:
            return f"Cannot reach {self._where()} (given by the {self.via}); retrying..."
        return f"Cannot reach {self._where()}; retrying..."

    def _relogged_in(self, ok: LoginOk | None, error: Exception | None) -> None:
        if ok is not None:
            self._expect(self._relogin_start, ok)
            self.out(f"Logged in again as {ok.name}({ok.user_id}){_missed(ok)}")
            self._keep_device(ok)
        elif error is not None:
            self.out(f"Login failed cause: {_cause(error)}")
        self._release()

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
            for text in USAGE.split("\n"):
                self.out(text)
            return True
        parts = line.split()
        entry = self._commands.get(parts[0])
        if entry is None:
            self._fail(f"Unknown command: {parts[0]} (type help for the commands)")
            return True
        command, name = entry
        try:
            await command(parts, line)
        except _Usage as exc:
            self._fail(f"Usage: {exc}")
        except (BitchatError, OSError) as exc:
            self._fail(f"{name} failed cause: {_cause(exc)}")
        return True

    def _fail(self, line: str) -> None:
        self.failures += 1
        self.out(line)

    async def _connected(self) -> None:
        """Return when the client is connected; raise at once when it is not.

        A connection attempt under way (the first one, say, when a script's first
        line comes at once) is waited for, up to the time one attempt may take.
        """
        client = self.im.client
        if client.connected:
            return
        if client.state is not State.CLOSED and not self._attempted.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._attempted.wait(), client.settings.connect_timeout)
            if client.connected:
                return
        error = client.last_error
        if client.state is State.CLOSED and isinstance(error, TLSError):
            raise TLSError(error.reason, error.message)  # final: no "retrying" here
        where = f"a server through the {self.via}" if self.via else self._where()
        raise ConnectionClosed(f"not connected to {where} (retrying in the background)")

    @staticmethod
    def _rest(line: str, words: int) -> str:
        """The line after its first ``words`` words, inner spaces kept."""
        parts = line.split(maxsplit=words)
        return parts[words].strip() if len(parts) > words else ""

    async def login(self, parts: list[str], line: str) -> None:
        if len(parts) != 3:
            raise _Usage("-lo userName password")
        await self._connected()
        name = parts[1]
        kept = self.devices.get(name) if self.devices is not None else ""
        await self._log_in(None, kept, name=name, password=parts[2])

    async def login_jwt(self, parts: list[str], line: str) -> None:
        """``-jwt token`` (and ``--jwt``, at start): the same lines as ``-lo``."""
        if len(parts) != 2:
            raise _Usage("-jwt token")
        await self._connected()
        subject = jwt_subject(parts[1])
        kept = self.devices.get_subject(subject) if self.devices and subject else ""
        await self._log_in(subject, kept, jwt=parts[1])

    async def _log_in(self, subject: str | None, kept: str, **credentials: str) -> None:
        device = self.device or kept  # "": the server names a new one
        self._hold()
        start = self._pushed
        try:
            ok = await self.im.login(**credentials, device=device)
        except (BitchatError, OSError) as exc:
            self._fail(f"Login failed cause: {_cause(exc)}")
        else:
            self._subject = subject
            self._expect(start, ok)
            self.out(f"Login success{_missed(ok)}")
            self._keep_device(ok)
        finally:
            self._release()

    def _keep_device(self, ok: LoginOk) -> None:
        """Keep the session's device for the next run, unless ``--device`` names it."""
        if self.device or self.devices is None or not ok.device or self._subject == "":
            return
        try:
            if self._subject is None:
                self.devices.put(ok.name, ok.device)
            else:
                self.devices.put_subject(self._subject, ok.device)
        except OSError as exc:
            # Not a failed login: this run goes on; the next one is a new device.
            self.out(f"Cannot keep the device id in {self.devices.path}: {_cause(exc)}")

    async def register(self, parts: list[str], line: str) -> None:
        if len(parts) != 3:
            raise _Usage("-reg userName password")
        await self._connected()
        user = await self.im.register(parts[1], parts[2])
        self.out(f"Registered {user.name}({user.id}); log in with -lo")

    async def list_users(self, parts: list[str], line: str) -> None:
        await self._connected()
        users = await self.im.online_users()
        self.out("userName(userId)")
        self.out("----------------")
        for u in users:
            self.out(f"{u.name}({u.id})")

    def _msg_id(self, parts: list[str], usage: str, rest: bool) -> int:
        msg_id = _int(parts[1]) if len(parts) >= (3 if rest else 2) else None
        if msg_id is None or (not rest and len(parts) != 2):
            raise _Usage(usage)
        return msg_id

    async def edit(self, parts: list[str], line: str) -> None:
        msg_id = self._msg_id(parts, "-edit msgId text", True)
        await self._connected()
        await self.im.edit(msg_id, self._rest(line, 2))
        self.out(f"Edit success (id {msg_id})")

    async def recall(self, parts: list[str], line: str) -> None:
        msg_id = self._msg_id(parts, "-recall msgId", False)
        await self._connected()
        await self.im.recall(msg_id)
        self.out(f"Recall success (id {msg_id})")

    async def reply(self, parts: list[str], line: str) -> None:
        msg_id = self._msg_id(parts, "-reply msgId text", True)
        where = self._seen.get(msg_id)
        if where is None:
            raise RequestError(codes.NOT_FOUND, f"message {msg_id} not seen here (try -hi)")
        await self._connected()
        kind, to = where
        text = self._rest(line, 2)
        if kind == GROUP:
            ack = await self.im.send_group(to, text, reply_to=msg_id)
        else:
            ack = await self.im.send_p2p(to, text, reply_to=msg_id)
        self.out(f"Reply success (id {ack.msg_id})")

    async def react(self, parts: list[str], line: str) -> None:
        if len(parts) != 3 or _int(parts[1]) is None:
            raise _Usage("-react msgId emoji")
        await self._connected()
        await self.im.react(int(parts[1]), parts[2])
        self.out(f"React success (id {parts[1]})")

    async def unreact(self, parts: list[str], line: str) -> None:
        if len(parts) != 3 or _int(parts[1]) is None:
            raise _Usage("-unreact msgId emoji")
        await self._connected()
        await self.im.unreact(int(parts[1]), parts[2])
        self.out(f"Unreact success (id {parts[1]})")

    async def delete(self, parts: list[str], line: str) -> None:
        msg_id = self._msg_id(parts, "-delete msgId", False)
        await self._connected()
        await self.im.delete_for_me([msg_id])
        self.out(f"Delete success (id {msg_id})")

    async def p2p_chat(self, parts: list[str], line: str) -> None:
        to = _int(parts[1]) if len(parts) >= 3 else None
        if to is None:
            raise _Usage("-pc userId message")
        await self._connected()
        ack = await self.im.send_p2p(to, self._rest(line, 2))
        self.out(f"Send p2p message success (id {ack.msg_id})")

    async def group_chat(self, parts: list[str], line: str) -> None:
        group_id = _int(parts[1]) if len(parts) >= 3 else None
        if group_id is None:
            raise _Usage("-gc groupId message")
        await self._connected()
        ack = await self.im.send_group(group_id, self._rest(line, 2))
        self.out(f"Send group message success (id {ack.msg_id})")

    async def send_file(self, parts: list[str], line: str) -> None:
        usage = "-file userId path  or  -file -g groupId path"
        group = len(parts) >= 2 and parts[1] == "-g"
        target = _int(parts[2 if group else 1]) if len(parts) >= (4 if group else 3) else None
        path = self._rest(line, 3 if group else 2)
        if target is None or not path:
            raise _Usage(usage)
        await self._connected()
        if group:
            ack, info = await self.im.send_file(path, group_id=target)
        else:
            ack, info = await self.im.send_file(path, to=target)
        self.out(f"Send file success (id {ack.msg_id}): {info['name']}, {info['size']} bytes")

    async def get_file(self, parts: list[str], line: str) -> None:
        msg_id = _int(parts[1]) if len(parts) >= 2 else None
        if msg_id is None:
            raise _Usage("-getfile msgId [folder]")
        folder = self._rest(line, 2) or "."
        fields = self._files.get(msg_id)
        if fields is None:
            raise RequestError(
                codes.NOT_FOUND,
                f"no file message {msg_id} shown here (list the conversation with -hi)",
            )
        await self._connected()
        path = await self.im.download_file(fields["file_id"], folder)
        self.out(f"Get file success: {path}")

    async def group_create(self, parts: list[str], line: str) -> None:
        name = self._rest(line, 1)
        if not name:
            raise _Usage("-gcreate groupName")
        await self._connected()
        g = await self.im.create_group(name)
        self._group_names[g.group_id] = g.name
        self.out(f"Group created: {g.name}({g.group_id})")

    @staticmethod
    def _group_id(parts: list[str], usage: str) -> int:
        group_id = _int(parts[1]) if len(parts) == 2 else None
        if group_id is None:
            raise _Usage(usage)
        return group_id

    async def group_join(self, parts: list[str], line: str) -> None:
        group_id = _int(parts[1]) if len(parts) in (2, 3) else None
        if group_id is None:
            raise _Usage("-gjoin groupId [code]")
        await self._connected()
        g = await self.im.join_group(group_id, parts[2] if len(parts) == 3 else "")
        self._group_names[g.group_id] = g.name
        if g.pending:
            self.out(f"Asked to join group {g.name}({g.group_id}); an admin will answer")
            return
        self.out(f"Joined group {g.name}({g.group_id}), {g.members} member(s)")

    async def group_leave(self, parts: list[str], line: str) -> None:
        group_id = self._group_id(parts, "-gleave groupId")
        await self._connected()
        await self.im.leave_group(group_id)
        self.out(f"Left group {group_id}")

    async def group_list(self, parts: list[str], line: str) -> None:
        if len(parts) != 1:
            raise _Usage("-gl")
        await self._connected()
        groups = await self.im.my_groups()
        self._remember_groups(groups)
        if not groups:
            self.out("No groups")
            return
        rows = [[f"{g['name']}({g['id']})", str(g["members"])] for g in groups]
        for text in table(["groupName(groupId)", "members"], rows, right=[1]):
            self.out(text)

    async def group_members(self, parts: list[str], line: str) -> None:
        group_id = self._group_id(parts, "-gm groupId")
        await self._connected()
        members = await self.im.group_members(group_id)
        if not members:
            self.out("No members")
            return
        rows = [
            [
                f"{m['name']}({m['id']})",
                "online" if m["online"] else "offline",
                m.get("role", "") + (" (muted)" if _muted(m.get("muted_until", 0)) else ""),
            ]
            for m in members
        ]
        for text in table(["userName(userId)", "status", "role"], rows):
            self.out(text)

    # -- moderation -----------------------------------------------------------------------

    @staticmethod
    def _ids(parts: list[str], n: int, usage: str) -> list[int]:
        """The ``n`` ids after the command (exactly), or the usage."""
        ids = [_int(a) for a in parts[1:]]
        if len(ids) != n or any(i is None for i in ids):
            raise _Usage(usage)
        return [i or 0 for i in ids]

    async def group_kick(self, parts: list[str], line: str) -> None:
        group_id, user_id = self._ids(parts, 2, "-gkick groupId userId")
        await self._connected()
        await self.im.kick(group_id, user_id)
        self.out(f"Kicked user {user_id} from group {group_id}")

    async def group_ban(self, parts: list[str], line: str) -> None:
        group_id, user_id = self._ids(parts, 2, "-gban groupId userId")
        await self._connected()
        await self.im.ban(group_id, user_id)
        self.out(f"Banned user {user_id} from group {group_id}")

    async def group_unban(self, parts: list[str], line: str) -> None:
        group_id, user_id = self._ids(parts, 2, "-gunban groupId userId")
        await self._connected()
        await self.im.ban(group_id, user_id, False)
        self.out(f"Lifted the ban of user {user_id} in group {group_id}")

    async def group_mute(self, parts: list[str], line: str) -> None:
        group_id, user_id, minutes = self._ids(parts, 3, "-gmute groupId userId minutes")
        await self._connected()
        await self.im.mute(group_id, user_id, minutes * 60)
        if minutes:
            self.out(f"Muted user {user_id} in group {group_id} for {minutes} minute(s)")
        else:
            self.out(f"Unmuted user {user_id} in group {group_id}")

    async def group_invite(self, parts: list[str], line: str) -> None:
        group_id, user_id = self._ids(parts, 2, "-ginvite groupId userId")
        await self._connected()
        await self.im.add_member(group_id, user_id)
        self.out(f"Added user {user_id} to group {group_id}")

    async def group_link(self, parts: list[str], line: str) -> None:
        [group_id] = self._ids(parts, 1, "-glink groupId")
        await self._connected()
        inv = await self.im.create_invite(group_id)
        until = _when(inv.expires_at)
        self.out(f"Invite code for group {group_id}: {inv.code} (until {until})")

    async def group_role(self, parts: list[str], line: str) -> None:
        usage = "-grole groupId userId admin|member|owner"
        if len(parts) != 4:
            raise _Usage(usage)
        group_id, user_id = self._ids(parts[:3], 2, usage)
        role = parts[3]
        if role not in ("admin", "member", "owner"):
            raise _Usage(usage)
        await self._connected()
        await self.im.set_role(group_id, user_id, role)
        if role == "owner":
            self.out(f"User {user_id} now owns group {group_id}")
        else:
            self.out(f"User {user_id} is now {role} in group {group_id}")

    async def group_options(self, parts: list[str], line: str) -> None:
        usage = "-gopts groupId invite_only=on|off history=on|off"
        group_id = _int(parts[1]) if len(parts) >= 3 else None
        if group_id is None:
            raise _Usage(usage)
        options: dict[str, bool] = {}
        for word in parts[2:]:
            key, _, value = word.partition("=")
            name = {"invite_only": "invite_only", "history": "history_visible"}.get(key)
            if name is None or value not in ("on", "off") or name in options:
                raise _Usage(usage)
            options[name] = value == "on"
        await self._connected()
        g = await self.im.set_group_options(group_id, **options)
        self.out(
            f"Group {g.name}({g.group_id}): invite_only={_on(g.invite_only)} "
            f"history={_on(g.history_visible)}"
        )

    async def group_requests(self, parts: list[str], line: str) -> None:
        [group_id] = self._ids(parts, 1, "-greqs groupId")
        await self._connected()
        requests = await self.im.join_requests(group_id)
        if not requests:
            self.out("No join requests")
            return
        rows = [[f"{r['name']}({r['user_id']})", _when(r["ts"])] for r in requests]
        for text in table(["userName(userId)", "asked"], rows):
            self.out(text)

    async def group_approve(self, parts: list[str], line: str) -> None:
        group_id, user_id = self._ids(parts, 2, "-gapprove groupId userId")
        await self._connected()
        await self.im.answer_join_request(group_id, user_id, True)
        self.out(f"Let user {user_id} into group {group_id}")

    async def group_deny(self, parts: list[str], line: str) -> None:
        group_id, user_id = self._ids(parts, 2, "-gdeny groupId userId")
        await self._connected()
        await self.im.answer_join_request(group_id, user_id, False)
        self.out(f"Refused user {user_id} into group {group_id}")

    async def block(self, parts: list[str], line: str) -> None:
        [user_id] = self._ids(parts, 1, "-block userId")
        await self._connected()
        await self.im.block(user_id)
        self.out(f"Blocked user {user_id}")

    async def unblock(self, parts: list[str], line: str) -> None:
        [user_id] = self._ids(parts, 1, "-unblock userId")
        await self._connected()
        await self.im.block(user_id, False)
        self.out(f"Unblocked user {user_id}")

    async def blocked(self, parts: list[str], line: str) -> None:
        self._ids(parts, 0, "-blocked")
        await self._connected()
        users = await self.im.blocked()
        if not users:
            self.out("No blocked users")
            return
        self.out("userName(userId)")
        self.out("----------------")
        for u in users:
            self.out(f"{u.name}({u.id})")

    async def history(self, parts: list[str], line: str) -> None:
        group, target, before = _conversation_args(
            parts, "-hi userId [beforeId]  or  -hi -g groupId [beforeId]"
        )
        await self._connected()
        if group:
            page = await self.im.history(group_id=target, before=before, limit=HISTORY_PAGE)
        else:
            page = await self.im.history(peer_id=target, before=before, limit=HISTORY_PAGE)
        messages = page.chat_messages()
        if not messages:
            self.out("No messages")
            return
        for m in reversed(messages):
            if m.op:
                continue  # an event: the messages show what it changed
            self._remember(m)
            when = datetime.datetime.fromtimestamp(m.ts / 1000).strftime("%Y-%m-%d %H:%M:%S")
            # The id before the text, which is the sender's: a text cannot forge it.
            text = _lively(m, self._text_of(m) if file_of(m) is not None else None)
            self.out(f"{when} (id {m.msg_id}) {m.sender_name}({m.sender_id}): {text}")
        if page.more:
            flag = "-g " if group else ""
            self.out(f"(older: -hi {flag}{target} {messages[-1].msg_id})")

    async def conversation_list(self, parts: list[str], line: str) -> None:
        before = _int(parts[1]) if len(parts) == 2 else 0
        if len(parts) > 2 or before is None:
            raise _Usage("-cl [before]")
        await self._connected()
        page = await self.im.conversations(CONVERSATION_PAGE, before)
        if not page.conversations:
            self.out("No conversations")
            return
        rows = []
        for c in page.conversations:
            if c["kind"] == P2P:
                who = f"{c['name']}({c['peer_id']})"
            else:
                self._group_names[c["group_id"]] = c["name"]
                who = f"[group {c['group_id']}] {c['name']}"
            m = c.get("last_message")
            last = _clip(f"{m['sender_name']}({m['sender_id']}): {m['text']}") if m else ""
            rows.append([who, str(c["unread"]), last])
        for text in table(["conversation", "unread", "last message"], rows, right=[1]):
            self.out(text)
        if page.more:
            self.out(f"(more: -cl {page.conversations[-1]['activity']})")

    async def mark_read(self, parts: list[str], line: str) -> None:
        group, target, seq = _conversation_args(
            parts, "-read userId [seq]  or  -read -g groupId [seq]"
        )
        await self._connected()
        if group:
            state = await self.im.mark_read(group_id=target, seq=seq)
            where, none = f"in group {target}", f"No messages in group {target}"
        else:
            state = await self.im.mark_read(peer_id=target, seq=seq)
            where, none = f"with user {target}", f"No conversation with user {target}"
        if state.read_seq == 0 and state.unread == 0:
            self.out(none)  # read up to 0: there is no message to read
            return
        self.out(f"Read up to {state.read_seq} {where}, {state.unread} unread")

    # -- front ends -----------------------------------------------------------------------

    async def run_lines(self, lines: AsyncIterator[str]) -> None:
        """Run commands from ``lines`` until ``bye`` or their end.

        At their end (or ``bye``), the missed messages the last login announced
        (``LoginOk.pending``) are waited for, within ``request_timeout``, so a
        script that only logs in prints them before it exits."""
        async for line in lines:
            if line.strip() == "bye":
                await self.missed_messages_in()
            if not await self.execute(line):
                return
        await self.missed_messages_in()

    async def missed_messages_in(self, timeout: float | None = None) -> bool:
        """Wait until the last login's missed messages have all come (False: not
        within ``timeout``, by default ``request_timeout``; or the connection went)."""
        if self._all_in.is_set():
            return True
        wait = self.im.client.settings.request_timeout if timeout is None else timeout
        try:
            await asyncio.wait_for(self._all_in.wait(), wait)
        except TimeoutError:
            return False
        return True

    async def run_interactive(
        self, session: PromptSession[str] | None = None, *, patch: bool = True
    ) -> None:
        """Prompt with ``bitchat> `` until ``bye``, Ctrl-D or Ctrl-C.

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
                except (KeyboardInterrupt, EOFError):  # Ctrl-C or Ctrl-D: as bye
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
