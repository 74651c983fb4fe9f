// A real bitchat server as a subprocess (this tree's code), and waits with a timeout.

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { delimiter, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import assert from 'node:assert/strict';
import { after, before } from 'node:test';
import { WebSocket } from 'ws';

import { connect } from '../src/bitchat/web/static/bitchat.js';

const here = dirname(fileURLToPath(import.meta.url));
export const SRC = join(here, '..', 'src');
export const SDK = join(SRC, 'bitchat', 'web', 'static', 'bitchat.js');
// A cold interpreter start, imports, database setup; scaled as the Python suite's waits.
export const WAIT_MS = 15000 * Number(process.env.BITCHAT_TEST_TIMEOUT_FACTOR || '1');
// The interpreter that runs the server (the pytest wrapper passes its own); BITCHAT_TEST_*
// variables are the ones the server's settings let through.
const PYTHON = process.env.BITCHAT_TEST_PYTHON || 'python3';

/** The HS256 secret the test servers take JWT logins with. */
export const JWT_SECRET = 'a-test-secret-of-at-least-32-bytes!';

/** The server API key a Server started with `['--admin-token', ADMIN_TOKEN]` takes. */
export const ADMIN_TOKEN = 'a-test-admin-token-of-some-length';

/** An HS256 JWT for `claims`, as a product's backend would sign it. */
export function signJwt(claims, secret = JWT_SECRET) {
  const part = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const head = `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}`;
  return `${head}.${createHmac('sha256', secret).update(head).digest('base64url')}`;
}

// Cheap password hashing, as the Python tests (tests/im_helpers.py FAST_HASH); no rate limit.
const FAST = ['--password-hash-time-cost', '1', '--password-hash-memory-kib', '8', '--rate-limit', '0',
  '--shutdown-grace', '1', '--jwt-secret', JWT_SECRET];

/** A bitchat server in a temporary data folder; `restart()` keeps the folder and the port. */
export class Server {
  /** @param {string[]} [args] more `bitchat server` options (e.g. `['--admin-token', ADMIN_TOKEN]`) */
  constructor(args = []) {
    this.dataDir = mkdtempSync(join(tmpdir(), 'bitchat-js-'));
    this.args = args;
    this.port = 0;
    this.proc = null;
    this.log = '';
  }

  get url() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  /** The server API's base URL (README "The server API"). */
  get api() {
    return `http://127.0.0.1:${this.port}/api/v1`;
  }

  /**
   * One server API call with the admin token; resolves to the parsed JSON answer.
   * @param {string} method @param {string} path @param {object} [body]
   */
  async call(method, path, body) {
    const res = await fetch(`${this.api}${path}`, {
      method,
      headers: { Authorization: `Bearer ${ADMIN_TOKEN}`, 'Content-Type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const answer = await res.json();
    if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${JSON.stringify(answer)}`);
    return answer;
  }

  // Starts it and waits for "bitchat server started on 127.0.0.1:PORT" on stderr.
  start() {
    const env = { ...process.env, PYTHONUNBUFFERED: '1' };
    env.PYTHONPATH = env.PYTHONPATH ? `${SRC}${delimiter}${env.PYTHONPATH}` : SRC;
    const proc = spawn(PYTHON, ['-m', 'bitchat', 'server', '--host', '127.0.0.1',
      '--port', String(this.port), '--data-dir', this.dataDir, ...FAST, ...this.args],
    { env, stdio: ['ignore', 'ignore', 'pipe'] });
    this.proc = proc;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => fail(new Error(`the server did not start:\n${this.log}`)), WAIT_MS);
      const fail = (err) => { clearTimeout(timer); proc.kill('SIGKILL'); reject(err); };
      proc.on('exit', (code) => fail(new Error(`the server exited (${code}):\n${this.log}`)));
      proc.stderr.setEncoding('utf8');
      proc.stderr.on('data', (chunk) => {
        this.log += chunk;
        const m = /bitchat server started on 127\.0\.0\.1:(\d+)/.exec(this.log);
        if (m) {
          clearTimeout(timer);
          this.port = Number(m[1]);
          resolve(this);
        }
      });
    });
  }

  // SIGTERM, and wait for a clean exit.
  stop() {
    const proc = this.proc;
    this.proc = null;
    if (!proc || proc.exitCode !== null) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => { proc.kill('SIGKILL'); reject(new Error('the server did not stop')); }, WAIT_MS);
      proc.removeAllListeners('exit');
      proc.on('exit', (code) => {
        clearTimeout(timer);
        if (code === 0) resolve();
        else reject(new Error(`the server stopped with ${code}:\n${this.log}`));
      });
      proc.kill('SIGTERM');
    });
  }

  async restart() {
    await this.stop();
    this.log = '';
    await this.start();
  }

  async close() {
    try {
      await this.stop();
    } finally {
      rmSync(this.dataDir, { recursive: true, force: true });
    }
  }
}

/**
 * The next `event` of `client` whose arguments pass `test`, within WAIT_MS.
 * @returns {Promise<any>} the event's first argument
 */
export function next(client, event, test = () => true, ms = WAIT_MS) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { off(); reject(new Error(`no ${event} within ${ms} ms`)); }, ms);
    const off = client.on(event, (...args) => {
      if (!test(...args)) return;
      clearTimeout(timer);
      off();
      resolve(args[0]);
    });
  });
}

/**
 * One server for a whole test file: started before its tests, closed after them with
 * every client signed in through it. `signIn(name)` connects and logs in (registering
 * the name): `{client, id}`.
 */
export function sharedServer() {
  const env = {
    server: null,
    clients: [],
    async signIn(name) {
      const client = await connect(env.server.url, { WebSocket });
      env.clients.push(client);
      const ok = await client.login({ name, password: `pw-${name}` });
      return { client, id: ok.user_id };
    },
  };
  before(async () => {
    env.server = await new Server().start();
  });
  after(async () => {
    for (const c of env.clients) c.close();
    await env.server?.close();
  });
  return env;
}

/** The RequestFailed code of a call that must be refused. */
export async function refused(promise) {
  try {
    await promise;
  } catch (err) {
    return err.code;
  }
  assert.fail('the server accepted it');
}
