// bitchat.js when the server ends a session for good: the server API's logout and ban
// (README "The server API") close every connection of the user with an Error push
// (`logged_out`, `banned`); the client then stops, says why, and does not log in again.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { WebSocket } from 'ws';

import { connect, decodeFrame, T } from '../../src/bitchat/web/static/bitchat.js';
import { ADMIN_TOKEN, next, Server } from '../support.js';

const FAST_RECONNECT = { reconnectInitialMs: 20, reconnectMaxMs: 50 };
let server;
const clients = [];

before(async () => {
  server = await new Server(['--admin-token', ADMIN_TOKEN]).start();
});

after(async () => {
  for (const c of clients) c.close();
  await server?.close();
});

// A `ws` WebSocket class that counts the Login frames the SDK sends.
function countingLogins() {
  const logins = [];
  class Counting extends WebSocket {
    send(data, ...rest) {
      const frame = decodeFrame(data);
      if (frame.type === T.LOGIN) logins.push(frame.body);
      super.send(data, ...rest);
    }
  }
  return { Counting, logins };
}

async function signIn(name, WebSocketClass = WebSocket) {
  const client = await connect(server.url, { WebSocket: WebSocketClass, ...FAST_RECONNECT });
  clients.push(client);
  const ok = await client.login({ name, password: `pw-${name}` });
  return { client, ok };
}

test('logged out by the server API: every device stops, says why, and stays out', async () => {
  const { Counting, logins } = countingLogins();
  const { client: laptop, ok } = await signIn('lena', Counting);
  const { client: phone } = await signIn('lena', Counting);
  assert.equal(logins.length, 2);
  const outLaptop = next(laptop, 'loggedOut');
  const outPhone = next(phone, 'loggedOut');
  const answer = await server.call('POST', `/users/${ok.user_id}/logout`);
  assert.equal(answer.ok, true);
  for (const told of [await outLaptop, await outPhone]) assert.equal(told.code, 'logged_out');
  for (const c of [laptop, phone]) {
    assert.equal(c.closed, true);
    assert.equal(c.token, '');
    assert.equal(c.retryTimer, undefined, 'no reconnect is scheduled');
  }
  assert.equal(logins.length, 2, 'no Login after the forced logout');
  // A send now fails at once rather than waiting for a reconnect.
  await assert.rejects(laptop.sendP2P({ to: ok.user_id, text: 'still here?' }), { code: 'closed' });
  // The user may sign in again by hand.
  const { ok: again } = await signIn('lena');
  assert.equal(again.user_id, ok.user_id);
});

test('banned by the server API: the client stops with `banned`; a new login is refused', async () => {
  const { Counting, logins } = countingLogins();
  const { client, ok } = await signIn('boris', Counting);
  const out = next(client, 'loggedOut');
  await server.call('POST', `/users/${ok.user_id}/ban`);
  assert.equal((await out).code, 'banned');
  assert.equal(client.closed, true);
  assert.equal(client.retryTimer, undefined);
  assert.equal(logins.length, 1);
  const other = await connect(server.url, { WebSocket });
  clients.push(other);
  await assert.rejects(other.login({ name: 'boris', password: 'pw-boris' }), { code: 'banned' });
});

test('a plain drop still reconnects (only a forced logout stops the client)', async () => {
  const { client, ok } = await signIn('dora');
  const back = next(client, 'login');
  client.link.ws.terminate();
  assert.equal((await back).user_id, ok.user_id);
  assert.equal(client.closed, false);
});
