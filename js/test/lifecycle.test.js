// bitchat.js's calls for messages that live, against a real bitchat server: edit (and the
// sender's versions), recall, reactions, replies, mentions, delete for me, typed sends; and
// the `edit`, `recall`, `reaction` and `hidden` events they push.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { WebSocket } from 'ws';

import { BitchatClient } from '../../src/bitchat/web/static/bitchat.js';
import { next, refused, sharedServer } from '../support.js';

const env = sharedServer();
const { signIn } = env;

const same = (a, b) => String(a) === String(b);

test('edit, versions, reactions, a reply, a recall: each pushed as its event', async () => {
  const { client: alice, id: aliceId } = await signIn('alice');
  const { client: bob, id: bobId } = await signIn('bob');
  const got = next(bob, 'message');
  const sent = await alice.sendP2P({ to: bobId, text: 'lunch at noo' });
  const m = await got;
  assert.equal(m.op ?? '', '');
  assert.equal(m.no, 1);

  // An edit: bob's `edit` event carries the new text; the sender keeps the old one.
  const edited = next(bob, 'edit');
  const editAck = await alice.edit(sent.msg_id, 'lunch at noon');
  assert.ok(editAck.seq > sent.seq, 'an event takes the next seq');
  const e = await edited;
  assert.ok(same(e.target, sent.msg_id));
  assert.deepEqual([e.op, e.text, e.sender_id], ['edit', 'lunch at noon', aliceId]);
  assert.ok(e.edited_at > 0);
  const { versions } = await alice.versions(sent.msg_id);
  assert.deepEqual(versions.map((v) => v.text), ['lunch at noo']);
  assert.equal(await refused(bob.versions(sent.msg_id)), 'forbidden');
  assert.equal(await refused(bob.edit(sent.msg_id, 'mine now')), 'forbidden');

  // Reactions: on, the list by name, off; alice's client hears each as a `reaction`.
  const reacted = next(alice, 'reaction', (x) => x.op === 'react');
  await bob.react(sent.msg_id, '👍');
  const r = await reacted;
  assert.deepEqual([r.emoji, r.sender_id], ['👍', bobId]);
  assert.ok(same(r.target, sent.msg_id));
  const list = await alice.reactions(sent.msg_id);
  assert.deepEqual(list.reactions, [{ emoji: '👍', users: [{ id: bobId, name: 'bob' }] }]);
  const unreacted = next(alice, 'reaction', (x) => x.op === 'unreact');
  await bob.unreact(sent.msg_id, '👍');
  assert.equal((await unreacted).emoji, '👍');
  assert.deepEqual((await alice.reactions(sent.msg_id)).reactions, []);
  await bob.react(sent.msg_id, '🎉');

  // A reply quotes the message as it is now.
  const replied = next(alice, 'message');
  const reply = await bob.sendP2P({ to: aliceId, text: 'see you', reply_to: sent.msg_id });
  const q = await replied;
  assert.ok(same(q.reply_to, sent.msg_id));
  assert.deepEqual([q.reply.sender_id, q.reply.sender_name, q.reply.snippet, q.reply.recalled],
    [aliceId, 'alice', 'lunch at noon', false]);

  // History has the current text, the reactions and the quote; the events are not messages.
  let page = await bob.history({ peer_id: aliceId, limit: 10 });
  const byId = (p, id) => p.messages.find((x) => same(x.msg_id, id));
  assert.equal(byId(page, sent.msg_id).text, 'lunch at noon');
  assert.ok(byId(page, sent.msg_id).edited_at > 0);
  assert.deepEqual(byId(page, sent.msg_id).reactions, { '🎉': [bobId] });
  assert.equal(byId(page, reply.msg_id).reply.snippet, 'lunch at noon');

  // A recall: bob's `recall` event; the text is gone, the quote says so.
  assert.equal(await refused(bob.recall(sent.msg_id)), 'forbidden');
  const recalled = next(bob, 'recall');
  await alice.recall(sent.msg_id);
  assert.ok(same((await recalled).target, sent.msg_id));
  page = await bob.history({ peer_id: aliceId, limit: 10 });
  assert.deepEqual([byId(page, sent.msg_id).recalled, byId(page, sent.msg_id).text], [true, '']);
  assert.equal(byId(page, reply.msg_id).reply.recalled, true);
  assert.equal(await refused(alice.edit(sent.msg_id, 'again')), 'recalled');
  assert.equal(await refused(bob.react(sent.msg_id, '👍')), 'recalled');
  // Unread counts messages, not events: bob's reply read the conversation; alice's edit,
  // reaction and recall since are no unread messages.
  const conv = (await bob.conversations()).conversations.find((c) => c.peer_id === aliceId);
  assert.equal(conv.unread, 0);
});

test('delete for me: gone from my history, my other device told; the other user keeps it', async () => {
  const { client: cleo, id: cleoId } = await signIn('cleo');
  const { client: dan, id: danId } = await signIn('dan');
  const dan2 = new BitchatClient(env.server.url, { WebSocket });
  env.clients.push(dan2);
  await dan2.login({ name: 'dan', password: 'pw-dan' });
  const sent = await cleo.sendP2P({ to: danId, text: 'a secret' });
  const hidden = next(dan2, 'hidden');
  await dan.deleteForMe([sent.msg_id]);
  assert.ok((await hidden).msg_ids.some((id) => same(id, sent.msg_id)));
  assert.equal((await dan.history({ peer_id: cleoId })).messages.length, 0);
  assert.equal((await cleo.history({ peer_id: danId })).messages.length, 1);
});

test('mentions in a group; typed sends are checked', async () => {
  const { client: eve } = await signIn('eve');
  const { client: finn, id: finnId } = await signIn('finn');
  const g = await eve.createGroup('crew');
  await finn.joinGroup(g.group_id);
  const got = next(finn, 'message', (x) => x.kind === 'group');
  await eve.sendGroup({ group_id: g.group_id, text: 'ping @finn, and @nobody' });
  assert.deepEqual((await got).mentions, [finnId]);
  const conv = (await finn.conversations()).conversations.find((c) => c.group_id === g.group_id);
  assert.deepEqual([conv.unread, conv.mentions], [1, 1]);
  await finn.markRead({ group_id: g.group_id });
  const after = (await finn.conversations()).conversations.find((c) => c.group_id === g.group_id);
  assert.deepEqual([after.unread, after.mentions], [0, 0]);

  assert.equal(await refused(eve.sendGroup({ group_id: g.group_id, text: 'x', type: 'no-such-type', retries: 0 })),
    'bad_type');
});
