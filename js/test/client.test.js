// bitchat.js against a real bitchat server: two users, a second device, a restart.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { WebSocket } from 'ws';

import { BitchatClient, connect, decodeFrame, T } from '../../src/bitchat/web/static/bitchat.js';
import { next, Server, signJwt, WAIT_MS } from '../support.js';

const FAST_RECONNECT = { reconnectInitialMs: 50, reconnectMaxMs: 200 };
let server;
const clients = [];

before(async () => {
  server = await new Server().start();
});

after(async () => {
  for (const c of clients) c.close();
  await server?.close();
});

async function signIn(name, options = {}) {
  const client = await connect(server.url, { WebSocket, ...options });
  clients.push(client);
  const ok = await client.login({ name, password: `pw-${name}` });
  return { client, ok };
}

test('send, receive, ack, history, conversations, read state, receipts, typing', async () => {
  const { client: alice, ok: aliceOk } = await signIn('alice');
  const { client: bob, ok: bobOk } = await signIn('bob');
  assert.ok(aliceOk.token && aliceOk.device, 'a password login names a device and gives a token');

  // A p2p message: stored (SendAck), pushed to bob, acked by bob's client (a delivered Receipt).
  const pushed = next(bob, 'message');
  const delivered = next(alice, 'receipt', (r) => r.kind === 'delivered');
  const ack = await alice.sendP2P({ to: bobOk.user_id, text: 'hello bob' });
  assert.equal(ack.seq, 1);
  assert.equal(ack.duplicate, false);
  const m = await pushed;
  assert.equal(String(m.msg_id), String(ack.msg_id)); // exact, though past 2^53
  assert.equal(typeof ack.msg_id, Number.isSafeInteger(Number(ack.msg_id)) ? 'number' : 'bigint');
  assert.deepEqual([m.kind, m.sender_id, m.sender_name, m.to, m.text, m.seq],
    ['p2p', aliceOk.user_id, 'alice', bobOk.user_id, 'hello bob', 1]);
  const receipt = await delivered;
  assert.deepEqual([receipt.user_id, receipt.seq, receipt.group_id], [bobOk.user_id, 1, 0]);

  // The same client_msg_id again is the same stored message.
  const again = await alice.sendP2P({ to: bobOk.user_id, text: 'hello bob', client_msg_id: ack.client_msg_id });
  assert.equal(again.duplicate, true);
  assert.equal(String(again.msg_id), String(ack.msg_id));

  const page = await bob.history({ peer_id: aliceOk.user_id, limit: 10 });
  assert.equal(page.more, false);
  assert.deepEqual(page.messages.map((x) => [String(x.msg_id), x.text]), [[String(ack.msg_id), 'hello bob']]);

  const list = await bob.conversations({ limit: 10 });
  assert.equal(list.conversations.length, 1);
  const conv = list.conversations[0];
  assert.deepEqual([conv.kind, conv.peer_id, conv.name, conv.last_seq, conv.unread],
    ['p2p', aliceOk.user_id, 'alice', 1, 1]);
  assert.equal(String(conv.last_message.msg_id), String(ack.msg_id));

  // bob reads on one device: his other device is told, and alice gets a read Receipt.
  const bob2 = new BitchatClient(server.url, { WebSocket });
  clients.push(bob2);
  const bob2Ok = await bob2.login({ name: 'bob', password: 'pw-bob' });
  assert.notEqual(bob2Ok.device, bobOk.device);
  const otherDevice = next(bob2, 'readState');
  const read = next(alice, 'receipt', (r) => r.kind === 'read');
  const state = await bob.markRead({ peer_id: aliceOk.user_id });
  assert.deepEqual([state.peer_id, state.read_seq, state.unread], [aliceOk.user_id, 1, 0]);
  const pushedState = await otherDevice;
  assert.deepEqual([pushedState.peer_id, pushedState.read_seq, pushedState.unread], [aliceOk.user_id, 1, 0]);
  const readReceipt = await read;
  assert.deepEqual([readReceipt.user_id, readReceipt.name, readReceipt.seq], [bobOk.user_id, 'bob', 1]);
  assert.equal((await bob.conversations()).conversations[0].unread, 0);
  assert.equal((await alice.conversations()).conversations[0].peer_read_seq, 1);

  // Typing: alice types, both of bob's devices see it; then she stops.
  const typing = next(bob, 'typing', (e) => e.typing);
  alice.typing({ to: bobOk.user_id });
  const e = await typing;
  assert.deepEqual([e.user_id, e.name, e.group_id], [aliceOk.user_id, 'alice', 0]);
  assert.ok(e.expires_in > 0);
  const stopped = next(bob2, 'typing', (x) => !x.typing);
  alice.typing({ to: bobOk.user_id, typing: false });
  assert.equal((await stopped).user_id, aliceOk.user_id);
});

test('groups: send, push, receipts; presence', async () => {
  const { client: carol } = await signIn('carol');
  const online = await carol.listOnline(true);
  assert.ok(online.users.some((u) => u.name === 'carol'));
  const arrives = next(carol, 'presence', (p) => p.name === 'dave');
  const { client: dave, ok: daveOk } = await signIn('dave');
  const presence = await arrives;
  assert.deepEqual([presence.user_id, presence.online], [daveOk.user_id, true]);
  const group = await carol.createGroup('walkers');
  await dave.joinGroup(group.group_id);
  const pushed = next(dave, 'message', (m) => m.kind === 'group');
  const ack = await carol.sendGroup({ group_id: group.group_id, text: 'walk at 6?' });
  const m = await pushed;
  assert.deepEqual([String(m.msg_id), m.to, m.text], [String(ack.msg_id), group.group_id, 'walk at 6?']);
  const read = next(carol, 'receipt', (r) => r.kind === 'read' && r.group_id === group.group_id);
  await dave.markRead({ group_id: group.group_id });
  assert.equal((await read).user_id, daveOk.user_id);
  const counts = await carol.receipts({ group_id: group.group_id, seq: ack.seq, who: true });
  assert.equal(counts.read, 1);
  assert.deepEqual(counts.readers.map((r) => [r.id, r.read]), [[daveOk.user_id, true]]);
});

