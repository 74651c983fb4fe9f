"""Group moderation and user blocks: every rule in one place.

:class:`Moderation` (``im.moderation`` of an :class:`~bitchat.im.service.IMService`)
decides who may do what; the packet handlers and the server API both call it.
Each method takes the actor's user id first; actor 0 is the server API, which
acts with the owner's rights. The user center only reads and writes
(:class:`~bitchat.im.centers.UserCenter`): adding a member goes through its
``join_group``, removing one through its ``leave_group``.

Roles, highest first: one owner (the creator, until a transfer), admins,
members. The owner names admins and hands the group over; an admin or the
owner kicks, bans and mutes those below them, changes the options, answers
join requests; in an invite-only group only they invite. A change is pushed
as a :class:`~bitchat.im.packets.GroupEvent` to the members and to the user
it concerns; the state itself is read from the member list and the group's
info (an event is no message of the conversation).

A block stops messages both ways between the two users; the blocked user sees
the blocker offline (no presence, last seen, typing). Groups are not affected.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from bitchat.errors import RequestError, codes
from bitchat.im.centers import Group, Invite, Member, User, conversation
from bitchat.im.delivery import DEVICE, DeviceState
from bitchat.im.packets import ADMIN, MEMBER, OWNER, ROLES, GroupEvent

if TYPE_CHECKING:
    from bitchat.im.service import IMService

log = logging.getLogger("bitchat.im.moderation")

SERVER = 0
"""The actor id of the server API: it acts with the owner's rights."""

_RANK = {OWNER: 3, ADMIN: 2, MEMBER: 1}
_MOST_USES = 1_000_000_000
"""The most uses an invite may count (a stored 32-bit count)."""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _forbidden(what: str) -> RequestError:
    return RequestError(codes.FORBIDDEN, what)


