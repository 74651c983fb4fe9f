// The README's Node example, word for word but its imports and port, against a real server.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { WebSocket } from 'ws';

import { connect } from '../../src/bitchat/web/static/bitchat.js';
import { next, Server, SRC } from '../support.js';

function readmeExample() {
  const readme = readFileSync(join(SRC, '..', 'README.md'), 'utf8');
  const section = readme.split('Node.js 20 has no global `WebSocket`')[1];
  const code = /```js\n([\s\S]*?)```/.exec(section)[1];
  assert.match(code, /^import \{ WebSocket \} from 'ws';\nimport \{ connect \} from '.\/bitchat.js';\n/);
  assert.ok(code.split('\n').filter((line) => line && !line.startsWith('import ')).length <= 10);
  return code;
}

test("the README's Node example logs in, sends to user 2 and closes", async () => {
  const code = readmeExample();
  const server = await new Server().start();
  const clients = [];
  try {
    const users = [];
    for (const name of ['ann', 'bo']) {
      const client = await connect(server.url, { WebSocket });
      clients.push(client);
      users.push(await client.login({ name, password: `pw-${name}` }));
    }
    assert.equal(users[1].user_id, 2);
    const got = next(clients[1], 'message');

    const lines = [];
    const body = code.replace(/^import .*\n/gm, '').replace('ws://127.0.0.1:8864/ws', server.url);
    const AsyncFunction = (async () => {}).constructor;
    const run = new AsyncFunction('connect', 'WebSocket', 'console', body);
    await run(connect, WebSocket, { log: (line) => lines.push(String(line)) });

    const m = await got;
    assert.deepEqual([m.sender_name, m.text], ['gris', 'hello']);
    assert.deepEqual(lines, [`user ${m.sender_id} sent message ${m.msg_id} (seq 1)`]);
  } finally {
    for (const c of clients) c.close();
    await server.close();
  }
});
