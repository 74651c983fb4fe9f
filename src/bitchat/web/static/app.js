// bitchat in the browser: the same binary protocol a TCP client speaks (DESIGN.md section 2),
// one frame per WebSocket message, with the JSON serializer, over /ws on the page's own port.
// The protocol (frames, exact 64-bit ids, requests, heartbeat) is bitchat.js, the JS SDK; the
// page keeps its own state, outbox and reconnect on top of its Link.

import { Link, RequestFailed, STAY_OUT, T, newClientMsgId } from './bitchat.js';

// The page's JSON and frames are the SDK's (the browser tests use them from here).
export { decodeFrame, encodeFrame, parseJSON, stringifyJSON } from './bitchat.js';

const HISTORY_PAGE = 50;
const GROUPING_MS = 5 * 60 * 1000;
const ACK_DELAY_MS = 25;
const ACK_MAX_IDS = 512; // ids per Ack: within the server's max_ack_ids (1024 by default)
const TYPING_EVERY_MS = 2500; // repeat "typing" while typing: within the server's typing_timeout
const CONVERSATIONS_PAGE = 50;
const CONVERSATIONS_MAX_PAGES = 400; // a bound on the sidebar's paging, whatever the server says
const READ_DELAY_MS = 50;            // MarkRead waits this long, so a burst of messages costs one
const DEVICE_KEY = 'bitchat.device'; // localStorage: this browser's device id, named by the server

const idKey = (id) => String(id);
// A message's number in its conversation (events have none); a server that numbers nothing has
// no events either, so there the seq is the number.
const numberOf = (m) => m.no || (m.op ? 0 : m.seq || 0);
// What a message's events changed: the server's copy (history, a push again) has them all.
const LIVE_FIELDS = ['text', 'edited_at', 'recalled', 'reactions', 'reply', 'fields', 'mentions', 'no'];
const idNum = (id) => BigInt(id);

// -- state --------------------------------------------------------------------------------------

const state = {
  me: null,              // {id, name}
  token: null,
  link: null,
  retries: 0,
  retryTimer: null,
  users: new Map(),      // id -> {id, name, online, lastSeen}
  groups: new Map(),     // id -> {id, name, owner_id, members, role, invite_only, history_visible}
  blocked: new Set(),    // ids of the users this user blocks
  membersView: null,     // the members dialog on screen: {conv, members, requests, invite}
  pendingInvite: null,   // {group_id, invite} of an invite link the page was opened with
  convs: new Map(),      // 'u:<id>' | 'g:<id>' -> conversation
  active: null,
  outbox: new Map(),     // client_msg_id -> {type, body}
  toAck: [],
  acked: 0,
  reconnects: 0,
  menuFor: null,         // the id (string) of the message whose menu is open
  compose: null,         // {mode: 'reply'|'edit', key, msgId}: the composer answers or edits one
  mention: null,         // the '@' completion on screen: {start, items: [name], index}
};

const FILES_URL = '/api/v1/files'; // uploads and downloads: same origin, the login token
const PREVIEW_MAX_BYTES = 5 * 1024 * 1024; // an image without a thumbnail shows whole up to this
const blobs = new Map(); // '<file_id>' or '<file_id>/thumbnail' -> {url} | {error} | {loading}

const QUICK_EMOJI = ['👍', '❤️', '😂', '😮', '😢', '🎉'];
const SNIPPET = 80; // characters of a quoted message shown
const MENU_ROOM_PX = 240; // a message's menu opens above it when there is this much room

const $ = (id) => document.getElementById(id);
const el = (tag, className, text) => {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
};

function newConversation(key) {
  const [kind, id] = key.split(':');
  return {
    key, kind: kind === 'g' ? 'group' : 'p2p', id: Number(id),
    messages: [], byId: new Map(), byClient: new Map(),
    unread: 0, loaded: false, loading: false, more: false, last: null,
    name: null,        // the peer's or group's name in the server's conversation list
    activity: 0n,      // the server's ordering key: the id of the last message (or of the join)
    lastSeq: 0,        // the largest seq known here (messages and events: 1, 2, 3... per conversation)
    readSeq: 0,        // how far this user has read, on any device
    lastNo: 0,         // the largest message number known here (messages only: unread counts them)
    readNo: 0,         // the number of the last message read (the server's, or derived from its unread)
    ownSince: false,   // an own message went since lastNo was known (a SendAck names no number)
    synced: false,     // readSeq is the server's (from its list, a ReadState or an own message)
    readWanted: 0,     // the seq a MarkRead is queued or on its way for (0: none)
    readWantedNo: 0,   // the number that MarkRead reads up to
    readTimer: null,
    peerReadSeq: 0,      // p2p: how far the peer has read my messages
    peerDeliveredSeq: 0, // p2p: how far the peer has my messages on some device
    groupReadSeq: 0,     // group: the largest seq of mine some member has read
    mentions: 0,       // unread messages here that mention this user (the server's count)
    typers: new Map(), // user id -> {name, timer}: who is typing here now
    typingSent: 0,     // when this page last said "typing" here (0: it is not typing)
  };
}

// The conversation for a key, created (and kept) on first use.
function conversation(key) {
  let conv = state.convs.get(key);
  if (!conv) {
    conv = newConversation(key);
    state.convs.set(key, conv);
  }
  return conv;
}

function convTitle(conv) {
  if (conv.kind === 'group') return state.groups.get(conv.id)?.name ?? conv.name ?? `Group ${conv.id}`;
  return state.users.get(conv.id)?.name ?? conv.fallbackName ?? conv.name ?? `User ${conv.id}`;
}

const viewing = (conv) => state.active === conv.key && !document.hidden;

// A message id (or the server's activity key) moved the conversation: it goes up the sidebar.
function touch(conv, msgId) {
  if (msgId == null) return;
  const id = idNum(msgId);
  if (id > conv.activity) conv.activity = id;
}

// What is left to read: messages, not events (edits, recalls, reactions take seqs but no
// number), from the numbers when the server's read position is known here (a MarkRead on its
// way counts as done).
function recount(conv) {
  if (conv.synced) conv.unread = Math.max(0, conv.lastNo - Math.max(conv.readNo, conv.readWantedNo));
}

// lastSeen: Unix ms of an offline user who shows it; 0 or null: hidden (forget what we knew).
function rememberUser(id, name, online, lastSeen) {
  if (id === state.me?.id) return;
  const user = state.users.get(id) ?? { id, name, online: false, lastSeen: null };
  if (name) user.name = name;
  if (online !== undefined) user.online = online;
  if (lastSeen !== undefined) user.lastSeen = lastSeen || null;
  state.users.set(id, user);
}

// "Online", "last seen 5 min ago", or "Offline" when the user hides it (or was never seen).
function statusText(user) {
  if (user?.online) return 'Online';
  return user?.lastSeen ? `last seen ${sinceText(user.lastSeen)}` : 'Offline';
}

function order(a, b) {
  // Stored messages by id (the server's order); ones still being sent go last.
  if (a.msg_id == null || b.msg_id == null) {
    if (a.msg_id == null && b.msg_id == null) return a.ts - b.ts;
    return a.msg_id == null ? 1 : -1;
  }
  const x = idNum(a.msg_id);
  const y = idNum(b.msg_id);
  return x < y ? -1 : x > y ? 1 : 0;
}

// Adds or updates a message; true when it is new to this conversation.
function addMessage(conv, msg) {
  if (msg.msg_id != null) {
    const known = conv.byId.get(idKey(msg.msg_id));
    if (known) {
      for (const f of LIVE_FIELDS) if (msg[f] !== undefined) known[f] = msg[f];
      return false;
    }
  }
  if (msg.client_msg_id && conv.byClient.has(msg.client_msg_id)) {
    const mine = conv.byClient.get(msg.client_msg_id);
    if (mine.msg_id == null && msg.msg_id != null) {
      Object.assign(mine, { msg_id: msg.msg_id, ts: msg.ts, seq: msg.seq, status: 'sent' });
      conv.byId.set(idKey(msg.msg_id), mine);
      conv.messages.sort(order);
    }
    return false;
  }
  conv.messages.push(msg);
  if (msg.msg_id != null) conv.byId.set(idKey(msg.msg_id), msg);
  if (msg.client_msg_id && msg.sender_id === state.me?.id) conv.byClient.set(msg.client_msg_id, msg);
  conv.messages.sort(order);
  if (!conv.last || msg.ts >= conv.last.ts) conv.last = msg;
  return true;
}

// -- connecting, logging in, reconnecting --------------------------------------------------------

