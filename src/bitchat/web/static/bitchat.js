// bitchat.js: the bitchat protocol over a WebSocket, for browsers and Node.js 20+.
//
// One frame per WebSocket message (README "The wire protocol"): a 14-byte header and a JSON
// body. Message ids are 64-bit snowflakes: JSON integers past 2^53 are read as BigInt and
// written back exactly, so an Ack names the very message it clears.
//
// Browsers use globalThis.WebSocket; Node 20 has none, so pass one: `{WebSocket}` from `ws`.
//
//   import { connect } from './bitchat.js';
//   const client = await connect('ws://127.0.0.1:9000/ws', { WebSocket });
//   client.on('message', (m) => console.log(m.sender_name, m.text));
//   await client.login({ name: 'alice', password: 'secret' });
//   await client.sendP2P({ to: 2, text: 'hi' });

/** Packet types (src/bitchat/im/packets.py; 1-3 are the system packets). */
export const T = Object.freeze({
  PING: 1, PONG: 2, ERROR: 3,
  OK: 100, REGISTER: 101, USER_INFO: 102, LOGIN: 103, LOGIN_OK: 104, LOGOUT: 105,
  LIST_ONLINE: 106, ONLINE_USERS: 107,
  SEND_P2P: 110, SEND_GROUP: 111, SEND_ACK: 112, CHAT: 113, ACK: 114,
  CREATE_GROUP: 120, GROUP_INFO: 121, JOIN_GROUP: 122, LEAVE_GROUP: 123, MY_GROUPS: 124,
  GROUP_LIST: 125, GROUP_MEMBERS: 126, MEMBER_LIST: 127, HISTORY: 130, HISTORY_PAGE: 131,
  PRESENCE: 140, TYPING: 142, TYPING_EVENT: 143, SET_PRIVACY: 144,
  GET_CONVERSATIONS: 160, CONVERSATION_LIST: 161, MARK_READ: 162, READ_STATE: 163, RECEIPT: 164,
  GET_RECEIPTS: 165, RECEIPTS: 166,
  SET_ROLE: 170, KICK_MEMBER: 171, BAN_MEMBER: 172, MUTE_MEMBER: 173, SET_GROUP_OPTIONS: 174,
  CREATE_INVITE: 175, INVITE_INFO: 176, ADD_MEMBER: 177, GET_JOIN_REQUESTS: 178,
  JOIN_REQUEST_LIST: 179, ANSWER_JOIN_REQUEST: 180, GROUP_EVENT: 181,
  BLOCK: 182, GET_BLOCKED: 183, BLOCKED_LIST: 184,
  EDIT_MESSAGE: 190, RECALL_MESSAGE: 191, REACT: 192, DELETE_FOR_ME: 193, GET_VERSIONS: 194,
  VERSIONS: 195, GET_REACTIONS: 196, REACTION_LIST: 197, HIDDEN: 198,
});

/** Header flags. */
export const FLAGS = Object.freeze({ POOL: 1, RESPONSE: 2, ERROR: 4 });

export const MAGIC = 0xbc;
export const VERSION = 1;
export const SER_JSON = 1;
export const HEADER_SIZE = 14;

const HEARTBEAT_MS = 5000;       // a Ping every 5 s
const DEAD_AFTER_MS = 16000;     // nothing heard for this long: the link is dead
const REQUEST_TIMEOUT_MS = 10000;
const SEND_TIMEOUT_MS = 30000;   // a send waits this long in all, reconnects included
const SEND_RETRIES = 3;          // resends of one message after a lost connection
const ACK_DELAY_MS = 25;
const ACK_MAX_IDS = 512;         // ids per Ack: within the server's max_ack_ids (1024 by default)
const RECONNECT_INITIAL_MS = 500;
const RECONNECT_MAX_MS = 10000;

const utf8in = new TextDecoder();
const utf8out = new TextEncoder();

// -- JSON that keeps 64-bit integers exact ------------------------------------------------------

// Where the engine lacks JSON source access (Node 20), big integers travel through a string
// marker: U+0000 never appears in a string the server sends (it refuses them).
const BIG = '\u0000bigint:';
const RAW_JSON = /** @type {any} */ (JSON).rawJSON; // not in every engine's JSON yet
const NATIVE_JSON = typeof RAW_JSON === 'function';

/**
 * JSON.parse, but integers past 2^53 come back as BigInt (exact).
 * @param {string} text
 * @returns {any}
 */
export function parseJSON(text) {
  if (NATIVE_JSON) {
    // The reviver's third argument (the source text) is newer than the JSON typings.
    const reviver = /** @type {any} */ ((/** @type {string} */ key, /** @type {any} */ value, /** @type {any} */ ctx) => {
      if (typeof value === 'number' && !Number.isSafeInteger(value) && ctx &&
          typeof ctx.source === 'string' && /^-?\d+$/.test(ctx.source)) {
        return BigInt(ctx.source);
      }
      return value;
    });
    return JSON.parse(text, reviver);
  }
  return JSON.parse(markBigIntegers(text), (key, value) =>
    (typeof value === 'string' && value.startsWith(BIG) ? BigInt(value.slice(BIG.length)) : value));
}

/**
 * The text with every integer literal past 2^53 (outside strings) quoted as a marker.
 * @param {string} text
 */
function markBigIntegers(text) {
  if (!/\d{16}/.test(text)) return text;
  let out = '';
  let i = 0;
  const n = text.length;
  while (i < n) {
    const c = text[i];
    if (c === '"') {
      let j = i + 1;
      while (j < n && text[j] !== '"') j += text[j] === '\\' ? 2 : 1;
      out += text.slice(i, j + 1);
      i = j + 1;
    } else if (c === '-' || (c >= '0' && c <= '9')) {
      let j = i + 1;
      while (j < n && /[0-9eE.+-]/.test(text[j])) j += 1;
      const literal = text.slice(i, j);
      if (/^-?\d{16,}$/.test(literal) && !Number.isSafeInteger(Number(literal))) {
        out += `"\\u0000bigint:${literal}"`;
      } else {
        out += literal;
      }
      i = j;
    } else {
      out += c;
      i += 1;
    }
  }
  return out;
}

