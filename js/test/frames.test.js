// Frames and exact 64-bit ids, without a server.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { decodeFrame, encodeFrame, FLAGS, parseJSON, stringifyJSON, T } from '../../src/bitchat/web/static/bitchat.js';

test('a frame is the 14-byte header and its JSON body', () => {
  const frame = encodeFrame(T.SEND_P2P, 7, { to: 2, text: 'hé' }, FLAGS.RESPONSE);
  const body = new TextEncoder().encode('{"to":2,"text":"hé"}');
  assert.deepEqual([...frame.subarray(0, 14)], [0xbc, 1, 1, 2, 0, 110, 0, 0, 0, 7, 0, 0, 0, body.length]);
  const back = decodeFrame(frame);
  assert.deepEqual(back, { flags: FLAGS.RESPONSE, type: T.SEND_P2P, requestId: 7, body: { to: 2, text: 'hé' } });
  // A view into a larger buffer (Node's Buffer) decodes the same.
  const padded = new Uint8Array(frame.length + 3);
  padded.set(frame, 3);
  assert.deepEqual(decodeFrame(padded.subarray(3)), back);
});

test('a message that is not exactly one frame is refused', () => {
  const frame = encodeFrame(T.PING, 0, {});
  assert.throws(() => decodeFrame(frame.subarray(0, frame.length - 1)), /one frame/);
  const bad = frame.slice();
  bad[0] = 0;
  assert.throws(() => decodeFrame(bad), /not a bitchat frame/);
});

test('integers past 2^53 stay exact both ways', () => {
  const text = '{"msg_ids":[7318349398493184001,-9007199254740993,5],"s":"12345678901234567890","f":1.5e300}';
  const value = parseJSON(text);
  assert.deepEqual(value.msg_ids, [7318349398493184001n, -9007199254740993n, 5]);
  assert.equal(value.s, '12345678901234567890');
  assert.equal(value.f, 1.5e300);
  assert.equal(stringifyJSON(value), text.replace('1.5e300', '1.5e+300'));
  assert.equal(stringifyJSON({ t: 'a "\\" b', n: 2n ** 63n - 1n }), '{"t":"a \\"\\\\\\" b","n":9223372036854775807}');
});