function wsUrl() {
  return `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
}

// This browser's device id (the server named it at the first sign-in), or '' for none yet.
function savedDevice() {
  try { return localStorage.getItem(DEVICE_KEY) || ''; } catch { return ''; }
}

function keepDevice(device) {
  if (!device) return;
  try { localStorage.setItem(DEVICE_KEY, device); } catch { /* storage off: a new device each time */ }
}

async function connect(credentials) {
  const link = new Link(wsUrl(), { onPush, onClose: onLinkClosed });
  state.link = link;
  try {
    await link.open();
    // The device goes with every login: the server keeps what this browser has and has read.
    const ok = await link.request(T.LOGIN, { ...credentials, device: savedDevice() });
    keepDevice(ok.device);
    document.body.dataset.device = ok.device ?? '';
    state.me = { id: ok.user_id, name: ok.name };
    $('show-last-seen').checked = ok.show_last_seen !== false;
    state.token = ok.token;
    sessionStorage.setItem('bitchat.session', JSON.stringify({ token: ok.token, me: state.me }));
    document.body.dataset.pending = String(ok.pending);
    document.body.dataset.userId = String(ok.user_id);
    if (ok.pending > 0) {
      toast(ok.pending === 1 ? '1 message arrived while you were away'
        : `${ok.pending} messages arrived while you were away`);
    }
    link.live = true;
    await afterLogin(link);
    return ok;
  } catch (err) {
    link.live = false;
    link.close();
    throw err;
  }
}

async function afterLogin(link) {
  const [online, groups, convs] = await Promise.all([
    link.request(T.LIST_ONLINE, { watch: true }),
    link.request(T.MY_GROUPS, {}),
    loadConversations(link).catch((err) => {
      if (err.code === 'closed' || err.code === 'timeout') throw err;
      console.warn('bitchat: no conversation list from this server:', err);
      return [];
    }),
  ]);
  for (const user of state.users.values()) user.online = false;
  for (const u of online.users) rememberUser(u.id, u.name, true);
  state.groups.clear();
  for (const g of groups.groups) {
    state.groups.set(g.id, g);
    conversation(`g:${g.id}`);
  }
  // Groups left meanwhile (in another tab, say) leave the sidebar.
  for (const conv of [...state.convs.values()]) {
    if (conv.kind === 'group' && !state.groups.has(conv.id) && conv.key !== state.active) {
      state.convs.delete(conv.key);
    }
  }
  for (const c of convs) mergeConversation(c);
  document.body.dataset.conversations = String(convs.length);
  loadBlocked(link);
  setConnected(true);
  state.retries = 0;
  // Sends cut off by a drop go again with the same client id: the server stores them once.
  for (const cid of state.outbox.keys()) deliver(cid);
  const active = state.active && state.convs.get(state.active);
  if (active) {
    loadHistory(active, false);
    if (viewing(active)) markRead(active);
  }
  render();
  if (state.pendingInvite) joinWithInvite(state.pendingInvite);
}

async function loadBlocked(link) {
  try {
    const list = await link.request(T.GET_BLOCKED, {});
    state.blocked = new Set(list.users.map((u) => u.id));
  } catch (err) {
    if (err.code !== 'closed') console.warn('bitchat: no block list from this server:', err);
  }
}

// Every page of the user's conversations, most recent first (the sidebar is the server's list).
async function loadConversations(link) {
  const all = [];
  let before = 0;
  for (let n = 0; n < CONVERSATIONS_MAX_PAGES; n += 1) {
    const page = await link.request(T.GET_CONVERSATIONS, { limit: CONVERSATIONS_PAGE, before });
    all.push(...page.conversations);
    if (!page.more || page.conversations.length === 0) break;
    const last = idNum(page.conversations.at(-1).activity);
    if (before && last >= idNum(before)) break; // no progress: stop rather than loop
    before = last;
  }
  return all;
}

// One conversation of the server's list into the page's state; the server's read position wins.
function mergeConversation(c) {
  const group = c.kind === 'group';
  const conv = conversation(group ? `g:${c.group_id}` : `u:${c.peer_id}`);
  conv.name = c.name || conv.name;
  if (!group) rememberUser(c.peer_id, c.name);
  touch(conv, c.activity);
  conv.lastSeq = Math.max(conv.lastSeq, c.last_seq || 0);
  // The server's read position, not a larger one of ours: a MarkRead lost with the connection
  // must not hide what is still unread there (opening the conversation reads it again).
  conv.readSeq = c.read_seq || 0;
  // Unread counts numbers: the server's last number (its list's, or its last message's), less
  // what it says is unread, is the number read up to.
  const lastNo = c.last_no ?? (c.last_message && !c.last_message.op
    ? numberOf(c.last_message) || c.last_seq || 0 : Math.max(conv.lastNo, c.unread || 0));
  conv.lastNo = Math.max(conv.lastNo, lastNo);
  conv.readNo = c.read_no ?? Math.max(0, lastNo - (c.unread || 0));
  conv.ownSince = false;
  conv.peerReadSeq = Math.max(conv.peerReadSeq, c.peer_read_seq || 0);
  conv.mentions = c.mentions || 0;
  conv.peerDeliveredSeq = Math.max(conv.peerDeliveredSeq, c.peer_delivered_seq || 0, conv.peerReadSeq);
  const last = c.last_message;
  if (last && (!conv.last || conv.last.msg_id == null || idNum(last.msg_id) >= idNum(conv.last.msg_id))) {
    conv.last = { ...last, status: 'sent' };
  }
  conv.synced = true;
  recount(conv);
}

// What the page says when the server ends the session for good (its API's logout and ban).
const STAYED_OUT = {
  logged_out: 'You were logged out. Please sign in again.',
  banned: 'This account is banned.',
};

function onLinkClosed(link) {
  if (link !== state.link || !link.live) return;
  link.live = false;
  const told = link.closeReason?.code;
  if (state.me && STAY_OUT.has(told)) {
    // A forced logout sticks: no reconnect with a token the server revoked anyway.
    signedOut(STAYED_OUT[told]);
    document.body.dataset.signedOut = told;
    return;
  }
  if (state.me) {
    setConnected(false);
    scheduleReconnect();
  }
}

function scheduleReconnect() {
  clearTimeout(state.retryTimer);
  const ceiling = Math.min(10000, 500 * 2 ** state.retries);
  state.retries += 1;
  const delay = ceiling / 2 + Math.random() * (ceiling / 2);
  setBanner(`Connection lost. Reconnecting in ${Math.ceil(delay / 1000)} s…`);
  state.retryTimer = setTimeout(reconnect, delay);
}

async function reconnect() {
  clearTimeout(state.retryTimer);
  state.retryTimer = null;
  if (!state.token || (state.link && state.link.live)) return;
  setBanner('Reconnecting…');
  try {
    await connect({ token: state.token });
    state.reconnects += 1;
    document.body.dataset.reconnects = String(state.reconnects);
  } catch (err) {
    if (err.code === 'login_failed') {
      signedOut('Your session has expired. Please sign in again.');
    } else if (state.me) {
      scheduleReconnect();
    }
  }
}

window.addEventListener('online', () => { if (state.me && !state.link?.live) reconnect(); });
// A reload or a closed tab right after opening a conversation still marks it read.
window.addEventListener('pagehide', () => {
  for (const conv of state.convs.values()) if (conv.readTimer) flushRead(conv);
});

function setConnected(on) {
  document.body.dataset.state = on ? 'online' : 'reconnecting';
  $('status-text').textContent = on ? 'Online' : 'Reconnecting…';
  if (on) setBanner(null);
}

function setBanner(text) {
  const banner = $('banner');
  banner.hidden = !text;
  banner.textContent = text ?? '';
}

function signedOut(message) {
  clearTimeout(state.retryTimer);
  sessionStorage.removeItem('bitchat.session');
  const link = state.link;
  state.link = null;
  if (link) { link.live = false; link.close(); }
  Object.assign(state, { me: null, token: null, active: null, retries: 0, toAck: [] });
  state.users.clear();
  state.groups.clear();
  state.convs.clear();
  state.outbox.clear();
  state.blocked.clear();
  closeMembers();
  document.body.dataset.state = 'login';
  $('app').hidden = true;
  $('login-screen').hidden = false;
  showLoginError(message);
  $('login-password').value = '';
  $('login-name').focus();
}

// -- pushes -------------------------------------------------------------------------------------

function onPush(type, body) {
  if (type === T.CHAT) onChat(body);
  else if (type === T.TYPING_EVENT) onTyping(body);
  else if (type === T.READ_STATE) onReadState(body);
  else if (type === T.RECEIPT) onReceipt(body);
  else if (type === T.GROUP_EVENT) onGroupEvent(body);
  else if (type === T.HIDDEN) onHidden(body);
  else if (type === T.PRESENCE) {
    rememberUser(body.user_id, body.name, body.online, body.online ? undefined : body.last_seen);
    render();
  }
}

function onChat(m) {
  if (m.op) { onEvent(m); return; }
  const mine = m.sender_id === state.me?.id;
  let key;
  if (m.kind === 'group') {
    key = `g:${m.to}`;
  } else {
    const peer = mine ? m.to : m.sender_id;
    key = `u:${peer}`;
    if (!mine) rememberUser(m.sender_id, m.sender_name);
  }
  const conv = conversation(key);
  if (!mine && m.kind === 'p2p') conv.fallbackName = m.sender_name;
  clearTyper(conv, m.sender_id); // a message from them means they stopped typing
  const fresh = addMessage(conv, { ...m, status: 'sent' });
  queueAck(m.msg_id); // own messages from my other devices too: this device has them now
  if (fresh) arrived(conv, m, mine);
  if (m.kind === 'group' && !state.groups.has(m.to)) refreshGroups();
  else if (m.kind === 'group' && conv.memberIds && !conv.memberIds.has(m.sender_id)) {
    refreshMembers(conv); // someone joined since the list was read
  }
  render();
}

// The conversation of a pushed message or event.
function convOf(m) {
  if (m.kind === 'group') return conversation(`g:${m.to}`);
  return conversation(`u:${m.sender_id === state.me?.id ? m.to : m.sender_id}`);
}

// An event: a message of the conversation was edited, recalled, or reacted to. It changes the
// message where it is shown (and the quotes of it); it is no new message (no unread).
function onEvent(e) {
  queueAck(e.msg_id);
  changed(convOf(e), e);
  render();
}

// An event (pushed, or this page's own once the server took it) applied to the conversation.
function changed(conv, e) {
  if ((e.seq || 0) > conv.lastSeq) conv.lastSeq = e.seq;
  const target = conv.byId.get(idKey(e.target));
  const changed = [target, conv.last?.msg_id != null && idKey(conv.last.msg_id) === idKey(e.target) ? conv.last : null];
  for (const m of changed) if (m) applyEvent(m, e);
  if (e.op === 'edit' || e.op === 'recall') {
    for (const m of conv.messages) {
      if (m.reply && idKey(m.reply.msg_id) === idKey(e.target)) {
        m.reply = { ...m.reply, snippet: e.op === 'recall' ? '' : snippet(e.text), recalled: e.op === 'recall' };
      }
    }
    if (e.op === 'recall' && state.compose && state.compose.msgId === idKey(e.target)) closeCompose();
  }
}

function applyEvent(m, e) {
  if (e.op === 'edit') {
    m.text = e.text;
    m.edited_at = e.edited_at || e.ts;
  } else if (e.op === 'recall') {
    Object.assign(m, { recalled: true, text: '', fields: {}, reactions: {} });
  } else if (e.op === 'react' || e.op === 'unreact') {
    const reactions = { ...(m.reactions ?? {}) };
    const who = (reactions[e.emoji] ?? []).filter((id) => id !== e.sender_id);
    if (e.op === 'react') who.push(e.sender_id);
    if (who.length) reactions[e.emoji] = who;
    else delete reactions[e.emoji];
    m.reactions = reactions;
  }
}

// Deleted for this user on another device: gone here too.
function onHidden(h) {
  const ids = new Set((h.msg_ids ?? []).map(idKey));
  for (const conv of state.convs.values()) {
    conv.messages = conv.messages.filter((m) => m.msg_id == null || !ids.has(idKey(m.msg_id)));
    for (const id of ids) conv.byId.delete(id);
    if (conv.last?.msg_id != null && ids.has(idKey(conv.last.msg_id))) conv.last = conv.messages.at(-1) ?? null;
  }
  render();
}

const snippet = (text) => (text.length > SNIPPET ? `${text.slice(0, SNIPPET - 1)}…` : text);

// A new message in a conversation: it moves up the sidebar and counts as unread unless it is
// mine (sending reads the conversation, on any device) or on screen (then it is read at once).
function arrived(conv, m, mine) {
  touch(conv, m.msg_id);
  const seq = m.seq || 0;
  const no = numberOf(m);
  if (seq > conv.lastSeq) conv.lastSeq = seq;
  if (no > conv.lastNo) conv.lastNo = no;
  if (!mine && m.kind === 'p2p' && seq > 1) {
    // The server moved the sender's read position to this message: they have read mine
    // before it, as a "read" Receipt up to seq - 1 would say (none comes for that).
    conv.peerReadSeq = Math.max(conv.peerReadSeq, seq - 1);
    conv.peerDeliveredSeq = Math.max(conv.peerDeliveredSeq, conv.peerReadSeq);
  }
  if (!mine && !viewing(conv) && (m.mentions ?? []).includes(state.me?.id)) conv.mentions += 1;
  if (mine) {
    if (seq > conv.readSeq) conv.readSeq = seq;
    // Sending read the conversation up to this message (its number, when the answer has it).
    conv.readNo = Math.max(conv.readNo, no || conv.lastNo);
    conv.ownSince = !no;
    recount(conv);
  } else if (viewing(conv)) {
    markRead(conv);
  } else if (no && conv.synced) {
    // After an own message whose number was not told, the one before this was read.
    if (conv.ownSince) conv.readNo = Math.max(conv.readNo, no - 1);
    conv.ownSince = false;
    recount(conv);
  } else {
    conv.unread += 1;
  }
}

// The conversation is read up to its last message, here and (via the server) on every device.
// The badge goes at once; readSeq moves when the server answers. Batched: a burst of messages
// on screen costs one MarkRead.
function markRead(conv) {
  const seq = conv.lastSeq;
  if (!conv.unread && (!seq || seq <= Math.max(conv.readSeq, conv.readWanted))) return;
  conv.unread = 0;
  conv.mentions = 0;
  conv.readWanted = Math.max(conv.readWanted, seq);
  conv.readWantedNo = Math.max(conv.readWantedNo, conv.lastNo);
  if (!conv.readTimer) conv.readTimer = setTimeout(() => flushRead(conv), READ_DELAY_MS);
}

async function flushRead(conv) {
  clearTimeout(conv.readTimer);
  conv.readTimer = null;
  const seq = conv.readWanted;
  const target = conv.kind === 'group' ? { group_id: conv.id } : { peer_id: conv.id };
  try {
    if (!state.link?.live) throw new RequestFailed('closed', 'not connected');
    onReadState(await state.link.request(T.MARK_READ, { ...target, seq }));
  } catch (err) {
    if (err.code !== 'closed') console.warn('bitchat: could not mark as read:', err);
    // Not read on the server: the badge comes back, and the next login's list says so too.
    if (!conv.readTimer && conv.readWanted === seq) {
      conv.readWanted = 0;
      conv.readWantedNo = 0;
      recount(conv);
      render();
    }
  }
}

// The user's read position moved (the answer to a MarkRead, or a push from another device):
// the badge shows what is left.
function onReadState(r) {
  const conv = state.convs.get(r.group_id ? `g:${r.group_id}` : `u:${r.peer_id}`);
  if (!conv) return;
  conv.readSeq = Math.max(conv.readSeq, r.read_seq || 0);
  conv.lastSeq = Math.max(conv.lastSeq, r.read_seq || 0);
  // unread counts messages (numbers): what is left of the last number known here.
  if (r.read_no != null) {
    conv.readNo = Math.max(conv.readNo, r.read_no);
    conv.lastNo = Math.max(conv.lastNo, r.read_no + (r.unread || 0));
  } else {
    conv.lastNo = Math.max(conv.lastNo, conv.readNo + (r.unread || 0));
    conv.readNo = Math.max(conv.readNo, conv.lastNo - (r.unread || 0));
  }
  if (!r.unread) conv.mentions = 0;
  if (conv.readWanted <= conv.readSeq) { conv.readWanted = 0; conv.readWantedNo = 0; } // done
  conv.synced = true;
  recount(conv);
  if (conv.unread && viewing(conv)) markRead(conv);
  render();
}

// Someone has my messages up to seq on a device ("delivered"), or has read them ("read").
function onReceipt(r) {
  const seq = r.seq || 0;
  if (r.group_id) {
    const conv = state.convs.get(`g:${r.group_id}`);
    if (conv && r.kind === 'read') conv.groupReadSeq = Math.max(conv.groupReadSeq, seq);
  } else {
    const conv = state.convs.get(`u:${r.user_id}`);
    if (!conv) return;
    if (r.kind === 'read') conv.peerReadSeq = Math.max(conv.peerReadSeq, seq);
    if (r.kind === 'read' || r.kind === 'delivered') {
      conv.peerDeliveredSeq = Math.max(conv.peerDeliveredSeq, seq);
    }
  }
  render();
}

// How far a message of mine got: 'pending', 'failed', 'sent' (stored), 'delivered', 'read'.
function tick(conv, m) {
  if (m.status === 'pending' || m.status === 'failed') return m.status;
  const seq = m.seq || 0;
  if (!seq) return 'sent';
  if (conv.kind === 'group') return conv.groupReadSeq >= seq ? 'read' : 'sent';
  if (conv.peerReadSeq >= seq) return 'read';
  return conv.peerDeliveredSeq >= seq ? 'delivered' : 'sent';
}

const TICKS = {
  pending: ['🕓', 'Sending…'],
  failed: ['Not sent: tap to retry', 'Not sent'],
  sent: ['✓', 'Stored on the server'],
  delivered: ['✓✓', 'Delivered'],
  read: ['✓✓', 'Read'],
};

// Someone is typing here, or stopped; a "typing" ends by itself after its expires_in.
function onTyping(e) {
  if (e.user_id === state.me?.id) return;
  const conv = conversation(e.group_id ? `g:${e.group_id}` : `u:${e.user_id}`);
  clearTyper(conv, e.user_id);
  if (e.typing) {
    const timer = setTimeout(() => { clearTyper(conv, e.user_id); render(); }, e.expires_in * 1000);
    conv.typers.set(e.user_id, { name: e.name, timer });
  }
  render();
}

function clearTyper(conv, userId) {
  const typer = conv.typers.get(userId);
  if (typer) {
    clearTimeout(typer.timer);
    conv.typers.delete(userId);
  }
}

function typingText(conv) {
  const names = [...conv.typers.values()].map((t) => t.name);
  if (names.length === 0) return '';
  if (names.length === 1) return `${names[0]} is typing…`;
  if (names.length === 2) return `${names[0]} and ${names[1]} are typing…`;
  return 'Several people are typing…';
}

// Tells the conversation that this user types (at most every TYPING_EVERY_MS) or stopped.
// One-way and best effort: nothing waits for it, a refusal is only logged.
function sendTyping(conv, typing) {
  if (!conv || !state.link?.live) return;
  if (typing) {
    if (Date.now() - conv.typingSent < TYPING_EVERY_MS) return;
    conv.typingSent = Date.now();
  } else {
    if (!conv.typingSent) return;
    conv.typingSent = 0;
  }
  const target = conv.kind === 'group' ? { group_id: conv.id } : { to: conv.id };
  state.link.send(T.TYPING, { ...target, typing });
}

function composerTyped() {
  const conv = state.active && state.convs.get(state.active);
  sendTyping(conv, $('composer-input').value.trim() !== '');
}

// Acks go in batches: a burst of offline messages costs a few requests, not one each.
function queueAck(msgId) {
  state.toAck.push(msgId);
  if (state.toAck.length === 1) setTimeout(flushAcks, ACK_DELAY_MS);
}

async function flushAcks() {
  const ids = state.toAck;
  state.toAck = [];
  if (!ids.length || !state.link?.live) return; // unacked messages come again at the next login
  try {
    for (let i = 0; i < ids.length; i += ACK_MAX_IDS) {
      await state.link.request(T.ACK, { msg_ids: ids.slice(i, i + ACK_MAX_IDS) });
    }
    state.acked += ids.length;
    document.body.dataset.acked = String(state.acked);
  } catch (err) {
    console.warn('bitchat: ack failed, the messages will come again:', err);
  }
}

async function refreshGroups() {
  try {
    const list = await state.link.request(T.MY_GROUPS, {});
    for (const g of list.groups) state.groups.set(g.id, g);
    render();
  } catch { /* the next login lists them */ }
}

// -- actions ------------------------------------------------------------------------------------

// extra: {reply_to, type, fields} of a reply or a typed message (left out when not given).
async function sendText(conv, text, extra = {}) {
  const cid = newClientMsgId();
  const quoted = extra.reply_to ? conv.byId.get(idKey(extra.reply_to)) : null;
  const msg = {
    msg_id: null, client_msg_id: cid, kind: conv.kind, sender_id: state.me.id,
    sender_name: state.me.name, to: conv.id, text, ts: Date.now(), status: 'pending',
    type: extra.type || 'text', fields: extra.fields || {}, reply_to: extra.reply_to || 0,
    reply: quoted ? quoteOf(quoted) : null, reactions: {},
  };
  addMessage(conv, msg);
  conv.typingSent = 0; // the server takes a message as the end of typing
  const body = conv.kind === 'group'
    ? { group_id: conv.id, text, client_msg_id: cid }
    : { to: conv.id, text, client_msg_id: cid };
  if (extra.reply_to) body.reply_to = idNum(extra.reply_to);
  if (extra.type && extra.type !== 'text') body.type = extra.type;
  if (extra.fields && Object.keys(extra.fields).length) body.fields = extra.fields;
  state.outbox.set(cid, { key: conv.key, type: conv.kind === 'group' ? T.SEND_GROUP : T.SEND_P2P, body });
  render({ toBottom: true });
  await deliver(cid);
}

async function deliver(cid) {
  const item = state.outbox.get(cid);
  if (!item || !state.link?.live) return;
  const conv = conversation(item.key);
  const msg = conv.byClient.get(cid);
  try {
    const ack = await state.link.request(item.type, item.body);
    state.outbox.delete(cid);
    if (msg && msg.msg_id == null) {
      Object.assign(msg, { msg_id: ack.msg_id, ts: ack.ts, seq: ack.seq, status: 'sent' });
      conv.byId.set(idKey(ack.msg_id), msg);
      conv.messages.sort(order);
    }
    arrived(conv, ack, true);
  } catch (err) {
    if (err.code === 'closed' || err.code === 'timeout') return; // sent again after reconnecting
    state.outbox.delete(cid);
    if (msg) Object.assign(msg, { status: 'failed', error: err.message || err.code });
  }
  render();
}

async function loadHistory(conv, older) {
  if (conv.loading || !state.link?.live) return;
  conv.loading = true;
  const first = conv.messages.find((m) => m.msg_id != null);
  const before = older && first ? idNum(first.msg_id) : 0;
  const query = conv.kind === 'group'
    ? { group_id: conv.id, before, limit: HISTORY_PAGE }
    : { peer_id: conv.id, before, limit: HISTORY_PAGE };
  try {
    const page = await state.link.request(T.HISTORY, query);
    const list = $('messages');
    const fromBottom = list.scrollHeight - list.scrollTop;
    for (const m of page.messages) {
      if ((m.seq || 0) > conv.lastSeq) conv.lastSeq = m.seq;
      if (numberOf(m) > conv.lastNo) conv.lastNo = numberOf(m);
      if (m.op) continue; // the messages carry what their events did
      if (conv.kind === 'p2p' && m.sender_id !== state.me.id) conv.fallbackName = m.sender_name;
      addMessage(conv, { ...m, status: 'sent' });
    }
    if (older || !conv.loaded) conv.more = page.more;
    conv.loaded = true;
    if (!older) {
      recount(conv);
      if (viewing(conv)) markRead(conv);
      if (conv.kind === 'group') groupReceipts(conv);
    }
    render(older ? { keepFromBottom: fromBottom } : { toBottom: true });
  } catch (err) {
    if (err.code !== 'closed') toast(`Could not load the history: ${err.message}`);
  } finally {
    conv.loading = false;
  }
}

function openConversation(key) {
  const before = state.active && state.convs.get(state.active);
  if (before && before.key !== key) sendTyping(before, false);
  const conv = conversation(key);
  state.active = key;
  markRead(conv);
  $('app').classList.add('in-chat');
  render({ toBottom: true });
  if (!conv.loaded) loadHistory(conv, false);
  else if (conv.kind === 'group') groupReceipts(conv);
  if (conv.kind === 'group') refreshMembers(conv);
  $('composer-input').focus();
}

// Whether some member has read my latest message in a group (the ticks of the ones before it
// follow: a read position covers everything up to it). Best effort; Receipt pushes do the rest.
async function groupReceipts(conv) {
  const mine = conv.messages.findLast((m) => m.sender_id === state.me.id && m.seq);
  if (!mine || mine.seq <= conv.groupReadSeq || !state.link?.live) return;
  try {
    const r = await state.link.request(T.GET_RECEIPTS, { group_id: conv.id, seq: mine.seq });
    if (r.read > 0 && r.seq > conv.groupReadSeq) {
      conv.groupReadSeq = r.seq;
      render();
    }
  } catch (err) {
    if (err.code !== 'closed') console.warn('bitchat: no receipts:', err);
  }
}

// A group's member list (and so its count) as the server has it now.
async function refreshMembers(conv) {
  if (!state.link?.live) return null;
  try {
    const list = await state.link.request(T.GROUP_MEMBERS, { group_id: conv.id });
    conv.memberIds = new Set(list.members.map((m) => m.id));
    conv.members = list.members;
    const mine = list.members.find((m) => m.id === state.me.id);
    for (const m of list.members) rememberUser(m.id, m.name, m.online, m.online ? undefined : m.last_seen);
    const g = state.groups.get(conv.id);
    if (g) {
      g.members = list.members.length;
      if (mine?.role) g.role = mine.role;
    }
    render();
    return list.members;
  } catch (err) {
    if (err.code !== 'closed') toast(err.message);
    return null;
  }
}

// -- groups: members, roles, moderation ---------------------------------------------------------

const MUTE_CHOICES = [['10 min', 600], ['1 hour', 3600], ['1 day', 86400], ['1 week', 7 * 86400]];
const ROLE_LABEL = { owner: 'Owner', admin: 'Admin', member: '' };
const rank = (role) => ({ owner: 2, admin: 1 })[role] ?? 0;

// An invite link (`…#invite=<group>.<code>`), or "<group> <code>": {group_id, invite}, else null.
function parseInvite(text) {
  const m = /(?:^|[#&])invite=(\d+)\.([A-Za-z0-9_-]+)/.exec(text) ?? /^(\d+)\s+([A-Za-z0-9_-]+)$/.exec(text.trim());
  return m ? { group_id: Number(m[1]), invite: m[2] } : null;
}

function inviteLink(info) {
  return `${location.origin}${location.pathname}#invite=${info.group_id}.${info.code}`;
}

async function joinWithInvite(invite) {
  state.pendingInvite = null;
  try {
    groupArrived(await state.link.request(T.JOIN_GROUP, invite));
  } catch (err) {
    toast(`Could not join with the invite: ${err.message}`);
  }
}

// The user's name: the event's own, else as the page knows it.
function nameOf(id, conv, given = '') {
  if (id === state.me?.id) return 'you';
  if (given) return given;
  return conv?.members?.find((m) => m.id === id)?.name ?? state.users.get(id)?.name ?? `user ${id}`;
}

function groupName(id) {
  return state.groups.get(id)?.name ?? `group ${id}`;
}

// Out of a group (kicked, banned, or left on another device): it leaves the sidebar.
function leftGroup(groupId) {
  state.groups.delete(groupId);
  state.convs.delete(`g:${groupId}`);
  if (state.membersView?.conv.id === groupId) closeMembers();
  if (state.active === `g:${groupId}`) {
    state.active = null;
    $('app').classList.remove('in-chat');
  }
  render();
}

function onGroupEvent(e) {
  const conv = state.convs.get(`g:${e.group_id}`);
  const by = e.by_id ? nameOf(e.by_id, conv, e.by_name) : 'An admin';
  const name = groupName(e.group_id);
  if (e.user_id === state.me?.id) {
    if (e.event === 'kicked' || e.event === 'banned') {
      toast(e.event === 'kicked' ? `${by} removed you from ${name}` : `${by} banned you from ${name}`);
      leftGroup(e.group_id);
      return;
    }
    if (e.event === 'member_removed') { leftGroup(e.group_id); return; }
    if (e.event === 'member_added' && !state.groups.has(e.group_id)) {
      // Added by someone, a join request approved, or joined on another device: the group
      // comes into the sidebar (a join of this tab is told by its own answer).
      refreshGroups().then(() => {
        if (!state.groups.has(e.group_id)) return;
        conversation(`g:${e.group_id}`);
        if (e.by_id !== state.me?.id) toast(`${by} added you to ${groupName(e.group_id)}`);
        render();
      });
      return;
    }
    if (e.event === 'role') {
      const g = state.groups.get(e.group_id);
      if (g) g.role = e.role;
      toast(`${by} made you ${e.role === 'member' ? 'a member' : `the ${e.role}`} of ${name}`);
    } else if (e.event === 'muted') {
      toast(`${by} muted you in ${name} until ${timeFormat.format(new Date(e.until))}`);
    } else if (e.event === 'unmuted') {
      toast(`You can write in ${name} again`);
    }
  } else if (e.event === 'join_requested') {
    toast(`${nameOf(e.user_id, conv, e.user_name)} asks to join ${name}`);
  }
  // The dialog on screen and the member count show the server's state again.
  if (state.membersView?.conv.id === e.group_id) reloadMembers();
  else if (conv && ['member_added', 'member_removed', 'kicked', 'banned'].includes(e.event)) refreshMembers(conv);
}

async function openMembers(conv) {
  if (!conv) return;
  const members = await refreshMembers(conv);
  if (!members) return;
  state.membersView = { conv, members, requests: null, invite: null };
  const body = el('div', 'members-view');
  body.dataset.testid = 'members-view';
  state.membersView.body = body;
  renderMembers();
  loadJoinRequests();
  await ask({ title: `${convTitle(conv)} · ${members.length} members`, content: body, ok: 'Close' });
  if (state.membersView?.body === body) state.membersView = null;
}

function closeMembers() {
  const view = state.membersView;
  state.membersView = null;
  if (view && $('dialog').open) $('dialog').close();
}

// Members (and join requests) asked of the server again, drawn in the open dialog.
async function reloadMembers() {
  const view = state.membersView;
  if (!view) return;
  const members = await refreshMembers(view.conv);
  if (!members || state.membersView !== view) return;
  view.members = members;
  if (!members.some((m) => m.id === state.me.id)) { leftGroup(view.conv.id); return; }
  renderMembers();
  loadJoinRequests();
}

// What an admin sees besides the members: the join requests, and the group's options (a
// SetGroupOptions that changes nothing answers them: GroupList does not carry them).
async function loadJoinRequests() {
  const view = state.membersView;
  if (!view || rank(myRole(view)) < 1) return;
  const group_id = view.conv.id;
  const [requests, info] = await Promise.allSettled([
    state.link.request(T.GET_JOIN_REQUESTS, { group_id }),
    state.link.request(T.SET_GROUP_OPTIONS, { group_id }),
  ]);
  if (state.membersView !== view) return;
  if (requests.status === 'fulfilled') view.requests = requests.value.requests;
  if (info.status === 'fulfilled') rememberGroup(info.value);
  renderMembers();
}

function myRole(view) {
  return view.members.find((m) => m.id === state.me.id)?.role ?? state.groups.get(view.conv.id)?.role ?? '';
}

// One request of the dialog: its failure is a toast, its success redraws from the server.
async function act(button, type, body, done) {
  button.disabled = true;
  try {
    const answer = await state.link.request(type, body);
    if (done) done(answer);
    await reloadMembers();
  } catch (err) {
    toast(err.message);
  } finally {
    button.disabled = false;
  }
}

function actionButton(text, testid, onClick, danger = false) {
  const b = el('button', danger ? 'chip danger' : 'chip', text);
  b.type = 'button';
  b.dataset.testid = testid;
  b.addEventListener('click', onClick);
  return b;
}

function renderMembers() {
  const view = state.membersView;
  if (!view) return;
  const { conv, members } = view;
  const role = myRole(view);
  const g = state.groups.get(conv.id) ?? {};
  const parts = [];
  if (rank(role) >= 1) parts.push(optionsSection(view, g), requestsSection(view));
  if (rank(role) >= 1 || !g.invite_only) parts.push(inviteSection(view));
  const ul = el('ul', 'member-list');
  const sorted = [...members].sort((a, b) => rank(b.role) - rank(a.role) || a.name.localeCompare(b.name));
  for (const m of sorted) ul.append(memberRow(view, m, role));
  parts.push(ul);
  view.body.replaceChildren(...parts.filter(Boolean));
  if (state.membersView === view && $('dialog').open) {
    $('dialog-title').textContent = `${convTitle(conv)} · ${members.length} members`;
  }
}

function memberRow(view, m, role) {
  const gid = view.conv.id;
  const li = el('li');
  li.dataset.testid = 'member';
  li.dataset.userId = String(m.id);
  li.dataset.role = m.role ?? 'member';
  const muted = m.muted_until > Date.now();
  li.dataset.muted = String(muted);
  const who = el('div', 'member-text');
  const top = el('span', 'member-name', m.id === state.me.id ? `${m.name} (you)` : m.name);
  if (ROLE_LABEL[m.role]) {
    const badge = el('span', `role-badge ${m.role}`, ROLE_LABEL[m.role]);
    badge.dataset.testid = 'role';
    top.append(badge);
  }
  who.append(top);
  if (muted) {
    const note = el('span', 'member-muted', `muted until ${sinceOrAt(m.muted_until)}`);
    note.dataset.testid = 'muted';
    who.append(note);
  }
  if (!m.online && m.last_seen) {
    const since = el('span', 'member-seen', `last seen ${sinceText(m.last_seen)}`);
    since.dataset.testid = 'last-seen';
    who.append(since);
  }
  li.append(avatar(m.name, m.id, { online: m.online }), who);
  if (m.id === state.me.id) return li;

  const actions = el('div', 'member-actions');
  const target = { group_id: gid, user_id: m.id };
  // An admin acts on members only; the owner on everyone (the server checks it again).
  if (rank(role) > rank(m.role)) {
    const mute = el('select', 'chip');
    mute.dataset.testid = 'mute';
    mute.setAttribute('aria-label', `Mute ${m.name}`);
    mute.append(new Option(muted ? 'Muted' : 'Mute…', ''));
    for (const [label, seconds] of MUTE_CHOICES) mute.append(new Option(`Mute ${label}`, String(seconds)));
    if (muted) mute.append(new Option('Unmute', '0'));
    mute.addEventListener('change', () => {
      if (mute.value === '') return;
      act(mute, T.MUTE_MEMBER, { ...target, seconds: Number(mute.value) });
    });
    actions.append(
      mute,
      actionButton('Kick', 'kick', (ev) => act(ev.currentTarget, T.KICK_MEMBER, target), true),
      actionButton('Ban', 'ban', (ev) => act(ev.currentTarget, T.BAN_MEMBER, { ...target, ban: true }), true),
    );
  }
  if (role === 'owner') {
    const promote = m.role === 'admin'
      ? actionButton('Remove admin', 'demote', (ev) => act(ev.currentTarget, T.SET_ROLE, { ...target, role: 'member' }))
      : actionButton('Make admin', 'promote', (ev) => act(ev.currentTarget, T.SET_ROLE, { ...target, role: 'admin' }));
    // Handing the group over cannot be taken back by this user: a second click confirms it.
    const handOver = actionButton('Make owner', 'make-owner', (ev) => {
      const button = ev.currentTarget;
      if (button.dataset.armed !== 'true') {
        button.dataset.armed = 'true';
        button.textContent = 'Confirm: make owner';
        return;
      }
      act(button, T.SET_ROLE, { ...target, role: 'owner' },
        () => toast(`${m.name} owns the group now; you are an admin`));
    });
    actions.append(promote, handOver);
  }
  const blocked = state.blocked.has(m.id);
  actions.append(actionButton(blocked ? 'Unblock' : 'Block', blocked ? 'unblock' : 'block',
    (ev) => toggleBlock(ev.currentTarget, m.id, m.name)));
  li.append(actions);
  return li;
}

// Block (or unblock) a user: no messages either way, and this user shows offline to them.
async function toggleBlock(button, userId, name) {
  const blocked = state.blocked.has(userId);
  button.disabled = true;
  try {
    await state.link.request(T.BLOCK, { user_id: userId, block: !blocked });
    if (blocked) state.blocked.delete(userId); else state.blocked.add(userId);
    toast(blocked ? `${name} is unblocked` : `${name} is blocked: no messages either way`);
    renderMembers();
    render();
  } catch (err) {
    toast(err.message);
  } finally {
    button.disabled = false;
  }
}

function sinceOrAt(ts) {
  const d = new Date(ts);
  return d.toDateString() === new Date().toDateString() ? timeFormat.format(d)
    : `${shortDay.format(d)} ${timeFormat.format(d)}`;
}

function optionsSection(view, g) {
  const box = el('fieldset', 'group-options');
  box.append(el('legend', '', 'Group options'));
  const option = (key, text) => {
    const label = el('label', 'option');
    const input = el('input');
    input.type = 'checkbox';
    input.checked = !!g[key];
    input.dataset.testid = key.replace('_', '-');
    input.addEventListener('change', () => {
      act(input, T.SET_GROUP_OPTIONS, { group_id: view.conv.id, [key]: input.checked }, (info) => rememberGroup(info));
    });
    label.append(input, ` ${text}`);
    return label;
  };
  box.append(option('invite_only', 'Invite only: joining needs an invite link or an approval'),
    option('history_visible', 'New members see the earlier messages'));
  return box;
}

function requestsSection(view) {
  const requests = view.requests ?? [];
  if (!requests.length) return null;
  const box = el('div', 'join-requests');
  box.dataset.testid = 'join-requests';
  box.append(el('h3', '', `Join requests (${requests.length})`));
  const ul = el('ul', 'member-list');
  for (const r of requests) {
    const li = el('li');
    li.dataset.testid = 'join-request';
    const answer = (approve) => (ev) => act(ev.currentTarget, T.ANSWER_JOIN_REQUEST,
      { group_id: view.conv.id, user_id: r.user_id, approve });
    const actions = el('div', 'member-actions');
    actions.append(actionButton('Approve', 'approve', answer(true)), actionButton('Deny', 'deny', answer(false), true));
    li.append(avatar(r.name, r.user_id), el('div', 'member-text', r.name), actions);
    ul.append(li);
  }
  box.append(ul);
  return box;
}

function inviteSection(view) {
  const box = el('div', 'invite');
  if (view.invite) {
    const input = el('input', 'invite-link');
    input.readOnly = true;
    input.value = inviteLink(view.invite);
    input.dataset.testid = 'invite-link';
    input.setAttribute('aria-label', 'Invite link');
    input.addEventListener('focus', () => input.select());
    const copy = actionButton('Copy', 'copy-invite', async () => {
      input.select();
      try {
        await navigator.clipboard.writeText(input.value);
      } catch {
        document.execCommand('copy'); // plain http: no Clipboard API
      }
      toast('Invite link copied');
    });
    const until = el('span', 'member-seen', `valid until ${sinceOrAt(view.invite.expires_at)}`);
    box.append(input, copy, until);
  } else {
    box.append(actionButton('Create invite link', 'create-invite', (ev) => {
      act(ev.currentTarget, T.CREATE_INVITE, { group_id: view.conv.id }, (info) => { view.invite = info; });
    }));
  }
  return box;
}

// -- rendering ----------------------------------------------------------------------------------

let renderQueued = null;

// Coalesces renders: many pushes in one tick draw once.
function render(options = {}) {
  if (renderQueued) {
    Object.assign(renderQueued, options);
    return;
  }
  renderQueued = { ...options };
  queueMicrotask(() => {
    const opts = renderQueued;
    renderQueued = null;
    if (!state.me) return;
    renderSidebar();
    renderConversation(opts);
    const unread = [...state.convs.values()].reduce((n, c) => n + c.unread, 0);
    document.title = unread ? `(${unread}) bitchat` : 'bitchat';
  });
}

function hue(id) {
  return (Number(id) * 137) % 360;
}

function avatar(name, id, { group = false, online } = {}) {
  const node = el('div', group ? 'avatar group' : 'avatar', (name || '?').slice(0, 1).toUpperCase());
  node.style.setProperty('--hue', hue(id));
  node.setAttribute('aria-hidden', 'true');
  if (online !== undefined) node.append(el('span', online ? 'dot online' : 'dot'));
  return node;
}

const timeFormat = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
const dayFormat = new Intl.DateTimeFormat(undefined, { weekday: 'long', month: 'long', day: 'numeric' });
const shortDay = new Intl.DateTimeFormat(undefined, { month: 'short', day: 'numeric' });

function dayLabel(ts) {
  const d = new Date(ts);
  const today = new Date();
  const yesterday = new Date(Date.now() - 86400000);
  if (d.toDateString() === today.toDateString()) return 'Today';
  if (d.toDateString() === yesterday.toDateString()) return 'Yesterday';
  return dayFormat.format(d);
}

function sinceText(ts) {
  const minutes = Math.floor((Date.now() - ts) / 60000);
  if (minutes < 1) return 'just now';
  if (minutes < 60) return `${minutes} min ago`;
  if (minutes < 12 * 60) return `${Math.floor(minutes / 60)} h ago`;
  const label = dayLabel(ts);
  return `${label === 'Today' || label === 'Yesterday' ? label.toLowerCase() : shortDay.format(new Date(ts))} at ${timeFormat.format(new Date(ts))}`;
}

function shortTime(ts) {
  const d = new Date(ts);
  return d.toDateString() === new Date().toDateString() ? timeFormat.format(d) : shortDay.format(d);
}

function convRow(conv, { online } = {}) {
  const title = convTitle(conv);
  const li = el('li');
  const button = el('button', 'conv');
  button.type = 'button';
  button.dataset.key = conv.key;
  button.dataset.testid = 'conversation';
  if (conv.key === state.active) button.classList.add('active');
  if (conv.unread) button.classList.add('unread');
  button.append(avatar(title, conv.id, { group: conv.kind === 'group', online }));
  const text = el('div', 'conv-text');
  const top = el('div', 'conv-top');
  top.append(el('span', 'conv-name', title));
  if (conv.last) top.append(el('span', 'conv-time', shortTime(conv.last.ts)));
  const bottom = el('div', 'conv-bottom');
  let preview;
  if (conv.last) {
    const who = conv.last.sender_id === state.me.id ? 'You: '
      : conv.kind === 'group' ? `${conv.last.sender_name}: ` : '';
    preview = who + previewText(conv.last);
  } else if (conv.kind === 'group') {
    const g = state.groups.get(conv.id);
    preview = g ? `Group ${g.id} · ${g.members} member${g.members === 1 ? '' : 's'}` : `Group ${conv.id}`;
  } else {
    preview = statusText(state.users.get(conv.id));
  }
  bottom.append(el('span', 'conv-preview', preview));
  button.dataset.unread = String(conv.unread);
  button.dataset.readSeq = String(conv.readSeq); // the server's: tests wait on it
  button.dataset.mentions = String(conv.mentions);
  if (conv.mentions) {
    const at = el('span', 'badge mentions', `@${conv.mentions > 1 ? conv.mentions : ''}`);
    at.dataset.testid = 'mention-badge';
    at.title = conv.mentions === 1 ? 'You were mentioned' : `You were mentioned ${conv.mentions} times`;
    bottom.append(at);
  }
  if (conv.unread) {
    const badge = el('span', 'badge', String(conv.unread));
    badge.dataset.testid = 'unread';
    bottom.append(badge);
  }
  text.append(top, bottom);
  button.append(text);
  button.addEventListener('click', () => openConversation(conv.key));
  li.append(button);
  return li;
}

// A sidebar preview of the last message, or of the last event (the list's last row may be one).
function previewText(m) {
  if (m.recalled || m.op === 'recall') return 'message recalled';
  if (m.op === 'react') return `reacted ${m.emoji}`;
  if (m.op === 'unreact') return `took back ${m.emoji}`;
  if ((m.type === 'image' || m.type === 'file') && m.fields?.name) {
    return `${m.type === 'image' ? '🖼' : '📄'} ${m.fields.name}`;
  }
  return m.text;
}

// The server's order: by activity (the last message, or the join), newest first; then by name.
function byActivity(a, b) {
  return (a.activity < b.activity ? 1 : a.activity > b.activity ? -1 : 0) ||
    convTitle(a).localeCompare(convTitle(b));
}

function renderSidebar() {
  const me = state.me;
  $('me-name').replaceChildren(me.name, el('span', 'me-id', ` #${me.id}`));
  $('me-name').title = `You are user ${me.id}: others message you with this number`;
  $('me-avatar').replaceWith(Object.assign(avatar(me.name, me.id), { id: 'me-avatar' }));

  // Chats: the server's conversation list (and any opened here since), most recent first.
  const chats = [...state.convs.values()]
    .filter((c) => c.kind === 'group' || c.id !== me.id)
    .sort(byActivity);
  $('chats').replaceChildren(...chats.map((c) => convRow(c, {
    online: c.kind === 'group' ? undefined : !!state.users.get(c.id)?.online,
  })));
  $('chats-empty').hidden = chats.length > 0;

  // Online: everyone else online with no conversation yet; they leave the list when they go.
  const people = [...state.users.values()]
    .filter((u) => u.online && !state.convs.has(`u:${u.id}`))
    .map((u) => newConversation(`u:${u.id}`))
    .sort((a, b) => convTitle(a).localeCompare(convTitle(b)));
  $('people').replaceChildren(...people.map((c) => convRow(c, { online: true })));
  $('people-empty').hidden = people.length > 0;
}

function renderConversation(opts) {
  const conv = state.active && state.convs.get(state.active);
  $('empty').hidden = !!conv;
  $('conversation').hidden = !conv;
  if (!conv) return;
  const title = convTitle(conv);
  $('chat-name').textContent = title;
  const isGroup = conv.kind === 'group';
  $('chat-avatar').replaceWith(Object.assign(
    avatar(title, conv.id, { group: isGroup, online: isGroup ? undefined : !!state.users.get(conv.id)?.online }),
    { id: 'chat-avatar' }));
  if (isGroup) {
    const g = state.groups.get(conv.id);
    $('chat-sub').textContent = g
      ? `Group ${g.id} · ${g.members} member${g.members === 1 ? '' : 's'} · others join with number ${g.id}`
      : `Group ${conv.id}`;
  } else {
    $('chat-sub').textContent = statusText(state.users.get(conv.id));
  }
  $('members').hidden = !isGroup;
  $('leave').hidden = !isGroup;
  $('block').hidden = isGroup;
  $('block').textContent = state.blocked.has(conv.id) ? 'Unblock' : 'Block';
  $('load-older').hidden = !conv.more;
  const typing = typingText(conv);
  $('typing').hidden = !typing;
  $('typing').textContent = typing;

  const box = $('messages');
  const nearBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  const nodes = [];
  let prev = null;
  for (const m of conv.messages) {
    const day = new Date(m.ts).toDateString();
    if (!prev || new Date(prev.ts).toDateString() !== day) {
      nodes.push(el('div', 'day', dayLabel(m.ts)));
      prev = null;
    }
    const mine = m.sender_id === state.me.id;
    const first = !prev || prev.sender_id !== m.sender_id || m.ts - prev.ts > GROUPING_MS;
    const row = el('div', `msg ${mine ? 'mine' : 'theirs'}${first ? ' first' : ''} ${m.status}`);
    row.dataset.testid = 'message';
    if (m.msg_id != null) row.dataset.msgId = idKey(m.msg_id);
    if (!mine) {
      const a = avatar(m.sender_name, m.sender_id);
      if (!first) a.classList.add('spacer');
      row.append(a);
    }
    const bubble = el('div', 'bubble');
    if (!mine && isGroup && first) {
      const sender = el('div', 'sender', m.sender_name);
      sender.style.setProperty('--hue', hue(m.sender_id));
      bubble.append(sender);
    }
    if (m.reply) bubble.append(quoteBlock(conv, m));
    if (m.recalled) {
      const gone = el('div', 'text recalled', 'message recalled');
      gone.dataset.testid = 'recalled';
      bubble.append(gone);
      row.classList.add('recalled');
    } else if ((m.type === 'image' || m.type === 'file') && (m.fields?.file_id || m.localUrl || m.status !== 'sent')) {
      bubble.append(...fileBlock(m));
    } else {
      bubble.append(textWithMentions(conv, m));
    }
    const meta = el('div', 'meta');
    if (m.edited_at && !m.recalled) {
      const edited = el('span', 'edited', 'edited');
      edited.dataset.testid = 'edited';
      edited.title = `edited ${sinceText(m.edited_at)}`;
      meta.append(edited);
    }
    meta.append(el('time', '', timeFormat.format(new Date(m.ts))));
    if (mine) {
      const reach = tick(conv, m);
      const [mark, label] = TICKS[reach];
      const status = el('span', `status ${reach}`, mark);
      status.title = label;
      status.setAttribute('aria-label', label);
      status.dataset.testid = 'tick';
      row.dataset.tick = reach;
      meta.append(status);
    }
    if (m.status === 'failed') {
      bubble.title = m.error || 'not sent';
      bubble.addEventListener('click', () => retry(conv, m));
    }
    bubble.append(meta);
    const column = el('div', 'bubble-column');
    column.append(bubble);
    const reactions = reactionsRow(conv, m);
    if (reactions) column.append(reactions);
    row.append(column);
    if (m.msg_id != null && m.status !== 'failed') {
      const more = el('button', 'msg-menu-button', '⋯');
      more.type = 'button';
      more.dataset.testid = 'msg-menu';
      more.title = 'More';
      more.setAttribute('aria-label', 'More actions');
      more.addEventListener('click', (event) => { event.stopPropagation(); toggleMenu(m, more); });
      row.append(more);
      if (state.menuFor === idKey(m.msg_id)) {
        row.classList.add('menu-open');
        row.append(messageMenu(conv, m));
      }
    }
    nodes.push(row);
    prev = m;
  }
  $('message-list').replaceChildren(...nodes);
  renderComposeBar(conv);
  if (opts.keepFromBottom) box.scrollTop = box.scrollHeight - opts.keepFromBottom;
  else if (opts.toBottom || nearBottom) box.scrollTop = box.scrollHeight;
}

function retry(conv, msg) {
  conv.messages.splice(conv.messages.indexOf(msg), 1);
  conv.byClient.delete(msg.client_msg_id);
  if (msg.upload) { sendFile(conv, msg.upload); return; }
  sendText(conv, msg.text, { reply_to: msg.reply_to, type: msg.type, fields: msg.fields });
}

// The quote of a message, as the server's `reply` is.
function quoteOf(m) {
  return {
    msg_id: m.msg_id, sender_id: m.sender_id, sender_name: m.sender_name,
    snippet: m.recalled ? '' : snippet(m.text), recalled: !!m.recalled,
  };
}

// -- files and images: upload over HTTP, then a message of type 'file' or 'image' ----------------

const sizeText = (n) => (n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KB`
  : `${(n / 1048576).toFixed(1)} MB`);

// The server's answer to a refused upload or download: {code, message} (perhaps under error).
async function httpError(res) {
  let body = null;
  try { body = await res.json(); } catch { /* not JSON */ }
  const e = body?.error ?? body ?? {};
  return new RequestFailed(e.code || `http_${res.status}`, e.message || `the server answered ${res.status}`);
}

// Uploads one file (streamed from the browser's Blob), then sends a message that refers to it.
// A placeholder shows meanwhile, with the local preview of an image.
async function sendFile(conv, file) {
  const image = /^image\//.test(file.type);
  const name = file.name || (image ? `image.${(file.type.split('/')[1] || 'png').replace(/\W/g, '')}` : 'file');
  const localUrl = image ? URL.createObjectURL(file) : null;
  const placeholder = {
    msg_id: null, client_msg_id: newClientMsgId(), kind: conv.kind, sender_id: state.me.id,
    sender_name: state.me.name, to: conv.id, text: name, ts: Date.now(), status: 'pending',
    type: image ? 'image' : 'file', fields: { name, size: file.size, content_type: file.type }, localUrl,
  };
  addMessage(conv, placeholder);
  render({ toBottom: true });
  let info;
  try {
    const res = await fetch(`${FILES_URL}?name=${encodeURIComponent(name)}`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${state.token}`, 'Content-Type': file.type || 'application/octet-stream' },
      body: file,
    });
    if (!res.ok) throw await httpError(res);
    info = await res.json();
  } catch (err) {
    Object.assign(placeholder, { status: 'failed', error: err.message || String(err), upload: file });
    toast(`Could not send ${name}: ${err.message || err}`);
    render();
    return;
  }
  conv.messages.splice(conv.messages.indexOf(placeholder), 1);
  conv.byClient.delete(placeholder.client_msg_id);
  const type = image && info.width ? 'image' : 'file';
  const fields = { file_id: info.file_id, name: info.name, size: info.size, content_type: info.content_type };
  if (type === 'image') Object.assign(fields, { width: info.width, height: info.height });
  // The file's own blob is its preview here: nothing to download again.
  if (localUrl) blobs.set(String(info.file_id), { url: localUrl });
  if (localUrl && info.thumbnail) blobs.set(`${info.file_id}/thumbnail`, { url: localUrl });
  const fallback = `${type === 'image' ? '[image]' : '[file]'} ${info.name} (${sizeText(info.size)})`;
  await sendText(conv, fallback, { type, fields });
}