test('after a server restart: reconnect, log in with the token, resend, missed messages pushed', async () => {
  const { client: erin, ok: erinOk } = await signIn('erin', FAST_RECONNECT);
  // frank reconnects only when told (a long backoff), so erin's message is one he missed.
  const { client: frank, ok: frankOk } = await signIn('frank', { reconnectInitialMs: 600000, reconnectMaxMs: 600000 });
  const erinDown = next(erin, 'disconnect');
  const frankDown = next(frank, 'disconnect');
  await server.stop();
  await Promise.all([erinDown, frankDown]);

  // Sent while the server is down: it waits for the reconnect and goes then.
  const erinBack = next(erin, 'login');
  const sending = erin.sendP2P({ to: frankOk.user_id, text: 'while you were away' });
  await server.start();
  const relogin = await erinBack;
  assert.deepEqual([relogin.user_id, relogin.device], [erinOk.user_id, erinOk.device]);
  const ack = await sending;
  assert.equal(ack.duplicate, false);
  assert.equal(erin.reconnects, 1);

  const pushed = next(frank, 'message');
  const delivered = next(erin, 'receipt', (r) => r.kind === 'delivered' && r.seq === ack.seq);
  const frankBack = next(frank, 'login');
  await frank.reconnect();
  const ok = await frankBack;
  assert.deepEqual([ok.user_id, ok.device, ok.pending], [frankOk.user_id, frankOk.device, 1]);
  const m = await pushed;
  assert.deepEqual([String(m.msg_id), m.text], [String(ack.msg_id), 'while you were away']);
  await delivered; // frank's client acked it
});

test('a login that fails rejects with the server code', async () => {
  await signIn('gina');
  const client = await connect(server.url, { WebSocket });
  clients.push(client);
  await assert.rejects(client.login({ name: 'gina', password: 'wrong' }), { code: 'login_failed' });
});

// The real `ws` client, keeping what the SDK sends and receives.
function recording() {
  const sent = [];
  const waiters = new Set();
  class Recording extends WebSocket {
    constructor(...args) {
      super(...args);
      this.on('message', (data) => {
        const frame = decodeFrame(data);
        for (const w of waiters) w(frame);
      });
    }

    send(data, ...rest) {
      sent.push(decodeFrame(data));
      super.send(data, ...rest);
    }
  }
  // The next frame received that passes `test`, within WAIT_MS.
  const receive = (test) => new Promise((resolve, reject) => {
    const timer = setTimeout(() => { waiters.delete(w); reject(new Error('no such frame')); }, WAIT_MS);
    const w = (frame) => {
      if (!test(frame)) return;
      clearTimeout(timer);
      waiters.delete(w);
      resolve(frame);
    };
    waiters.add(w);
  });
  return { Recording, sent, receive };
}

test('a JWT login, then reconnects with its token and the device; a heartbeat is answered', async () => {
  const { Recording, sent, receive } = recording();
  const jwt = signJwt({ sub: 'ext-hal', name: 'hal', exp: Math.floor(Date.now() / 1000) + 300 });
  const client = await connect(server.url, { WebSocket: Recording, jwt, heartbeatMs: 50 });
  clients.push(client);
  const ok = await client.login({});
  assert.equal(ok.name, 'hal');
  const logins = () => sent.filter((f) => f.type === T.LOGIN).map((f) => f.body);
  assert.deepEqual(logins(), [{ device: '', jwt }]);
  // A drop: the SDK logs in again with the token and the server's device name.
  const back = next(client, 'login');
  client.link.ws.terminate();
  assert.equal((await back).device, ok.device);
  assert.deepEqual(logins()[1], { token: ok.token, device: ok.device });
  // The same subject is the same user; a bad signature is refused and says why.
  const again = await connect(server.url, { WebSocket, jwt });
  clients.push(again);
  assert.equal((await again.login({})).user_id, ok.user_id);
  const forged = await connect(server.url, { WebSocket, jwt: signJwt({ sub: 'ext-hal', exp: 9e9 }, 'x'.repeat(32)) });
  clients.push(forged);
  await assert.rejects(forged.login({}), { code: 'login_failed' });
  // Pings go every heartbeatMs; the server answers each with a Pong.
  const pong = await receive((f) => f.type === T.PONG);
  assert.ok(pong.flags & 2); // a response
  assert.ok(sent.some((f) => f.type === T.PING));
});

test('logout revokes the token and stops reconnecting', async () => {
  const { client, ok } = await signIn('ivy', FAST_RECONNECT);
  await client.logout();
  assert.equal(client.connected, false);
  assert.equal(client.retryTimer, undefined);
  const again = await connect(server.url, { WebSocket });
  clients.push(again);
  await assert.rejects(again.login({ token: ok.token }), { code: 'login_failed' });
});

test('a server that goes silent is a dead link: closed, then reconnected', async () => {
  const { client } = await signIn('jo', { heartbeatMs: 50, deadAfterMs: 300, ...FAST_RECONNECT });
  const dead = next(client, 'disconnect');
  server.proc.kill('SIGSTOP'); // the socket stays open; nothing answers the Pings
  let closed;
  try {
    closed = await dead;
  } finally {
    server.proc.kill('SIGCONT');
  }
  assert.deepEqual(closed, { code: 4000, reason: 'heartbeat lost' });
  await next(client, 'login');
  assert.equal(client.connected, true);
});