/**
 * JSON.stringify, writing BigInt values as exact integers.
 * @param {any} value
 * @returns {string}
 */
export function stringifyJSON(value) {
  if (NATIVE_JSON) {
    return JSON.stringify(value, (key, v) => (typeof v === 'bigint' ? RAW_JSON(v.toString()) : v));
  }
  const text = JSON.stringify(value, (key, v) => (typeof v === 'bigint' ? BIG + v.toString() : v));
  return text.includes('\\u0000bigint:') ? text.replace(/"\\u0000bigint:(-?\d+)"/g, '$1') : text;
}

// -- frames -------------------------------------------------------------------------------------

/**
 * @typedef {object} Frame
 * @property {number} flags  FLAGS bits
 * @property {number} type   packet type (T)
 * @property {number} requestId  0 for a push or a one-way packet
 * @property {any} body      the packet's fields
 */

/**
 * One frame: the 14-byte header and the JSON body.
 * @param {number} type
 * @param {number} requestId
 * @param {object} [body]
 * @param {number} [flags]
 * @returns {Uint8Array}
 */
export function encodeFrame(type, requestId, body, flags = 0) {
  const payload = utf8out.encode(stringifyJSON(body ?? {}));
  const bytes = new Uint8Array(HEADER_SIZE + payload.length);
  const view = new DataView(bytes.buffer);
  view.setUint8(0, MAGIC);
  view.setUint8(1, VERSION);
  view.setUint8(2, SER_JSON);
  view.setUint8(3, flags);
  view.setUint16(4, type);
  view.setUint32(6, requestId);
  view.setUint32(10, payload.length);
  bytes.set(payload, HEADER_SIZE);
  return bytes;
}

/**
 * Decodes one frame (a whole WebSocket message).
 * @param {ArrayBuffer | ArrayBufferView} data
 * @returns {Frame}
 */
export function decodeFrame(data) {
  const bytes = ArrayBuffer.isView(data)
    ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
    : new Uint8Array(data);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (bytes.byteLength < HEADER_SIZE || view.getUint8(0) !== MAGIC || view.getUint8(1) !== VERSION) {
    throw new Error('not a bitchat frame');
  }
  if (view.getUint8(2) !== SER_JSON) throw new Error('unexpected serializer');
  const length = view.getUint32(10);
  if (HEADER_SIZE + length !== bytes.byteLength) throw new Error('a message must hold one frame');
  const text = utf8in.decode(bytes.subarray(HEADER_SIZE));
  return {
    flags: view.getUint8(3),
    type: view.getUint16(4),
    requestId: view.getUint32(6),
    body: text ? parseJSON(text) : {},
  };
}

/** A request answered with an Error (`code` is the server's), or not answered: `closed`, `timeout`. */
export class RequestFailed extends Error {
  /** @param {string} code @param {string} [message] */
  constructor(code, message) {
    super(message || code);
    this.name = 'RequestFailed';
    /** @type {string} */
    this.code = code;
  }
}