// A blob: URL of a stored file (or its thumbnail), fetched with the login token: an <img> or a
// link cannot send the Authorization header the download needs. Kept for the page's life.
function blobUrl(fileId, thumbnail, onReady) {
  const key = thumbnail ? `${fileId}/thumbnail` : String(fileId);
  const known = blobs.get(key);
  if (known?.url) return known.url;
  if (known) return null; // loading, or failed
  blobs.set(key, { loading: true });
  (async () => {
    try {
      const res = await fetch(`${FILES_URL}/${fileId}${thumbnail ? '/thumbnail' : ''}`, {
        headers: { Authorization: `Bearer ${state.token}` },
      });
      if (!res.ok) throw await httpError(res);
      blobs.set(key, { url: URL.createObjectURL(await res.blob()) });
    } catch (err) {
      blobs.set(key, { error: err.message || String(err) });
    }
    onReady();
  })();
  return null;
}

async function download(fileId, name) {
  const url = blobUrl(fileId, false, () => download(fileId, name));
  if (!url) {
    const known = blobs.get(String(fileId));
    if (known?.error) { blobs.delete(String(fileId)); toast(`Could not download ${name}: ${known.error}`); }
    return;
  }
  const a = el('a');
  a.href = url;
  a.download = name || 'file';
  document.body.append(a);
  a.click();
  a.remove();
}

