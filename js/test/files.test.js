// bitchat.js's files calls against a real bitchat server: upload with the login token, the
// uploader downloads it back, another user may not (no message refers to it), a claim the
// bytes do not match is refused.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { fileFields } from '../../src/bitchat/web/static/bitchat.js';
import { refused, sharedServer } from '../support.js';

// A 1x1 PNG.
const PNG = Buffer.from('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==', 'base64');

const env = sharedServer();
const { signIn } = env;

test('upload, download by the uploader, refused to others and for a false type', async () => {
  const { client: gus } = await signIn('gus');
  const { client: hal } = await signIn('hal');
  assert.equal(gus.filesUrl, `http://127.0.0.1:${env.server.port}/api/v1/files`);
  const info = await gus.upload(new Blob([PNG], { type: 'image/png' }), { name: 'dot.png' });
  assert.deepEqual([info.name, info.size, info.content_type, info.width, info.height],
    ['dot.png', PNG.length, 'image/png', 1, 1]);
  assert.deepEqual(fileFields(info), {
    file_id: info.file_id, name: 'dot.png', size: PNG.length, content_type: 'image/png', width: 1, height: 1,
  });
  const back = Buffer.from(await (await gus.download(info.file_id)).arrayBuffer());
  assert.deepEqual(back, PNG);
  assert.equal(await refused(hal.download(info.file_id)), 'forbidden');
  assert.equal(await refused(gus.download('no-such-file')), 'not_found');
  const text = await refused(gus.upload(new TextEncoder().encode('not a picture'), { name: 'x.png', contentType: 'image/png' }));
  assert.equal(text, 'bad_content_type');
});
