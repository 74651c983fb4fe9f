// bitchat.js's moderation calls against a real bitchat server: roles, kick, ban, mute, group
// options, invites, join requests, direct adds, blocks, and the groupEvent pushes.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { next, refused, sharedServer } from '../support.js';

const env = sharedServer();
const { signIn } = env;

const roles = async (client, groupId) => Object.fromEntries(
  (await client.groupMembers(groupId)).members.map((m) => [m.name, m.role]));

test('roles, kick, ban, mute, and the groupEvents that tell of them', async () => {
  const { client: owner, id: ownerId } = await signIn('olga');
  const { client: ann, id: annId } = await signIn('ann');
  const { client: max, id: maxId } = await signIn('max');
  const g = await owner.createGroup('crew');
  assert.equal(g.role, 'owner');
  assert.equal(g.invite_only, false);
  const joined = await ann.joinGroup(g.group_id);
  assert.deepEqual([joined.role, joined.pending], ['member', false]);
  await max.joinGroup(g.group_id);
  assert.deepEqual(await roles(ann, g.group_id), { olga: 'owner', ann: 'member', max: 'member' });
  assert.equal((await owner.myGroups()).groups[0].role, 'owner');

  // Only the owner sets roles; the others hear of it.
  assert.equal(await refused(ann.setRole({ group_id: g.group_id, user_id: maxId, role: 'admin' })), 'forbidden');
  const promoted = next(max, 'groupEvent', (e) => e.event === 'role');
  await owner.setRole({ group_id: g.group_id, user_id: annId, role: 'admin' });
  const e = await promoted;
  assert.deepEqual([e.group_id, e.user_id, e.by_id, e.role], [g.group_id, annId, ownerId, 'admin']);
  assert.equal((await roles(max, g.group_id)).ann, 'admin');

  // An admin mutes a member: their group messages are refused until unmuted.
  const muted = next(max, 'groupEvent', (x) => x.event === 'muted');
  await ann.mute({ group_id: g.group_id, user_id: maxId, seconds: 600 });
  const m = await muted;
  assert.equal(m.user_id, maxId);
  assert.ok(m.until > Date.now());
  const row = (await owner.groupMembers(g.group_id)).members.find((x) => x.id === maxId);
  assert.equal(row.muted_until, m.until);
  assert.equal(await refused(max.sendGroup({ group_id: g.group_id, text: 'hello?', retries: 0 })), 'muted');
  await ann.mute({ group_id: g.group_id, user_id: maxId, seconds: 0 });
  await max.sendGroup({ group_id: g.group_id, text: 'hello again' });
  // An admin cannot act on the owner.
  assert.equal(await refused(ann.kick({ group_id: g.group_id, user_id: ownerId })), 'forbidden');

  // A kick: the kicked user is told; they may join again.
  const kicked = next(max, 'groupEvent', (x) => x.event === 'kicked');
  await ann.kick({ group_id: g.group_id, user_id: maxId });
  const k = await kicked;
  assert.deepEqual([k.user_id, k.user_name, k.by_id, k.by_name], [maxId, 'max', annId, 'ann']);
  assert.equal(await refused(max.groupMembers(g.group_id)), 'not_member');
  await max.joinGroup(g.group_id);

  // A ban: out, and no way back until it is lifted.
  const banned = next(max, 'groupEvent', (x) => x.event === 'banned');
  await owner.ban({ group_id: g.group_id, user_id: maxId });
  assert.equal((await banned).user_id, maxId);
  assert.equal(await refused(max.joinGroup(g.group_id)), 'banned');
  await owner.unban({ group_id: g.group_id, user_id: maxId });
  await max.joinGroup(g.group_id);
  assert.equal((await roles(owner, g.group_id)).max, 'member');
});

test('invite-only groups: options, invite codes, join requests, direct adds', async () => {
  const { client: owner } = await signIn('otto');
  const { client: eve, id: eveId } = await signIn('eve');
  const { client: kim, id: kimId } = await signIn('kim');
  const { client: lou, id: louId } = await signIn('lou');
  const g = await owner.createGroup('club');
  const info = await owner.setGroupOptions({ group_id: g.group_id, invite_only: true });
  assert.deepEqual([info.invite_only, info.history_visible], [true, false]);
  // Options left out stay as they are.
  const same = await owner.setGroupOptions({ group_id: g.group_id, history_visible: true });
  assert.deepEqual([same.invite_only, same.history_visible], [true, true]);

  // A join without an invite is a request, which the admins hear of.
  const asked = next(owner, 'groupEvent', (e) => e.event === 'join_requested');
  const pending = await eve.joinGroup(g.group_id);
  assert.equal(pending.pending, true);
  assert.equal((await asked).user_id, eveId);
  const { requests } = await owner.joinRequests(g.group_id);
  assert.deepEqual(requests.map((r) => [r.user_id, r.name]), [[eveId, 'eve']]);
  assert.equal(await refused(eve.joinRequests(g.group_id)), 'not_member'); // only asked to join
  const added = next(eve, 'groupEvent', (e) => e.event === 'member_added' && e.user_id === eveId);
  await owner.answerJoinRequest({ group_id: g.group_id, user_id: eveId, approve: true });
  await added;
  assert.equal((await eve.myGroups()).groups[0].id, g.group_id);
  assert.deepEqual((await owner.joinRequests(g.group_id)).requests, []);

  // An invite code lets its holder in; a made-up one does not; a plain member may not make one.
  const invite = await owner.createInvite({ group_id: g.group_id, max_uses: 1 });
  assert.equal(invite.group_id, g.group_id);
  assert.ok(invite.code && invite.expires_at > Date.now());
  assert.equal(await refused(kim.joinGroup(g.group_id, `${invite.code}x`)), 'bad_invite');
  const joined = await kim.joinGroup(g.group_id, invite.code);
  assert.deepEqual([joined.pending, joined.role], [false, 'member']);
  assert.equal(await refused(kim.createInvite({ group_id: g.group_id })), 'forbidden');

  // Only admins add users directly to an invite-only group.
  assert.equal(await refused(kim.addMember({ group_id: g.group_id, user_id: louId })), 'forbidden');
  await owner.addMember({ group_id: g.group_id, user_id: louId });
  const names = (await lou.groupMembers(g.group_id)).members.map((m) => m.id);
  assert.ok(names.includes(louId) && names.includes(kimId));
});

test('blocks: no messages either way, the list, unblock', async () => {
  const { client: ida, id: idaId } = await signIn('ida');
  const { client: joe, id: joeId } = await signIn('joe');
  await ida.block(joeId);
  assert.deepEqual((await ida.blocked()).users, [{ id: joeId, name: 'joe' }]);
  assert.equal(await refused(joe.sendP2P({ to: idaId, text: 'hi', retries: 0 })), 'blocked');
  assert.equal(await refused(ida.sendP2P({ to: joeId, text: 'hi', retries: 0 })), 'blocked');
  await ida.unblock(joeId);
  assert.deepEqual((await ida.blocked()).users, []);
  const got = next(ida, 'message');
  await joe.sendP2P({ to: idaId, text: 'friends again' });
  assert.equal((await got).text, 'friends again');
});