// The body of a file or image message: the preview, and a download link.
function fileBlock(m) {
  const f = m.fields ?? {};
  const nodes = [];
  if (m.type === 'image') {
    const box = el('div', 'image-box');
    box.dataset.testid = 'image-box';
    let url = m.localUrl ?? (f.file_id ? blobUrl(f.file_id, true, () => render()) : null);
    let failed = f.file_id && blobs.get(`${f.file_id}/thumbnail`)?.error;
    if (failed && (f.size || 0) <= PREVIEW_MAX_BYTES) {
      // No thumbnail (the server makes none of a very large image): a small one shows whole.
      url = blobUrl(f.file_id, false, () => render());
      failed = blobs.get(String(f.file_id))?.error;
    }
    if (url) {
      const img = el('img');
      img.src = url;
      img.alt = f.name || 'image';
      img.dataset.testid = 'image';
      if (f.width && f.height) { img.width = f.width; img.height = f.height; }
      box.append(img);
    } else {
      box.append(el('span', 'image-missing', failed ? 'image unavailable' : 'loading image…'));
    }
    nodes.push(box);
  }
  if (f.file_id) {
    const link = el('a', 'file-link');
    link.href = `${FILES_URL}/${f.file_id}`;
    link.dataset.testid = 'file-link';
    link.append(`${m.type === 'image' ? '' : '📄 '}${f.name || 'file'}`, el('span', 'file-size', sizeText(f.size || 0)));
    link.addEventListener('click', (event) => { event.preventDefault(); download(f.file_id, f.name); });
    nodes.push(link);
  } else if (m.type === 'file') {
    nodes.push(el('span', 'file-link', `📄 ${f.name || m.text}`));
  }
  return nodes;
}