/** A random client_msg_id (32 hex digits); getRandomValues works on plain http too. */
export function newClientMsgId() {
  const bytes = globalThis.crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

// -- one WebSocket connection: requests, pushes, heartbeat ---------------------------------------

/**
 * @typedef {object} LinkOptions
 * @property {(type: number, body: any, link: Link) => void} [onPush]
 * @property {(link: Link, code: number, reason: string) => void} [onClose]
 * @property {any} [WebSocket]  a WebSocket class (Node: `ws`); default globalThis.WebSocket
 * @property {number} [heartbeatMs]
 * @property {number} [deadAfterMs]
 * @property {number} [requestTimeoutMs]
 */

/** One WebSocket connection: requests and their answers, pushes, a heartbeat. No login. */
export class Link {
  /** @param {string} url @param {LinkOptions} [options] */
  constructor(url, options = {}) {
    this.url = url;
    this.onPush = options.onPush ?? (() => {});
    this.onClose = options.onClose ?? (() => {});
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (!this.WebSocket) throw new Error('no WebSocket: pass {WebSocket} (in Node, from the ws package)');
    this.heartbeatMs = options.heartbeatMs ?? HEARTBEAT_MS;
    this.deadAfterMs = options.deadAfterMs ?? DEAD_AFTER_MS;
    this.requestTimeoutMs = options.requestTimeoutMs ?? REQUEST_TIMEOUT_MS;
    this.ws = null;
    this.nextId = 1;
    this.pending = new Map();
    this.lastHeard = 0;
    /** @type {ReturnType<typeof setInterval> | undefined} */
    this.heartbeat = undefined;
    this.ended = false;
    this.live = false; // logged in on this link: a drop means reconnect
    /** @type {Array<number|bigint>} message ids to ack on this link (acks count per connection) */
    this.toAck = [];
    /** @type {RequestFailed | null} why the server closed this link, if it said (an Error push) */
    this.closeReason = null;
  }

  /**
   * Opens the WebSocket; rejects with RequestFailed('closed') if it cannot.
   * @returns {Promise<void>}
   */
  open() {
    return /** @type {Promise<void>} */ (new Promise((resolve, reject) => {
      let opened = false;
      const ws = new this.WebSocket(this.url);
      ws.binaryType = 'arraybuffer';
      this.ws = ws;
      ws.onopen = () => {
        opened = true;
        this.lastHeard = Date.now();
        this.heartbeat = setInterval(() => this.beat(), this.heartbeatMs);
        resolve();
      };
      ws.onmessage = (/** @type {{data: ArrayBuffer}} */ event) => {
        this.lastHeard = Date.now();
        this.receive(event.data);
      };
      ws.onclose = (/** @type {{code: number, reason: string}} */ event) => {
        if (!opened) reject(new RequestFailed('closed', 'could not connect'));
        this.end(event.code, event.reason);
      };
      ws.onerror = () => {}; // a close event follows
    }));
  }

  get isOpen() {
    return !this.ended && !!this.ws && this.ws.readyState === 1; // OPEN
  }

  beat() {
    if (Date.now() - this.lastHeard > this.deadAfterMs) {
      // The server answers every Ping: this silence means the link is gone.
      this.close(4000, 'heartbeat lost');
      return;
    }
    this.send(T.PING, {});
  }

  /** @param {ArrayBuffer | ArrayBufferView} data */
  receive(data) {
    let frame;
    try {
      frame = decodeFrame(data);
    } catch (err) {
      console.warn('bitchat: dropped a message:', err);
      return;
    }
    if (frame.flags & FLAGS.RESPONSE) {
      if (frame.type === T.PONG) return;
      const waiter = this.pending.get(frame.requestId);
      if (waiter) {
        this.pending.delete(frame.requestId);
        clearTimeout(waiter.timer);
        if (frame.flags & FLAGS.ERROR) waiter.reject(new RequestFailed(frame.body.code, frame.body.message));
        else waiter.resolve(frame.body);
      } else if (frame.flags & FLAGS.ERROR) {
        // An Error that answers no request: the server says why it closes the connection
        // (`logged_out`, `banned`, ...). Kept for the close handler.
        if (frame.requestId === 0) this.closeReason = new RequestFailed(frame.body.code, frame.body.message);
        else console.warn('bitchat: server error', frame.body);
      }
      return;
    }
    this.onPush(frame.type, frame.body, this);
  }

  /**
   * A request: resolves to the answer's body, rejects with RequestFailed.
   * @param {number} type @param {object} body @param {number} [timeout] ms
   * @returns {Promise<any>}
   */
  request(type, body, timeout = this.requestTimeoutMs) {
    if (!this.isOpen) return Promise.reject(new RequestFailed('closed', 'not connected'));
    const requestId = this.nextId;
    this.nextId = this.nextId >= 0xffffffff ? 1 : this.nextId + 1;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(requestId);
        reject(new RequestFailed('timeout', 'the server did not answer in time'));
      }, timeout);
      this.pending.set(requestId, { resolve, reject, timer });
      this.ws.send(encodeFrame(type, requestId, body));
    });
  }

  /**
   * A one-way packet (request id 0); dropped when not connected.
   * @param {number} type @param {object} body
   */
  send(type, body) {
    if (this.isOpen) this.ws.send(encodeFrame(type, 0, body));
  }

  close(code = 1000, reason = '') {
    if (this.ws) {
      try { this.ws.close(code, reason); } catch { /* already closing */ }
    }
    this.end(code, reason);
  }

  /** @param {number} code @param {string} reason */
  end(code, reason) {
    if (this.ended) return;
    this.ended = true;
    clearInterval(this.heartbeat);
    for (const waiter of this.pending.values()) {
      clearTimeout(waiter.timer);
      waiter.reject(new RequestFailed('closed', 'the connection closed'));
    }
    this.pending.clear();
    this.onClose(this, code, reason);
  }
}

// -- the client: login, sends that survive reconnects, pushes, acks -------------------------------

