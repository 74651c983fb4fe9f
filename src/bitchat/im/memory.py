"""The standalone connection center: who is online, in this process's memory."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from bitchat.im.centers import ConnectionCenter, Message
from bitchat.im.delivery import push_message

if TYPE_CHECKING:
    from bitchat.protocol.packets import Packet
    from bitchat.session import Session


class MemoryConnectionCenter(ConnectionCenter):
    def __init__(self) -> None:
        self._by_user: dict[int, list[Session]] = {}

    async def attach(self, user_id: int, session: Session) -> None:
        sessions = self._by_user.setdefault(user_id, [])
        if session not in sessions:
            sessions.append(session)

    async def detach(self, session: Session) -> None:
        user_id = session.user_id
        if user_id is None:
            return
        sessions = self._by_user.get(user_id)
        if sessions and session in sessions:
            sessions.remove(session)
            if not sessions:
                del self._by_user[user_id]

    def local_sessions(self, user_id: int) -> Sequence[Session]:
        return self._by_user.get(user_id, ())

    def local_users(self) -> list[int]:
        return sorted(self._by_user)

    async def online_users(self) -> list[int]:
        return sorted(self._by_user)

    async def is_online(self, user_id: int) -> bool:
        return user_id in self._by_user

    def deliver(self, message: Message, user_ids: Iterable[int], exclude_session: int = 0) -> None:
        by_user = self._by_user
        push_message(
            message,
            [s for u in user_ids for s in by_user.get(u, ()) if s.id != exclude_session],
        )

    def deliver_event(
        self, packet: Packet, user_ids: Sequence[int], exclude_session: int = 0
    ) -> None:
        by_user = self._by_user
        for u in user_ids:
            for s in by_user.get(u, ()):
                if s.id != exclude_session:
                    s.push(packet)