function sendFiles(files) {
  const conv = state.active && state.convs.get(state.active);
  if (!conv) return;
  for (const file of files) sendFile(conv, file);
}

// -- a message's menu: reply, react, edit, recall, delete for me ---------------------------------

function canRecall(conv, m) {
  if (m.msg_id == null || m.recalled) return false;
  if (m.sender_id === state.me.id) return true;
  return conv.kind === 'group' && rank(state.groups.get(conv.id)?.role) > 0;
}

// Opens (or closes) a message's menu: above the message, or below it when there is no room
// above in the conversation's view.
function toggleMenu(m, button) {
  const key = idKey(m.msg_id);
  state.menuFor = state.menuFor === key ? null : key;
  const room = button.getBoundingClientRect().top - $('messages').getBoundingClientRect().top;
  state.menuBelow = room < MENU_ROOM_PX;
  render();
}

function messageMenu(conv, m) {
  const menu = el('div', state.menuBelow ? 'msg-menu below' : 'msg-menu');
  menu.dataset.testid = 'menu';
  menu.setAttribute('role', 'menu');
  const item = (text, testid, onClick, danger = false) => {
    const b = el('button', danger ? 'danger' : '', text);
    b.type = 'button';
    b.dataset.testid = testid;
    b.setAttribute('role', 'menuitem');
    b.addEventListener('click', (event) => {
      event.stopPropagation();
      state.menuFor = null;
      onClick();
      render();
    });
    return b;
  };
  if (!m.recalled) {
    const emojis = el('div', 'emoji-row');
    for (const emoji of QUICK_EMOJI) {
      const b = item(emoji, 'menu-react', () => toggleReaction(conv, m, emoji));
      b.dataset.emoji = emoji;
      b.title = `React with ${emoji}`;
      emojis.append(b);
    }
    menu.append(emojis);
    menu.append(item('Reply', 'menu-reply', () => startCompose(conv, m, 'reply')));
  }
  if (m.sender_id === state.me.id && !m.recalled && (!m.type || m.type === 'text')) {
    menu.append(item('Edit', 'menu-edit', () => startCompose(conv, m, 'edit')));
  }
  if (canRecall(conv, m)) menu.append(item('Recall', 'menu-recall', () => recallMessage(conv, m), true));
  menu.append(item('Delete for me', 'menu-delete', () => deleteForMe(conv, m), true));
  return menu;
}

