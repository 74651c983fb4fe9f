"""Message numbers (unread counts messages, not events): the numbering a batch gives."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bitchat.im.centers import Message, id_order, message_counts, number


@given(st.lists(st.booleans(), max_size=30), st.integers(0, 5), st.integers(0, 5))
def test_numbers_count_messages_and_events_carry_the_one_before(
    events: list[bool], seq0: int, no0: int
) -> None:
    no0 = min(no0, seq0)
    msgs = [
        Message(i + 1, "p2p", 1, "a", 2, "t", 0, op="edit" if e else "")
        for i, e in enumerate(events)
    ]
    convs = ["p:1:2"] * len(msgs)
    if not msgs:
        return
    counts = {"p:1:2": len(msgs)}
    n_msgs = message_counts(msgs, convs)
    number(
        msgs,
        convs,
        counts,
        {"p:1:2": seq0 + len(msgs)},
        id_order(msgs),
        {"p:1:2": no0 + n_msgs.get("p:1:2", 0)},
        n_msgs,
    )
    assert [m.seq for m in msgs] == list(range(seq0 + 1, seq0 + len(msgs) + 1))
    expected, no = [], no0
    for e in events:
        no += 0 if e else 1
        expected.append(no)
    assert [m.no for m in msgs] == expected