/**
 * @typedef {number | bigint} Id  a message id: BigInt past 2^53
 *
 * @typedef {object} ClientOptions
 * @property {any} [WebSocket]  a WebSocket class (Node 20: `import { WebSocket } from 'ws'`)
 * @property {string} [device]  this device's stable id (Login.device); kept from LoginOk
 * @property {string} [jwt]     a JWT the product's backend signed: `login({})` logs in with it
 * @property {boolean} [autoAck=true]  ack every pushed ChatMessage once the handlers ran
 * @property {boolean} [reconnect=true]  reconnect (backoff) and log in again with the token
 * @property {number} [reconnectInitialMs=500]
 * @property {number} [reconnectMaxMs=10000]
 * @property {number} [heartbeatMs=5000]
 * @property {number} [deadAfterMs=16000]
 * @property {number} [requestTimeoutMs=10000]
 *
 * @typedef {object} LoginOk
 * @property {number} user_id
 * @property {string} name
 * @property {string} token
 * @property {number} pending
 * @property {boolean} show_last_seen
 * @property {string} device
 *
 * @typedef {object} SendAck
 * @property {Id} msg_id
 * @property {number} ts
 * @property {string} client_msg_id
 * @property {boolean} duplicate
 * @property {number} seq
 *
 * @typedef {object} ChatMessage  a message, or an event that changes one (`op`)
 * @property {Id} msg_id
 * @property {'p2p'|'group'} kind
 * @property {number} sender_id  (an event: who did it)
 * @property {string} sender_name
 * @property {number} to
 * @property {string} text  (an edit event: the target's new text)
 * @property {number} ts
 * @property {string} client_msg_id
 * @property {number} seq
 * @property {''|'edit'|'recall'|'react'|'unreact'} [op]  '' for a message
 * @property {Id} [target]  an event: the message it changes
 * @property {string} [type]  a message's kind: 'text', 'file', 'image' or one an application registered
 * @property {Record<string, any>} [fields]  the kind's fields (text is the fallback an old client shows)
 * @property {Id} [reply_to]  the message this one quotes (0: none)
 * @property {ReplyQuote | null} [reply]  that message as it is now
 * @property {number} [edited_at]  Unix ms of the last edit (0: never)
 * @property {boolean} [recalled]  taken back by its sender (or a group admin): no text
 * @property {string} [emoji]  a react/unreact event's emoji
 * @property {Record<string, number[]>} [reactions]  emoji -> the ids of who reacted with it
 * @property {number[]} [mentions]  the ids of the users its `@name`s mention
 *
 * @typedef {object} ReplyQuote
 * @property {Id} msg_id
 * @property {number} sender_id
 * @property {string} sender_name
 * @property {string} snippet  the start of its current text ('' once recalled)
 * @property {boolean} recalled
 *
 * @typedef {object} Versions  the earlier texts of one's own message, oldest first
 * @property {Id} msg_id
 * @property {Array<{text: string, ts: number}>} versions
 *
 * @typedef {object} ReactionList
 * @property {Id} msg_id
 * @property {Array<{emoji: string, users: Array<{id: number, name: string}>}>} reactions
 *
 * @typedef {object} Hidden  a push to the user's own devices: messages deleted for them
 * @property {Id[]} msg_ids
 *
 * @typedef {object} FileInfo  an upload's answer
 * @property {string} file_id
 * @property {string} name
 * @property {number} size  bytes
 * @property {string} content_type
 * @property {number} width  images: pixels (else 0)
 * @property {number} height
 * @property {boolean} thumbnail  a thumbnail can be downloaded
 *
 * @typedef {object} SendOptions
 * @property {Id} [reply_to]  quote this message (same conversation)
 * @property {string} [type]  default 'text'
 * @property {Record<string, any>} [fields]  the type's fields
 * @property {string} [client_msg_id]
 * @property {number} [retries]
 * @property {number} [timeoutMs]
 *
 * @typedef {object} HistoryPage
 * @property {ChatMessage[]} messages
 * @property {boolean} more
 *
 * @typedef {object} ConversationList
 * @property {Array<object>} conversations
 * @property {boolean} more
 *
 * @typedef {object} ReadState
 * @property {number} peer_id
 * @property {number} group_id
 * @property {number} read_seq
 * @property {number} unread
 *
 * @typedef {object} Receipt
 * @property {'delivered'|'read'} kind
 * @property {number} user_id
 * @property {string} name
 * @property {number} seq
 * @property {number} group_id
 *
 * @typedef {object} TypingEvent
 * @property {number} user_id
 * @property {string} name
 * @property {number} to
 * @property {number} group_id
 * @property {boolean} typing
 * @property {number} expires_in
 *
 * @typedef {object} Presence
 * @property {number} user_id
 * @property {string} name
 * @property {boolean} online
 * @property {number} last_seen
 *
 * @typedef {'owner'|'admin'|'member'} Role  a group member's role; one owner per group
 *
 * @typedef {object} GroupInfo
 * @property {number} group_id
 * @property {string} name
 * @property {number} owner_id
 * @property {number} members
 * @property {boolean} invite_only  joining needs an invite (or an admin's approval)
 * @property {boolean} history_visible  a new member sees the whole history
 * @property {Role|''} role  the asker's role; '' if not a member
 * @property {boolean} pending  a join of an invite-only group without an invite: a request waits
 *
 * @typedef {object} Member
 * @property {number} id
 * @property {string} name
 * @property {boolean} online
 * @property {number|null} last_seen  Unix ms of an offline member who shows it
 * @property {Role} role
 * @property {number} muted_until  Unix ms; 0 when not muted
 *
 * @typedef {object} MemberList
 * @property {number} group_id
 * @property {Member[]} members
 *
 * @typedef {object} InviteInfo
 * @property {number} group_id
 * @property {string} code  joinGroup(group_id, code) lets its holder in
 * @property {number} expires_at  Unix ms
 * @property {number} max_uses  0: unlimited
 *
 * @typedef {object} JoinRequestList
 * @property {number} group_id
 * @property {Array<{user_id: number, name: string, ts: number}>} requests  oldest first
 *
 * @typedef {object} BlockedList
 * @property {Array<{id: number, name: string}>} users
 *
 * @typedef {'member_added'|'member_removed'|'kicked'|'banned'|'unbanned'|'muted'|'unmuted'|'role'|'options'|'join_requested'} GroupEventKind
 *
 * @typedef {object} GroupEvent  a push to a group's members, and to the user it concerns
 * @property {number} group_id
 * @property {GroupEventKind} event
 * @property {number} user_id  whom it concerns
 * @property {number} by_id    who did it (0: the server)
 * @property {Role|''} role    the new role ('role')
 * @property {number} until    Unix ms ('muted')
 * @property {string} user_name  the name of user_id
 * @property {string} by_name    the name of by_id ('' for the server)
 *
 * @typedef {'message'|'edit'|'recall'|'reaction'|'hidden'|'receipt'|'readState'|'typing'|'presence'|'groupEvent'|'push'|'login'|'disconnect'|'loggedOut'} EventName
 */

/** Codes of an Error push after which the client must not log in again by itself. */
export const STAY_OUT = new Set(['logged_out', 'banned']);

/** @type {Map<number, EventName>} */
const PUSH_EVENTS = new Map([
  [T.CHAT, 'message'], [T.RECEIPT, 'receipt'], [T.READ_STATE, 'readState'],
  [T.TYPING_EVENT, 'typing'], [T.PRESENCE, 'presence'], [T.GROUP_EVENT, 'groupEvent'],
  [T.HIDDEN, 'hidden'],
]);

/** The event a pushed ChatMessage is, by its `op`: a message, or a change to one. */
const OP_EVENTS = new Map([
  ['', 'message'], ['edit', 'edit'], ['recall', 'recall'], ['react', 'reaction'], ['unreact', 'reaction'],
]);

/**
 * A bitchat client: one connection at a time, logged in again after every drop.
 *
 * Events (`on(name, handler)`): `message` (ChatMessage), `edit` (ChatMessage, op 'edit':
 * `target` now reads `text`), `recall` (op 'recall': `target` was taken back), `reaction`
 * (op 'react' or 'unreact': `sender_id` put or took `emoji` on `target`), `hidden` (Hidden:
 * deleted for this user on another device), `receipt` (Receipt), `readState`
 * (ReadState), `typing` (TypingEvent), `presence` (Presence), `groupEvent` (GroupEvent: a
 * member added, removed, kicked, banned, muted, a role or the options changed, a join
 * request), `push` (type, body: any other push), `login` (LoginOk: each login, reconnects too), `disconnect` ({code, reason}),
 * `loggedOut` (RequestFailed: the server closed the session with `logged_out` or `banned`,
 * its API's logout and ban, or the token was refused at a reconnect, `login_failed`; the
 * client is closed then and does not reconnect).
 */