// A request that changes a message; a refusal is a toast (the message stays as it is).
async function change(type, body) {
  try {
    if (!state.link?.live) throw new RequestFailed('closed', 'not connected');
    return await state.link.request(type, body);
  } catch (err) {
    toast(err.code === 'window_passed' ? 'Too late to change this message.'
      : err.code === 'closed' ? 'Not connected: try again in a moment.' : err.message || err.code);
    return null;
  }
}

// The server took this page's own change (its SendAck): shown at once; the same event pushed
// to this device later changes nothing more.
function applyOwn(conv, m, ack, e) {
  if (!ack) return;
  changed(conv, { ...e, target: m.msg_id, sender_id: state.me.id, ts: ack.ts, seq: ack.seq });
  render();
}

async function toggleReaction(conv, m, emoji) {
  const on = !(m.reactions?.[emoji] ?? []).includes(state.me.id);
  const ack = await change(T.REACT, { msg_id: idNum(m.msg_id), emoji, on });
  applyOwn(conv, m, ack, { op: on ? 'react' : 'unreact', emoji });
}

async function recallMessage(conv, m) {
  applyOwn(conv, m, await change(T.RECALL_MESSAGE, { msg_id: idNum(m.msg_id) }), { op: 'recall' });
}

async function deleteForMe(conv, m) {
  if (await change(T.DELETE_FOR_ME, { msg_ids: [idNum(m.msg_id)] })) onHidden({ msg_ids: [m.msg_id] });
}