class Moderation:
    """The moderation rules over one IM service's centers."""

    def __init__(self, im: IMService) -> None:
        self.im = im
        self.users = im.users
        self.settings = im.settings

    # -- who is who -------------------------------------------------------------------------

    async def _group(self, group_id: int) -> Group:
        group = await self.users.get_group(group_id)
        if group is None:
            raise RequestError(codes.NOT_FOUND, f"no group {group_id}")
        return group

    async def _actor_role(self, actor_id: int, group_id: int) -> str:
        """The actor's role (the server's is the owner's); ``not_found`` / ``not_member``."""
        if actor_id == SERVER:
            await self._group(group_id)
            return OWNER
        me = await self.users.member(group_id, actor_id)
        if me is None:
            await self._group(group_id)
            raise RequestError(codes.NOT_MEMBER, f"you are not in group {group_id}")
        return me.role

    async def _moderator(self, actor_id: int, group_id: int) -> str:
        role = await self._actor_role(actor_id, group_id)
        if role not in (OWNER, ADMIN):
            raise _forbidden("only an admin or the owner of the group may do that")
        return role

    async def _user(self, user_id: int) -> User:
        user = self.users.known_user(user_id) or await self.users.get_user(user_id)
        if user is None:
            raise RequestError(codes.NOT_FOUND, f"no user {user_id}")
        return user

    async def _below(self, actor_id: int, group_id: int, user_id: int) -> Member | None:
        """The target's standing, checked to be below the actor's (a non-member counts
        as a member); ``forbidden`` otherwise."""
        role = await self._moderator(actor_id, group_id)
        if user_id == actor_id:
            raise _forbidden("not on yourself")
        await self._user(user_id)
        target = await self.users.member(group_id, user_id)
        if _RANK[target.role if target else MEMBER] >= _RANK[role]:
            raise _forbidden("only on a member below your role")
        return target

    # -- events -----------------------------------------------------------------------------

    async def event(
        self, group_id: int, event: str, user_id: int, by_id: int, role: str = "", until: int = 0
    ) -> GroupEvent:
        """A GroupEvent with the names of the two users."""
        users = await self.users.get_users(u for u in (user_id, by_id) if u)
        return GroupEvent(
            group_id,
            event,
            user_id,
            by_id,
            role,
            until,
            users[user_id].name if user_id in users else "",
            users[by_id].name if by_id in users else "",
        )

    async def tell(
        self,
        group_id: int,
        event: str,
        user_id: int,
        by_id: int,
        *,
        role: str = "",
        until: int = 0,
        also: Iterable[int] = (),
    ) -> None:
        """Push a GroupEvent to the group's members and to ``also`` (best effort: the
        change is made; a store that cannot say to whom is logged)."""
        try:
            packet = await self.event(group_id, event, user_id, by_id, role, until)
            members = list(await self.users.group_members(group_id))
        except RequestError as exc:
            log.warning("cannot tell group %d of %s: %s", group_id, event, exc.message)
            return
        extra = [u for u in also if u and u not in members]
        self.im.connections.deliver_event(packet, members + extra)

    async def _tell_admins(self, group_id: int, event: str, user_id: int) -> None:
        packet = await self.event(group_id, event, user_id, user_id)
        admins = [m.user_id for m in await self.users.members_info(group_id) if m.role != MEMBER]
        self.im.connections.deliver_event(packet, admins)

    # -- roles, kicks, bans, mutes -----------------------------------------------------------

    async def set_role(self, actor_id: int, group_id: int, user_id: int, role: str) -> None:
        """The owner gives a member a role; "owner" hands the group over."""
        if role not in ROLES:
            raise RequestError(codes.INVALID_PACKET, f"a role is one of {', '.join(ROLES)}")
        if await self._actor_role(actor_id, group_id) != OWNER:
            raise _forbidden("only the owner of the group may change roles")
        if user_id == actor_id:
            raise _forbidden("not on yourself")
        await self._user(user_id)
        target = await self.users.member(group_id, user_id)
        if target is None:
            raise RequestError(codes.NOT_MEMBER, f"user {user_id} is not in group {group_id}")
        if target.role == OWNER:
            raise _forbidden("the owner's role changes only by a transfer")
        await self.users.set_role(group_id, user_id, role)
        await self.tell(group_id, "role", user_id, actor_id, role=role)

    async def kick(self, actor_id: int, group_id: int, user_id: int) -> None:
        """Remove a member below the actor (who may join again)."""
        if await self._below(actor_id, group_id, user_id) is None:
            raise RequestError(codes.NOT_MEMBER, f"user {user_id} is not in group {group_id}")
        await self.remove(group_id, user_id, "kicked")
        await self.tell(group_id, "kicked", user_id, actor_id, also=[user_id])

    async def ban(self, actor_id: int, group_id: int, user_id: int, ban: bool = True) -> None:
        """Ban a user below the actor (removed if a member), or lift the ban."""
        if not ban:
            await self._moderator(actor_id, group_id)
            await self._user(user_id)
            if await self.users.set_ban(group_id, user_id, actor_id, False):
                await self.tell(group_id, "unbanned", user_id, actor_id, also=[user_id])
            return
        target = await self._below(actor_id, group_id, user_id)
        # The ban first: a join racing it is refused, or removed just below.
        changed = await self.users.set_ban(group_id, user_id, actor_id, True)
        await self.users.drop_join_request(group_id, user_id)
        if target is not None or await self.users.member(group_id, user_id) is not None:
            await self.remove(group_id, user_id, "banned")
        elif not changed:
            return
        await self.tell(group_id, "banned", user_id, actor_id, also=[user_id])

    async def mute(self, actor_id: int, group_id: int, user_id: int, seconds: int) -> int:
        """Mute a member below the actor for ``seconds`` (0 unmutes); the Unix ms until."""
        most = self.settings.max_mute_seconds
        if not 0 <= seconds <= most:
            raise RequestError(codes.INVALID_PACKET, f"a mute lasts 0 to {most} seconds")
        if await self._below(actor_id, group_id, user_id) is None:
            raise RequestError(codes.NOT_MEMBER, f"user {user_id} is not in group {group_id}")
        until = _now_ms() + seconds * 1000 if seconds else 0
        await self.users.set_muted(group_id, user_id, until)
        event = "muted" if until else "unmuted"
        await self.tell(group_id, event, user_id, actor_id, until=until)
        return until

    # -- options, invites, joins --------------------------------------------------------------

    async def set_options(
        self,
        actor_id: int,
        group_id: int,
        invite_only: bool | None = None,
        history_visible: bool | None = None,
    ) -> Group:
        await self._moderator(actor_id, group_id)
        group = await self.users.set_group_options(group_id, invite_only, history_visible)
        if invite_only is not None or history_visible is not None:
            await self.tell(group_id, "options", 0, actor_id)
        return group

    async def _may_invite(self, actor_id: int, group_id: int) -> None:
        """In an invite-only group admins and the owner invite; in an open one, members."""
        role = await self._actor_role(actor_id, group_id)
        if role == MEMBER and (await self._group(group_id)).invite_only:
            raise _forbidden("in an invite-only group only admins and the owner invite")

    async def create_invite(
        self, actor_id: int, group_id: int, ttl: int = 0, max_uses: int = 0
    ) -> Invite:
        most = self.settings.invite_ttl
        if not 0 <= ttl <= most:
            raise RequestError(
                codes.INVALID_PACKET, f"an invite's ttl is 0 (the default) to {most} seconds"
            )
        if not 0 <= max_uses <= _MOST_USES:
            raise RequestError(codes.INVALID_PACKET, f"max_uses is 0 (unlimited) to {_MOST_USES}")
        await self._may_invite(actor_id, group_id)
        invite = Invite(
            secrets.token_urlsafe(16), group_id, _now_ms() + (ttl or most) * 1000, max_uses
        )
        await self.users.add_invite(invite, actor_id, self.settings.max_invites_per_group)
        return invite

    async def join(self, user_id: int, group_id: int, invite: str = "") -> tuple[Group, bool]:
        """The user joins: ``(group, False)``; or, in an invite-only group without an
        invite, a join request is recorded: ``(group, True)``."""
        group = await self._group(group_id)
        me = await self.users.member(group_id, user_id)
        if me is not None:
            return dataclasses.replace(group, role=me.role), False
        if await self.users.is_banned(group_id, user_id):
            raise RequestError(codes.BANNED, f"you are banned from group {group_id}")
        if invite:
            # What would refuse the join is checked before a use is spent (but a group
            # that fills meanwhile: that use is gone).
            await self.im.check_group_count(user_id, group_id)
            if not await self.users.use_invite(invite, group_id, _now_ms()):
                raise RequestError(codes.BAD_INVITE, "the invite is unknown, expired or used up")
        elif group.invite_only:
            await self.im.check_group_count(user_id, group_id)
            most = self.settings.max_join_requests_per_group
            if await self.users.add_join_request(group_id, user_id, _now_ms(), most):
                await self._tell_admins(group_id, "join_requested", user_id)
            return group, True
        return await self.add(group_id, user_id, user_id), False

    async def add_member(self, actor_id: int, group_id: int, user_id: int) -> Group:
        """Add a user directly (an invite in an invite-only group: admins and owner)."""
        await self._may_invite(actor_id, group_id)
        await self._user(user_id)
        if await self.users.member(group_id, user_id) is not None:
            return await self._group(group_id)
        return await self.add(group_id, user_id, actor_id)

    async def join_requests(self, actor_id: int, group_id: int) -> list[dict[str, object]]:
        await self._moderator(actor_id, group_id)
        # No more than the answer may carry, should the limit have been lowered since.
        waiting = (await self.users.join_requests(group_id))[
            : self.settings.max_join_requests_per_group
        ]
        users = await self.users.get_users(u for u, _ in waiting)
        return [
            {"user_id": u, "name": users[u].name if u in users else "", "ts": ts}
            for u, ts in waiting
        ]

    async def answer_request(
        self, actor_id: int, group_id: int, user_id: int, approve: bool
    ) -> None:
        await self._moderator(actor_id, group_id)
        if all(u != user_id for u, _ in await self.users.join_requests(group_id)):
            raise RequestError(codes.NOT_FOUND, f"no join request of user {user_id}")
        if approve:
            # The join drops the request in its transaction: one that fails (a full
            # group) leaves it waiting.
            await self.add(group_id, user_id, actor_id)
        else:
            await self.users.drop_join_request(group_id, user_id)

    # -- the store's join and leave paths, with their events ----------------------------------

    async def add(self, group_id: int, user_id: int, by_id: int) -> Group:
        """Put the user in the group (``banned``, ``group_full`` refused) and tell it."""
        await self.im.check_group_count(user_id, group_id)
        before = await self.users.member(group_id, user_id)
        reason = "joined" if by_id == user_id else "added"
        group = await self.users.join_group(
            group_id, user_id, self.settings.max_group_size, reason=reason
        )
        if before is not None:
            return dataclasses.replace(group, role=before.role)
        await self.im.seed_group_start(user_id, group_id)
        await self.tell(group_id, "member_added", user_id, by_id)
        return dataclasses.replace(group, role=OWNER if group.owner_id == user_id else MEMBER)

    async def remove(self, group_id: int, user_id: int, reason: str) -> None:
        """Take the user out of the group (the store's leave path; ``reason`` goes to the
        webhook event: left, kicked, banned, removed)."""
        await self.users.leave_group(group_id, user_id, reason=reason)
        conv = conversation("group", user_id, group_id)
        for s in self.im.connections.local_sessions(user_id):
            device: DeviceState | None = s.data.get(DEVICE)
            if device is not None:
                device.forget(conv)

    async def remove_by_server(self, group_id: int, user_id: int) -> None:
        """The server API takes a member out (the owner too: the group passes on, as
        when an owner leaves) and tells the group."""
        await self.remove(group_id, user_id, "removed")
        await self.tell(group_id, "member_removed", user_id, 0, also=[user_id])

    # -- blocks -----------------------------------------------------------------------------

    async def block(self, user_id: int, other_id: int, block: bool = True) -> bool:
        """``user_id`` blocks (or unblocks) ``other_id``; whether anything changed."""
        if other_id == user_id:
            raise RequestError(codes.INVALID_PACKET, "you cannot block yourself")
        await self._user(other_id)
        return await self.users.set_block(
            user_id, other_id, block, self.settings.max_blocks_per_user
        )

    async def blocked(self, user_id: int) -> list[User]:
        """The users ``user_id`` blocks, by id."""
        mine = sorted((await self.users.blocks(user_id)).mine)[: self.settings.max_blocks_per_user]
        users = await self.users.get_users(mine)
        return [users[u] for u in mine if u in users]
