"""Typing notifications: relayed to the conversation's other side, never stored.

As XMPP's chat states (XEP-0085) and Tinode's ``{note what="kp"}``: a client
says it is typing (:class:`~bitchat.im.packets.Typing`), and every connection of
the other user, or of every other member of the group, gets a
:class:`~bitchat.im.packets.TypingEvent` at once, wherever it is in a cluster
(:meth:`~bitchat.im.centers.ConnectionCenter.deliver_typing`). The sender's own
other devices get nothing: no page shows "you are typing".

Best effort, bounded per connection and conversation: a "typing" lasts
``typing_timeout`` seconds (recipients get it as ``expires_in`` and clear it
themselves; the server forgets it then, pushing nothing), and one comes through
at most every ``typing_interval`` seconds; sooner ones are dropped silently, not
refused. A stop is relayed only for a typing that is still on, so the other side
is told at once when the typer stops, logs out or disconnects. A chat message
means stopped: the server forgets the typing and pushes nothing, since the
recipients clear it on the message itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bitchat.errors import RequestError, codes
from bitchat.im.centers import NO_BLOCKS, Blocks
from bitchat.im.packets import Ok, Typing, TypingEvent

if TYPE_CHECKING:
    from bitchat.im.centers import ConnectionCenter, UserCenter
    from bitchat.session import Session
    from bitchat.settings import Settings

_OK = Ok()
TYPING_KEY = "bitchat.typing"
"""Session data key: the connection's conversations with a recent typing, by key."""

Key = tuple[int, int]
"""A conversation as the typer sees it: ``(to, 0)`` one-to-one, ``(0, group_id)``."""


class _State:
    """One connection's typing in one conversation."""

    __slots__ = ("on", "recipients", "since", "timer")

    def __init__(self) -> None:
        self.on = False
        """A "typing" was relayed and has not ended: a stop must be told."""
        self.since = 0.0
        """When the last "typing" was relayed (loop time)."""
        self.recipients: Sequence[int] = ()
        self.timer: asyncio.TimerHandle | None = None
        """Forgets this state: when the typing expires, or once the interval is over."""


def _unblocked(recipients: Sequence[int], blocks: Blocks) -> Sequence[int]:
    """The recipients but those the typer blocks or is blocked by (no typing passes)."""
    if blocks is NO_BLOCKS:
        return recipients
    return [r for r in recipients if not blocks.either(r)]


class TypingRelay:
    """The Typing handler and the stops that come from logouts, closes and messages."""

    def __init__(
        self, settings: Settings, users: UserCenter, connections: ConnectionCenter
    ) -> None:
        self.settings = settings
        self.users = users
        self.connections = connections

    def on_typing(self, session: Session, p: Typing) -> Any:
        """The handler: relay at once when the recipients are cached, else look them up."""
        if bool(p.to) == bool(p.group_id):
            raise RequestError(codes.INVALID_PACKET, "name either to or group_id")
        if p.to == session.user_id:
            raise RequestError(codes.INVALID_PACKET, "no typing to yourself")
        assert session.user_id is not None
        blocks = self.users.known_blocks(session.user_id)
        if blocks is None:
            return self._slow(session, p)
        if p.to:
            if self.users.known_user(p.to) is not None:
                self._relay(session, p, _unblocked((p.to,), blocks))
                return _OK
        else:
            members = self.users.known_members(p.group_id)
            if members is not None:
                others = self._others(members, session, p.group_id)
                self._relay(session, p, _unblocked(others, blocks))
                return _OK
        return self._slow(session, p)

    async def _slow(self, session: Session, p: Typing) -> Ok:
        if p.to:
            if await self.users.get_user(p.to) is None:
                raise RequestError(codes.NOT_FOUND, f"no user {p.to}")
            recipients: Sequence[int] = (p.to,)
        else:
            if await self.users.get_group(p.group_id) is None:
                raise RequestError(codes.NOT_FOUND, f"no group {p.group_id}")
            members = await self.users.group_members(p.group_id)
            recipients = self._others(members, session, p.group_id)
        if not session.closed and session.user_id is not None:
            blocks = await self.users.blocks(session.user_id)
            self._relay(session, p, _unblocked(recipients, blocks))
        return _OK

    @staticmethod
    def _others(members: Sequence[int], session: Session, group_id: int) -> list[int]:
        me = session.user_id
        if me not in members:
            raise RequestError(codes.NOT_MEMBER, f"you are not in group {group_id}")
        return [m for m in members if m != me]

    def _relay(self, session: Session, p: Typing, recipients: Sequence[int]) -> None:
        key = (p.to, p.group_id)
        states: dict[Key, _State] | None = session.data.get(TYPING_KEY)
        st = states.get(key) if states is not None else None
        loop = asyncio.get_running_loop()
        now = loop.time()
        s = self.settings
        if not p.typing:
            if st is None or not st.on:
                return  # nothing shown: nothing to clear
            st.on = False
            self._push(session, key, st.recipients, False)
            # Kept until the interval is over, so typing/stop flapping stays bounded.
            self._forget_at(session, key, st, st.since + s.typing_interval - now)
            return
        if st is not None and now - st.since < s.typing_interval:
            return  # too soon after the last one: dropped, typing is best effort
        if st is None:
            st = _State()
            if states is None:
                states = session.data[TYPING_KEY] = {}
            states[key] = st
        st.on = True
        st.since = now
        st.recipients = recipients
        self._forget_at(session, key, st, max(s.typing_timeout, s.typing_interval))
        self._push(session, key, recipients, True)

    def _forget_at(self, session: Session, key: Key, st: _State, delay: float) -> None:
        if st.timer is not None:
            st.timer.cancel()
        st.timer = asyncio.get_running_loop().call_later(
            max(delay, 0.0), self._forget, session, key, st
        )

    @staticmethod
    def _forget(session: Session, key: Key, st: _State) -> None:
        # Expired: recipients clear it themselves (they got expires_in), nothing is pushed.
        states: dict[Key, _State] | None = session.data.get(TYPING_KEY)
        if states is not None and states.get(key) is st:
            del states[key]
            if not states:
                del session.data[TYPING_KEY]

    def _push(self, session: Session, key: Key, recipients: Sequence[int], on: bool) -> None:
        if not recipients:
            return
        to, group_id = key
        event = TypingEvent(
            session.user_id or 0,
            session.user_name or "",
            to,
            group_id,
            on,
            self.settings.typing_timeout if on else 0.0,
        )
        self.connections.deliver_typing(event, recipients)

    def message_sent(self, session: Session, to: int, group_id: int) -> None:
        """The connection sent a message there: its typing is over (no push)."""
        states: dict[Key, _State] | None = session.data.get(TYPING_KEY)
        if states is None:
            return
        st = states.pop((to, group_id), None)
        if st is not None and st.timer is not None:
            st.timer.cancel()
        if not states:
            del session.data[TYPING_KEY]

    def stop_all(self, session: Session) -> None:
        """The connection logs out or closes: every typing still on stops, told at once."""
        states: dict[Key, _State] | None = session.data.pop(TYPING_KEY, None)
        if not states or session.user_id is None:
            return
        for key, st in states.items():
            if st.timer is not None:
                st.timer.cancel()
            if st.on:
                self._push(session, key, st.recipients, False)
