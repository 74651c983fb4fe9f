"""The IM layer: packets, the three centers, the service and the client functions."""

from bitchat.im.centers import ConnectionCenter, Group, Message, MessageCenter, User, UserCenter
from bitchat.im.packets import ChatMessage, Presence

__all__ = [
    "ChatMessage",
    "ConnectionCenter",
    "Group",
    "Message",
    "MessageCenter",
    "Presence",
    "User",
    "UserCenter",
]