export class BitchatClient {
  /** @param {string} url the /ws endpoint, e.g. ws://host:port/ws @param {ClientOptions} [options] */
  constructor(url, options = {}) {
    this.url = url;
    this.options = options;
    this.device = options.device ?? '';
    this.jwt = options.jwt ?? '';
    this.autoAck = options.autoAck ?? true;
    this.reconnectEnabled = options.reconnect ?? true;
    /** @type {Link | null} */
    this.link = null;
    /** @type {LoginOk | null} */
    this.session = null;
    this.token = '';
    this.closed = false;
    this.retries = 0;
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    this.retryTimer = undefined;
    this.reconnects = 0;
    this.handlers = new Map();
    /** @type {Array<{resolve: () => void, reject: (err: Error) => void}>} */
    this.liveWaiters = [];
  }

  /** Opens the WebSocket (no login yet). */
  async open() {
    if (this.closed) throw new RequestFailed('closed', 'the client is closed');
    const link = new Link(this.url, {
      WebSocket: this.options.WebSocket,
      heartbeatMs: this.options.heartbeatMs,
      deadAfterMs: this.options.deadAfterMs,
      requestTimeoutMs: this.options.requestTimeoutMs,
      onPush: (type, body, from) => this.onPush(type, body, from),
      onClose: (from, code, reason) => this.onLinkClosed(from, code, reason),
    });
    this.link = link;
    await link.open();
    return this;
  }

  /**
   * @param {EventName} name
   * @param {(...args: any[]) => void} handler
   * @returns {() => void} removes the handler
   */
  on(name, handler) {
    if (!this.handlers.has(name)) this.handlers.set(name, new Set());
    this.handlers.get(name).add(handler);
    return () => this.handlers.get(name).delete(handler);
  }

  /** @param {EventName} name @param {...any} args */
  emit(name, ...args) {
    for (const handler of this.handlers.get(name) ?? []) {
      try { handler(...args); } catch (err) { console.error(`bitchat: a ${name} handler failed:`, err); }
    }
  }

  /** Logged in on an open connection now. */
  get connected() {
    return !!this.link && this.link.live && this.link.isOpen;
  }

  /**
   * A raw request on the current connection.
   * @param {number} type @param {object} [body] @param {number} [timeout] ms
   */
  request(type, body = {}, timeout) {
    if (!this.link) return Promise.reject(new RequestFailed('closed', 'not connected'));
    return this.link.request(type, body, timeout);
  }

  /**
   * Logs in with `{name, password}`, `{token}` or `{jwt}` (or `{}` with the `jwt` option);
   * the device (option, or the last LoginOk's) goes with it. Later reconnects log in
   * with the token and device.
   * @param {{name?: string, password?: string, token?: string, device?: string, jwt?: string}} credentials
   * @returns {Promise<LoginOk>}
   */
  async login(credentials) {
    if (!this.link || this.link.ended) await this.open();
    const body = { ...credentials, device: credentials.device ?? this.device };
    // The jwt option is the login of a client without a password or token of its own;
    // a reconnect logs in with the token the JWT login gave.
    const jwt = credentials.jwt ?? (credentials.name || credentials.token ? '' : this.jwt);
    if (jwt) body.jwt = jwt;
    else delete body.jwt;
    const link = /** @type {Link} */ (this.link);
    /** @type {LoginOk} */
    const ok = await link.request(T.LOGIN, body);
    this.session = ok;
    this.token = ok.token;
    if (ok.device) this.device = ok.device;
    this.retries = 0;
    link.live = true;
    this.emit('login', ok);
    const waiters = this.liveWaiters;
    this.liveWaiters = [];
    for (const w of waiters) w.resolve();
    return ok;
  }

  /** @param {string} name @param {string} password @returns {Promise<{user_id: number, name: string}>} */
  register(name, password) {
    return this.request(T.REGISTER, { name, password });
  }

  /** Logs out (the token is dropped) and closes the client. */
  async logout() {
    try {
      await this.request(T.LOGOUT, {}, 3000);
    } finally {
      this.token = '';
      this.close();
    }
  }

  /** Closes the connection for good: no reconnect; sends waiting for one fail. */
  close() {
    this.closed = true;
    clearTimeout(this.retryTimer);
    this.retryTimer = undefined;
    const waiters = this.liveWaiters;
    this.liveWaiters = [];
    for (const w of waiters) w.reject(new RequestFailed('closed', 'the client is closed'));
    const link = this.link;
    if (link) { link.live = false; link.close(); }
  }