// The composer answers (reply) or rewrites (edit) one message.
function startCompose(conv, m, mode) {
  state.compose = { mode, key: conv.key, msgId: idKey(m.msg_id) };
  const input = $('composer-input');
  if (mode === 'edit') input.value = m.text;
  fitComposer();
  input.focus();
  render();
}

function closeCompose() {
  const wasEdit = state.compose?.mode === 'edit';
  state.compose = null;
  if (wasEdit) { $('composer-input').value = ''; fitComposer(); }
  render();
}

function renderComposeBar(conv) {
  const c = state.compose;
  const m = c && c.key === conv.key ? conv.byId.get(c.msgId) : null;
  $('compose-bar').hidden = !m;
  if (!m) return;
  $('compose-bar').dataset.mode = c.mode;
  $('compose-bar-title').textContent = c.mode === 'edit' ? 'Edit message'
    : `Reply to ${m.sender_id === state.me.id ? 'yourself' : m.sender_name}`;
  $('compose-bar-snippet').textContent = m.recalled ? 'message recalled' : snippet(m.text);
}

// What the composer sends: a new message (perhaps a reply), or an edit.
async function submitComposer(conv, text) {
  const c = state.compose && state.compose.key === conv.key ? state.compose : null;
  state.compose = null;
  if (c?.mode === 'edit') {
    const m = conv.byId.get(c.msgId);
    render();
    if (m && m.text !== text) {
      const ack = await change(T.EDIT_MESSAGE, { msg_id: idNum(m.msg_id), text });
      applyOwn(conv, m, ack, { op: 'edit', text, edited_at: ack?.ts });
    }
    return;
  }
  await sendText(conv, text, c?.mode === 'reply' ? { reply_to: c.msgId } : {});
}

// -- mentions: '@' completion of member names, and highlights -----------------------------------

function memberNames(conv) {
  return (conv.members ?? []).filter((m) => m.id !== state.me.id).map((m) => m.name);
}

// The '@word' being typed before the caret, in a group: offer the members whose name starts so.
function updateMentions() {
  const conv = state.active && state.convs.get(state.active);
  const input = $('composer-input');
  const before = input.value.slice(0, input.selectionStart);
  const m = conv?.kind === 'group' ? /(^|\s)@([^\s@]*)$/.exec(before) : null;
  const prefix = m ? m[2].toLowerCase() : null;
  const items = m ? memberNames(conv).filter((n) => n.toLowerCase().startsWith(prefix)).slice(0, 8) : [];
  state.mention = items.length ? { start: before.length - m[2].length - 1, items, index: 0 } : null;
  renderMentions();
}

function renderMentions() {
  const list = $('mention-list');
  const view = state.mention;
  list.hidden = !view;
  if (!view) { list.replaceChildren(); return; }
  list.replaceChildren(...view.items.map((name, i) => {
    const li = el('li', '', `@${name}`);
    li.setAttribute('role', 'option');
    li.setAttribute('aria-selected', String(i === view.index));
    li.dataset.testid = 'mention-option';
    li.addEventListener('mousedown', (event) => { event.preventDefault(); chooseMention(name); });
    return li;
  }));
}

function chooseMention(name) {
  const view = state.mention;
  const input = $('composer-input');
  if (!view) return;
  const caret = input.selectionStart;
  input.value = `${input.value.slice(0, view.start)}@${name} ${input.value.slice(caret)}`;
  const at = view.start + name.length + 2;
  input.setSelectionRange(at, at);
  state.mention = null;
  renderMentions();
  input.focus();
}

// The text with the `@name`s of mentioned users (and of members) highlighted; nodes, never HTML.
function textWithMentions(conv, m) {
  const names = new Set(conv.kind === 'group' ? (conv.members ?? []).map((x) => x.name) : []);
  for (const id of m.mentions ?? []) if (id !== state.me.id) names.add(nameOf(id, conv));
  names.add(state.me.name);
  const box = el('div', 'text');
  if (conv.kind !== 'group' || !m.text.includes('@')) {
    box.textContent = m.text;
    return box;
  }
  let at = 0;
  for (const match of m.text.matchAll(/@([^\s@]+)/g)) {
    let name = match[1];
    while (name && !names.has(name) && /[.,;:!?)]$/.test(name)) name = name.slice(0, -1);
    if (!names.has(name)) continue;
    box.append(m.text.slice(at, match.index));
    const span = el('span', name === state.me.name ? 'mention me' : 'mention', `@${name}`);
    span.dataset.testid = 'mention';
    box.append(span);
    at = match.index + 1 + name.length;
  }
  box.append(m.text.slice(at));
  return box;
}

// -- reactions under a bubble: counts, who (on hover), a click toggles one's own ------------------

function reactionsRow(conv, m) {
  const entries = Object.entries(m.reactions ?? {}).filter(([, ids]) => ids.length);
  if (!entries.length || m.recalled) return null;
  const row = el('div', 'reactions');
  row.dataset.testid = 'reactions';
  for (const [emoji, ids] of entries) {
    const mine = ids.includes(state.me.id);
    const chip = el('button', mine ? 'reaction mine' : 'reaction', `${emoji} ${ids.length}`);
    chip.type = 'button';
    chip.dataset.testid = 'reaction';
    chip.dataset.emoji = emoji;
    chip.dataset.count = String(ids.length);
    chip.title = ids.map((id) => (id === state.me.id ? 'You' : nameOf(id, conv))).join(', ');
    chip.setAttribute('aria-pressed', String(mine));
    chip.addEventListener('click', () => toggleReaction(conv, m, emoji));
    row.append(chip);
  }
  return row;
}

function quoteBlock(conv, m) {
  const r = m.reply;
  const q = el('div', r.recalled ? 'quote recalled' : 'quote');
  q.dataset.testid = 'quote';
  q.append(el('span', 'quote-sender', r.sender_id === state.me.id ? 'You' : r.sender_name || nameOf(r.sender_id, conv)));
  q.append(el('span', 'quote-snippet', r.recalled ? 'message recalled' : r.snippet));
  q.addEventListener('click', () => {
    const row = document.querySelector(`[data-msg-id="${idKey(r.msg_id)}"]`);
    if (!row) return;
    row.scrollIntoView({ block: 'center' });
    row.classList.add('flash');
    setTimeout(() => row.classList.remove('flash'), 1200);
  });
  return q;
}

// -- small UI pieces ----------------------------------------------------------------------------

let toastTimer = null;
function toast(text) {
  const box = $('toast');
  box.textContent = text;
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { box.hidden = true; }, 4000);
}

function showLoginError(message) {
  const p = $('login-error');
  p.hidden = !message;
  p.textContent = message ?? '';
}