  /**
   * Resolves at the next login (or at once if logged in); rejects after `ms` or on close().
   * @param {number} ms
   * @returns {Promise<void>}
   */
  whenLive(ms) {
    if (this.connected) return Promise.resolve();
    if (this.closed) return Promise.reject(new RequestFailed('closed', 'the client is closed'));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.liveWaiters = this.liveWaiters.filter((w) => w !== waiter);
        reject(new RequestFailed('timeout', 'not connected'));
      }, Math.max(ms, 0));
      const waiter = {
        resolve: () => { clearTimeout(timer); resolve(); },
        reject: (/** @type {Error} */ err) => { clearTimeout(timer); reject(err); },
      };
      this.liveWaiters.push(waiter);
    });
  }

  // -- sending -----------------------------------------------------------------------------------

  /**
   * A one-to-one message; resolves once stored. A connection lost meanwhile is waited out and
   * the message resent with the same client_msg_id (stored once), at most `retries` times,
   * all within `timeoutMs`.
   * `reply_to` quotes a message of the conversation; `type` and `fields` send a typed message
   * (`text` is then the fallback a client that does not know the type shows).
   * @param {{to: number, text: string} & SendOptions} msg
   * @returns {Promise<SendAck>}
   */
  sendP2P({ to, text, client_msg_id, retries, timeoutMs, ...extra }) {
    return this.sendStored(T.SEND_P2P, withExtra({ to, text, client_msg_id: client_msg_id || newClientMsgId() }, extra),
      retries, timeoutMs);
  }

  /**
   * A group message; as sendP2P. `@name` in the text mentions that member.
   * @param {{group_id: number, text: string} & SendOptions} msg
   * @returns {Promise<SendAck>}
   */
  sendGroup({ group_id, text, client_msg_id, retries, timeoutMs, ...extra }) {
    return this.sendStored(T.SEND_GROUP, withExtra({ group_id, text, client_msg_id: client_msg_id || newClientMsgId() }, extra),
      retries, timeoutMs);
  }

  // -- changing messages: edit, recall, reactions, delete for me ---------------------------------
  // Each change is an event in the conversation (a SendAck: its msg_id and seq), pushed to every
  // device of the conversation's members as a ChatMessage with `op` (the `edit`, `recall` and
  // `reaction` events here). Refusals: RequestFailed `forbidden` (someone else's message),
  // `window_passed`, `recalled`, `too_many_reactions`, `not_member`, `not_found`.

  /**
   * New text for one's own message (within the server's edit_window); the earlier text is kept
   * for the sender (versions()).
   * @param {Id} msg_id @param {string} text @returns {Promise<SendAck>}
   */
  edit(msg_id, text) { return this.request(T.EDIT_MESSAGE, { msg_id, text }); }
  /**
   * Takes one's own message back (within recall_window; a group's admins and owner may recall
   * any message there): it becomes a "recalled" placeholder everywhere, its text gone.
   * @param {Id} msg_id @returns {Promise<SendAck>}
   */
  recall(msg_id) { return this.request(T.RECALL_MESSAGE, { msg_id }); }
  /** Puts `emoji` on a message. @param {Id} msg_id @param {string} emoji @returns {Promise<SendAck>} */
  react(msg_id, emoji) { return this.request(T.REACT, { msg_id, emoji, on: true }); }
  /** Takes one's `emoji` off a message. @param {Id} msg_id @param {string} emoji @returns {Promise<SendAck>} */
  unreact(msg_id, emoji) { return this.request(T.REACT, { msg_id, emoji, on: false }); }
  /**
   * Hides messages from this user's history, on all their devices (the others still see them).
   * @param {Id[]} msg_ids
   */
  deleteForMe(msg_ids) { return this.request(T.DELETE_FOR_ME, { msg_ids }); }
  /** The earlier texts of one's own message. @param {Id} msg_id @returns {Promise<Versions>} */
  versions(msg_id) { return this.request(T.GET_VERSIONS, { msg_id }); }
  /** Who reacted with what, by name. @param {Id} msg_id @returns {Promise<ReactionList>} */
  reactions(msg_id) { return this.request(T.GET_REACTIONS, { msg_id }); }

  // -- files: HTTP on the server's port, with this device's login token ---------------------------

  /** The server's files endpoint, from the WebSocket URL (ws://host:port/ws). */
  get filesUrl() {
    const url = new URL(this.url);
    url.protocol = url.protocol === 'wss:' ? 'https:' : 'http:';
    url.pathname = '/api/v1/files';
    url.search = '';
    return url.toString();
  }

  /**
   * Uploads a file (logged in first): its bytes stream from the Blob. Refusals: RequestFailed
   * with the server's code (`body_too_large`, `quota_exceeded`, `bad_content_type`, ...).
   * Then send a message that refers to it: `sendP2P({to, text, type: 'image', fields})` with
   * fields `fileFields(info)`.
   * @param {Blob | Uint8Array} data @param {{name: string, contentType?: string}} file
   * @returns {Promise<FileInfo>}
   */
  async upload(data, { name, contentType }) {
    const type = contentType || (typeof Blob !== 'undefined' && data instanceof Blob && data.type) || 'application/octet-stream';
    const res = await fetch(`${this.filesUrl}?name=${encodeURIComponent(name)}`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${this.token}`, 'Content-Type': type },
      body: /** @type {any} */ (data),
    });
    if (!res.ok) throw await httpFailure(res);
    return res.json();
  }

  /**
   * A stored file's bytes (or its thumbnail's), for the uploader and the members of a
   * conversation holding a message that refers to it (else RequestFailed `forbidden`).
   * @param {string} file_id @param {{thumbnail?: boolean}} [options]
   * @returns {Promise<Blob>}
   */
  async download(file_id, { thumbnail = false } = {}) {
    const res = await fetch(`${this.filesUrl}/${encodeURIComponent(file_id)}${thumbnail ? '/thumbnail' : ''}`, {
      headers: { Authorization: `Bearer ${this.token}` },
    });
    if (!res.ok) throw await httpFailure(res);
    return res.blob();
  }

  /**
   * @param {number} type @param {object} body @param {number} [retries] @param {number} [timeoutMs]
   * @returns {Promise<SendAck>}
   */
  async sendStored(type, body, retries = SEND_RETRIES, timeoutMs = SEND_TIMEOUT_MS) {
    const deadline = Date.now() + timeoutMs;
    for (let attempt = 0; ; attempt += 1) {
      await this.whenLive(deadline - Date.now());
      try {
        return await /** @type {Link} */ (this.link).request(type, body, Math.max(deadline - Date.now(), 1));
      } catch (/** @type {any} */ err) {
        // Lost with the connection: perhaps stored, perhaps not; the same client_msg_id
        // makes the resend after the next login harmless.
        if (err.code !== 'closed' || attempt >= retries || this.closed) throw err;
        if (Date.now() >= deadline) throw new RequestFailed('timeout', 'not stored in time (not connected)');
      }
    }
  }

  // -- requests ----------------------------------------------------------------------------------

  /**
   * A page of one conversation, newest first (oldest first with after_seq).
   * @param {{peer_id?: number, group_id?: number, before?: Id, before_seq?: number, after_seq?: number, limit?: number}} query
   * @returns {Promise<HistoryPage>}
   */
  history(query) {
    return this.request(T.HISTORY, query);
  }

  /**
   * A page of the user's conversations, most recent activity first.
   * @param {{limit?: number, before?: Id}} [query]
   * @returns {Promise<ConversationList>}
   */
  conversations(query = {}) {
    return this.request(T.GET_CONVERSATIONS, query);
  }

  /**
   * Read up to `seq` (0: the latest) in `{peer_id}` or `{group_id}`.
   * @param {{peer_id?: number, group_id?: number, seq?: number}} target
   * @returns {Promise<ReadState>}
   */
  markRead(target) {
    return this.request(T.MARK_READ, target);
  }

  /**
   * How many members of a group have message `seq`, and have read it (`who`: which ones).
   * @param {{group_id: number, seq: number, who?: boolean}} query
   */
  receipts(query) {
    return this.request(T.GET_RECEIPTS, query);
  }

  /**
   * Typing (or stopped) in `{to}` or `{group_id}`: one-way, best effort.
   * @param {{to?: number, group_id?: number, typing?: boolean}} target
   */
  typing({ to = 0, group_id = 0, typing = true }) {
    if (this.connected) /** @type {Link} */ (this.link).send(T.TYPING, group_id ? { group_id, typing } : { to, typing });
  }

  /** @param {boolean} [watch] also push Presence @returns {Promise<{users: Array<{id: number, name: string}>}>} */
  listOnline(watch = false) { return this.request(T.LIST_ONLINE, { watch }); }
  /** @param {string} name @returns {Promise<GroupInfo>} */
  createGroup(name) { return this.request(T.CREATE_GROUP, { name }); }
  /**
   * Joins a group; `invite` (a code of createInvite) lets the user into an invite-only group.
   * Without one there, the answer has `pending: true`: a join request waits for an admin.
   * @param {number} group_id @param {string} [invite] @returns {Promise<GroupInfo>}
   */
  joinGroup(group_id, invite = '') {
    return this.request(T.JOIN_GROUP, invite ? { group_id, invite } : { group_id });
  }
  /** @param {number} group_id */
  leaveGroup(group_id) { return this.request(T.LEAVE_GROUP, { group_id }); }
  /** @returns {Promise<{groups: Array<{id: number, name: string, owner_id: number, members: number, role: Role}>}>} */
  myGroups() { return this.request(T.MY_GROUPS, {}); }
  /** The members, with their role and mute (members only). @param {number} group_id @returns {Promise<MemberList>} */
  groupMembers(group_id) { return this.request(T.GROUP_MEMBERS, { group_id }); }

  // -- moderation: roles, kick, ban, mute, invite-only groups, blocks ----------------------------
  // Refusals: RequestFailed `forbidden` (the role does not allow it), `not_member`, `not_found`,
  // `banned`, `muted`, `blocked`, `bad_invite`.

  /**
   * The owner makes a member 'admin' or 'member'; 'owner' hands the group over (the old owner
   * becomes an admin).
   * @param {{group_id: number, user_id: number, role: Role}} change
   */
  setRole({ group_id, user_id, role }) { return this.request(T.SET_ROLE, { group_id, user_id, role }); }
  /**
   * Removes a member, who may join again (an admin cannot kick the owner or another admin).
   * @param {{group_id: number, user_id: number}} target
   */
  kick({ group_id, user_id }) { return this.request(T.KICK_MEMBER, { group_id, user_id }); }
  /**
   * Removes the user if a member and refuses their later joins (invites too).
   * @param {{group_id: number, user_id: number}} target
   */
  ban({ group_id, user_id }) { return this.request(T.BAN_MEMBER, { group_id, user_id, ban: true }); }
  /** Lifts a ban. @param {{group_id: number, user_id: number}} target */
  unban({ group_id, user_id }) { return this.request(T.BAN_MEMBER, { group_id, user_id, ban: false }); }
  /**
   * Mutes a member for `seconds` (at most the server's max_mute_seconds); 0 unmutes.
   * @param {{group_id: number, user_id: number, seconds: number}} target
   */
  mute({ group_id, user_id, seconds }) {
    return this.request(T.MUTE_MEMBER, { group_id, user_id, seconds });
  }
  /**
   * Changes a group's options (those left out stay as they are). Admin or owner.
   * @param {{group_id: number, invite_only?: boolean, history_visible?: boolean}} options
   * @returns {Promise<GroupInfo>}
   */
  setGroupOptions({ group_id, invite_only, history_visible }) {
    /** @type {{group_id: number, invite_only?: boolean, history_visible?: boolean}} */
    const body = { group_id };
    if (invite_only !== undefined) body.invite_only = invite_only;
    if (history_visible !== undefined) body.history_visible = history_visible;
    return this.request(T.SET_GROUP_OPTIONS, body);
  }
  /**
   * An invite code: `ttl` seconds (0: the server's invite_ttl), `max_uses` joins (0: unlimited).
   * @param {{group_id: number, ttl?: number, max_uses?: number}} invite
   * @returns {Promise<InviteInfo>}
   */
  createInvite({ group_id, ttl = 0, max_uses = 0 }) {
    return this.request(T.CREATE_INVITE, { group_id, ttl, max_uses });
  }
  /** Adds a user to the group directly. @param {{group_id: number, user_id: number}} target */
  addMember({ group_id, user_id }) { return this.request(T.ADD_MEMBER, { group_id, user_id }); }
  /** The join requests waiting in an invite-only group. @param {number} group_id @returns {Promise<JoinRequestList>} */
  joinRequests(group_id) { return this.request(T.GET_JOIN_REQUESTS, { group_id }); }
  /**
   * Approves (the user joins) or denies a join request.
   * @param {{group_id: number, user_id: number, approve: boolean}} answer
   */
  answerJoinRequest({ group_id, user_id, approve }) {
    return this.request(T.ANSWER_JOIN_REQUEST, { group_id, user_id, approve });
  }
  /** No messages either way, and this user shows offline to them. @param {number} user_id */
  block(user_id) { return this.request(T.BLOCK, { user_id, block: true }); }
  /** @param {number} user_id */
  unblock(user_id) { return this.request(T.BLOCK, { user_id, block: false }); }
  /** The users this user blocks, by id. @returns {Promise<BlockedList>} */
  blocked() { return this.request(T.GET_BLOCKED, {}); }
  /** @param {boolean} show_last_seen */
  setPrivacy(show_last_seen) { return this.request(T.SET_PRIVACY, { show_last_seen }); }

  /**
   * Acks messages pushed on the current connection (done for you unless autoAck is false).
   * @param {Id[]} msgIds
   */
  async ack(msgIds) {
    for (let i = 0; i < msgIds.length; i += ACK_MAX_IDS) {
      await this.request(T.ACK, { msg_ids: msgIds.slice(i, i + ACK_MAX_IDS) });
    }
  }

  // -- pushes, acks, reconnecting ----------------------------------------------------------------

  /** @param {number} type @param {any} body @param {Link} link */
  onPush(type, body, link) {
    const name = type === T.CHAT ? OP_EVENTS.get(body.op || '') ?? 'push' : PUSH_EVENTS.get(type);
    if (name) this.emit(name, body);
    else this.emit('push', type, body);
    if (type === T.CHAT && this.autoAck) this.queueAck(link, body.msg_id);
  }

  // Acks go in batches, on the connection the message came on (only those count).
  /** @param {Link} link @param {Id} msgId */
  queueAck(link, msgId) {
    link.toAck.push(msgId);
    if (link.toAck.length === 1) setTimeout(() => this.flushAcks(link), ACK_DELAY_MS);
  }

  /** @param {Link} link */
  async flushAcks(link) {
    const ids = link.toAck;
    link.toAck = [];
    if (!ids.length || !link.isOpen) return; // unacked messages come again at the next login
    try {
      for (let i = 0; i < ids.length; i += ACK_MAX_IDS) {
        await link.request(T.ACK, { msg_ids: ids.slice(i, i + ACK_MAX_IDS) });
      }
    } catch (/** @type {any} */ err) {
      if (err.code !== 'closed') console.warn('bitchat: ack failed, the messages will come again:', err);
    }
  }

  /** @param {Link} link @param {number} code @param {string} reason */
  onLinkClosed(link, code, reason) {
    if (link !== this.link) return;
    const wasLive = link.live;
    link.live = false;
    this.emit('disconnect', { code, reason });
    const told = link.closeReason;
    if (wasLive && told && STAY_OUT.has(told.code)) {
      // Logged out or banned by the server (its API): a forced logout sticks, as IMClient's.
      this.token = '';
      this.jwt = '';
      this.close();
      this.emit('loggedOut', told);
      return;
    }
    if (wasLive && !this.closed && this.reconnectEnabled && this.token) this.scheduleReconnect();
  }

  scheduleReconnect() {
    clearTimeout(this.retryTimer);
    const initial = this.options.reconnectInitialMs ?? RECONNECT_INITIAL_MS;
    const ceiling = Math.min(this.options.reconnectMaxMs ?? RECONNECT_MAX_MS, initial * 2 ** this.retries);
    this.retries += 1;
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    this.retryTimer = setTimeout(() => this.reconnect(), delay);
  }

  /** Reconnects now (it happens by itself after a drop, with backoff) and logs in again. */
  async reconnect() {
    clearTimeout(this.retryTimer);
    this.retryTimer = undefined;
    if (this.closed || this.connected) return;
    try {
      await this.open();
      await this.login({ token: this.token, device: this.device });
      this.reconnects += 1;
    } catch (/** @type {any} */ err) {
      if (this.link) this.link.close();
      if (err.code === 'login_failed') {
        this.token = '';
        this.emit('loggedOut', err);
        this.close();
      } else if (!this.closed) {
        this.scheduleReconnect();
      }
    }
  }
}

/**
 * The fields of a 'file' or 'image' message that refers to an uploaded file.
 * @param {FileInfo} info @returns {Record<string, any>}
 */
export function fileFields(info) {
  const fields = { file_id: info.file_id, name: info.name, size: info.size, content_type: info.content_type };
  if (info.width) Object.assign(fields, { width: info.width, height: info.height });
  return fields;
}

/**
 * The server's refusal of an HTTP call: `{"error": {"code", "message"}}`.
 * @param {Response} res @returns {Promise<RequestFailed>}
 */
async function httpFailure(res) {
  let body = null;
  try { body = await res.json(); } catch { /* not JSON */ }
  const e = body?.error ?? {};
  return new RequestFailed(e.code || `http_${res.status}`, e.message || `the server answered ${res.status}`);
}

/**
 * A send's body with the optional parts that differ from the defaults (an older server, or
 * a plain text message, gets the same packet as before).
 * @param {Record<string, any>} body @param {{reply_to?: Id, type?: string, fields?: Record<string, any>}} extra
 */
function withExtra(body, { reply_to, type, fields }) {
  if (reply_to) body.reply_to = reply_to;
  if (type && type !== 'text') body.type = type;
  if (fields && Object.keys(fields).length) body.fields = fields;
  return body;
}

/**
 * A client with its WebSocket open (log in next).
 * @param {string} url  the /ws endpoint, e.g. `ws://127.0.0.1:9000/ws`
 * @param {ClientOptions} [options]
 * @returns {Promise<BitchatClient>}
 */
export async function connect(url, options = {}) {
  const client = new BitchatClient(url, options);
  await client.open();
  return client;
}