// A small modal: asks for one value (or just shows `content`); resolves to the value or null.
function ask({ title, label, placeholder = '', ok = 'OK', type = 'text', content = null, submit }) {
  const dialog = $('dialog');
  $('dialog-title').textContent = title;
  $('dialog-body').replaceChildren(...(content ? [content] : []));
  $('dialog-field').hidden = !label;
  $('dialog-label').textContent = label ?? '';
  const input = $('dialog-input');
  input.type = type;
  input.value = '';
  input.placeholder = placeholder;
  $('dialog-ok').textContent = ok;
  $('dialog-cancel').hidden = !label;
  const error = $('dialog-error');
  error.hidden = true;
  return new Promise((resolve) => {
    const form = $('dialog-form');
    const finish = (value) => {
      form.onsubmit = null;
      $('dialog-cancel').onclick = null;
      dialog.onclose = null;
      if (dialog.open) dialog.close();
      resolve(value);
    };
    form.onsubmit = async (event) => {
      event.preventDefault();
      if (!label) { finish(true); return; }
      const value = input.value.trim();
      if (!value) return;
      if (!submit) { finish(value); return; }
      try {
        finish(await submit(value));
      } catch (err) {
        error.textContent = err.message || String(err);
        error.hidden = false;
      }
    };
    $('dialog-cancel').onclick = () => finish(null);
    dialog.onclose = () => finish(null);
    dialog.showModal();
    if (label) input.focus();
  });
}

function groupArrived(g) {
  if (g.pending) {
    toast(`Your request to join ${g.name} waits for an admin`);
    return;
  }
  rememberGroup(g);
  openConversation(`g:${g.group_id}`);
}

// A GroupInfo (create, join, options) into the page's state.
function rememberGroup(g) {
  const known = state.groups.get(g.group_id) ?? {};
  state.groups.set(g.group_id, {
    ...known, id: g.group_id, name: g.name, owner_id: g.owner_id, members: g.members,
    role: g.role || known.role || '', invite_only: !!g.invite_only, history_visible: !!g.history_visible,
  });
}

// -- wiring -------------------------------------------------------------------------------------

function wire() {
  $('login-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    const name = $('login-name').value.trim();
    const password = $('login-password').value;
    if (!name || !password) {
      showLoginError('Enter a name and a password.');
      return;
    }
    const button = $('login-button');
    button.disabled = true;
    button.textContent = 'Signing in…';
    showLoginError(null);
    try {
      await connect({ name, password });
      showApp();
    } catch (err) {
      state.me = null;
      showLoginError(err.code === 'login_failed' ? 'Wrong name or password.'
        : err.code === 'closed' ? 'Cannot reach the server. Is it running?'
          : err.message);
    } finally {
      button.disabled = false;
      button.textContent = 'Sign in';
    }
  });

  $('logout').addEventListener('click', async () => {
    try { await state.link?.request(T.LOGOUT, {}, 3000); } catch { /* signing out anyway */ }
    signedOut(null);
  });

  $('show-last-seen').addEventListener('change', async (event) => {
    const box = event.target;
    box.disabled = true;
    try {
      await state.link.request(T.SET_PRIVACY, { show_last_seen: box.checked });
      toast(box.checked ? 'Others see when you were last online' : 'Your last seen is hidden');
    } catch (err) {
      box.checked = !box.checked;
      toast(err.message);
    } finally {
      box.disabled = false;
    }
  });

  $('composer').addEventListener('submit', (event) => {
    event.preventDefault();
    const input = $('composer-input');
    const text = input.value.trim();
    const conv = state.active && state.convs.get(state.active);
    if (!text || !conv) return;
    input.value = '';
    fitComposer();
    state.mention = null;
    renderMentions();
    submitComposer(conv, text);
  });
  $('compose-bar-cancel').addEventListener('click', () => closeCompose());
  $('attach').addEventListener('click', () => $('file-input').click());
  $('file-input').addEventListener('change', (event) => {
    sendFiles([...event.target.files]);
    event.target.value = '';
  });
  $('composer-input').addEventListener('paste', (event) => {
    const files = [...(event.clipboardData?.files ?? [])];
    if (!files.length) return; // text: pasted as usual
    event.preventDefault();
    sendFiles(files);
  });
  const dropZone = $('conversation');
  const carriesFiles = (event) => [...(event.dataTransfer?.types ?? [])].includes('Files');
  dropZone.addEventListener('dragover', (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = 'copy';
    dropZone.classList.add('dropping');
  });
  dropZone.addEventListener('dragleave', (event) => {
    if (!dropZone.contains(event.relatedTarget)) dropZone.classList.remove('dropping');
  });
  dropZone.addEventListener('drop', (event) => {
    dropZone.classList.remove('dropping');
    if (!carriesFiles(event)) return;
    event.preventDefault();
    sendFiles([...event.dataTransfer.files]);
  });
  $('composer-input').addEventListener('keydown', (event) => {
    const view = state.mention;
    if (view && !event.isComposing) {
      if (event.key === 'ArrowDown' || event.key === 'ArrowUp') {
        event.preventDefault();
        const n = view.items.length;
        view.index = (view.index + (event.key === 'ArrowDown' ? 1 : n - 1)) % n;
        renderMentions();
        return;
      }
      if (event.key === 'Enter' || event.key === 'Tab') {
        event.preventDefault();
        chooseMention(view.items[view.index]);
        return;
      }
      if (event.key === 'Escape') {
        state.mention = null;
        renderMentions();
        return;
      }
    }
    if (event.key === 'Escape' && state.compose) {
      closeCompose();
      return;
    }
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $('composer').requestSubmit();
    }
  });
  $('composer-input').addEventListener('input', () => { fitComposer(); composerTyped(); updateMentions(); });
  $('composer-input').addEventListener('blur', () => { state.mention = null; renderMentions(); });
  // A click elsewhere closes a message's menu.
  document.addEventListener('click', () => { if (state.menuFor) { state.menuFor = null; render(); } });
  document.addEventListener('keydown', (event) => {
    if (event.key === 'Escape' && state.menuFor) { state.menuFor = null; render(); }
  });

  $('messages').addEventListener('scroll', () => {
    const conv = state.active && state.convs.get(state.active);
    if (conv && conv.more && $('messages').scrollTop < 40) loadHistory(conv, true);
  });
  $('load-older').addEventListener('click', () => {
    const conv = state.active && state.convs.get(state.active);
    if (conv) loadHistory(conv, true);
  });
  $('back').addEventListener('click', () => {
    sendTyping(state.active && state.convs.get(state.active), false);
    state.active = null;
    $('app').classList.remove('in-chat');
    render();
  });

  $('new-chat').addEventListener('click', async () => {
    const id = await ask({ title: 'New message', label: 'User number', type: 'number', placeholder: 'e.g. 2', ok: 'Open' });
    const n = Number(id);
    if (Number.isInteger(n) && n > 0 && n !== state.me.id) openConversation(`u:${n}`);
  });
  $('new-group').addEventListener('click', () => ask({
    title: 'New group', label: 'Group name', placeholder: 'e.g. weekend plans', ok: 'Create',
    submit: async (name) => groupArrived(await state.link.request(T.CREATE_GROUP, { name })),
  }));
  $('join-group').addEventListener('click', () => ask({
    title: 'Join a group', label: 'Group number or invite link', placeholder: 'the number its members see, or a link', ok: 'Join',
    submit: async (value) => {
      const invite = parseInvite(value);
      const group_id = invite ? invite.group_id : Number(value);
      if (!Number.isInteger(group_id) || group_id <= 0) throw new Error('Enter a group number or an invite link.');
      groupArrived(await state.link.request(T.JOIN_GROUP, invite ? invite : { group_id }));
    },
  }));
  $('members').addEventListener('click', () => openMembers(state.convs.get(state.active)));
  $('block').addEventListener('click', (event) => {
    const conv = state.convs.get(state.active);
    if (conv?.kind === 'p2p') toggleBlock(event.currentTarget, conv.id, convTitle(conv));
  });
  $('leave').addEventListener('click', async () => {
    const conv = state.convs.get(state.active);
    try {
      await state.link.request(T.LEAVE_GROUP, { group_id: conv.id });
      state.groups.delete(conv.id);
      state.convs.delete(conv.key);
      state.active = null;
      $('app').classList.remove('in-chat');
      render();
    } catch (err) {
      toast(err.message);
    }
  });
  document.addEventListener('visibilitychange', () => {
    const conv = state.active && state.convs.get(state.active);
    if (!document.hidden && conv) { markRead(conv); render(); }
  });
}

function fitComposer() {
  const input = $('composer-input');
  input.style.height = 'auto';
  input.style.height = `${Math.min(input.scrollHeight, 160)}px`;
}

function showApp() {
  $('login-screen').hidden = true;
  $('app').hidden = false;
  render();
}

// A product that embeds the page signs its user in with `#jwt=<token>`: the fragment, since
// the browser never sends it to the server (a query string would land in access logs). It is
// read once and taken out of the address bar at once, so it is neither bookmarked nor shared.
// An invite link (`#invite=<group>.<code>`) is a fragment too: the page joins after signing in.
function takeJwtFromFragment() {
  if (!location.hash) return '';
  const invite = parseInvite(location.hash);
  if (invite) state.pendingInvite = invite;
  const jwt = new URLSearchParams(location.hash.slice(1)).get('jwt');
  if (jwt === null && !invite) return ''; // a fragment of someone else's: left alone
  history.replaceState(history.state, '', location.pathname + location.search);
  return (jwt ?? '').trim();
}

async function signInWithJwt(jwt) {
  document.body.dataset.state = 'signing-in';
  try {
    await connect({ jwt });
    showApp();
  } catch (err) {
    state.me = null;
    document.body.dataset.state = 'login';
    $('login-screen').hidden = false;
    // The server's own reason ("the JWT has expired"): the embedding product can act on it.
    showLoginError(err.code === 'closed' ? 'Cannot reach the server. Is it running?'
      : `Sign-in failed: ${err.message}`);
    $('login-name').focus();
  }
}

// The product may sign another user in later by changing the fragment of the page it embeds.
window.addEventListener('hashchange', async () => {
  const jwt = takeJwtFromFragment();
  if (!jwt) {
    if (state.pendingInvite && state.link?.live) joinWithInvite(state.pendingInvite);
    return;
  }
  if (state.me) {
    // The user before is signed out for good: their login token goes too.
    try { await state.link?.request(T.LOGOUT, {}, 3000); } catch { /* signing out anyway */ }
    signedOut(null);
  }
  $('login-screen').hidden = true;
  signInWithJwt(jwt);
});

function start() {
  wire();
  const jwt = takeJwtFromFragment();
  const saved = sessionStorage.getItem('bitchat.session');
  if (jwt) {
    // The product names the user now: that wins over a session this tab had before.
    sessionStorage.removeItem('bitchat.session');
    signInWithJwt(jwt);
  } else if (saved) {
    // A reload: log in again with the token of this tab's session.
    const { token, me } = JSON.parse(saved);
    state.token = token;
    state.me = me;
    document.body.dataset.state = 'reconnecting';
    showApp();
    reconnect();
  } else {
    document.body.dataset.state = 'login';
    $('login-screen').hidden = false;
    $('login-name').focus();
  }
}

start();
