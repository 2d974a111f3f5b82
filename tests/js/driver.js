#!/usr/bin/env node
'use strict';
/*
 * pusher-js test driver.
 *
 * A long-running Node process that holds any number of named pusher-js
 * clients. It reads newline-delimited JSON commands on stdin and writes
 * newline-delimited JSON events on stdout. NOTHING else is written to stdout:
 * diagnostics go to stderr (set PUSHERJS_DRIVER_DEBUG=1 for pusher-js logs).
 *
 * The protocol is documented in README.md next to this file; the Python side
 * is tests/support/pusherjs.py.
 */

// ---------------------------------------------------------------------------
// stdout is reserved for protocol lines: route every console.* to stderr
// before anything else can print.
// ---------------------------------------------------------------------------
const util = require('util');
for (const m of ['log', 'info', 'debug', 'warn', 'error', 'trace']) {
  console[m] = (...args) => {
    process.stderr.write('[driver] ' + util.format(...args) + '\n');
  };
}

const readline = require('readline');
const Pusher = require('pusher-js'); // PusherWithEncryption (node build bundles tweetnacl)
// Static state such as isReady lives on the base class.
const PusherBase = Object.getPrototypeOf(Pusher) && Object.getPrototypeOf(Pusher).isReady !== undefined
  ? Object.getPrototypeOf(Pusher)
  : Pusher;
const PusherServer = require('pusher');

const DEBUG = !!process.env.PUSHERJS_DRIVER_DEBUG;
Pusher.logToConsole = false;
Pusher.log = (msg) => {
  if (DEBUG) process.stderr.write('[pusher-js] ' + msg + '\n');
};

// ---------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------

/** JSON-safe deep copy: Errors -> {name,message,...}, cycles cut, functions dropped. */
function safe(value, depth = 0, seen = new WeakSet()) {
  if (value === undefined) return undefined;
  if (value === null) return null;
  const t = typeof value;
  if (t === 'string' || t === 'boolean') return value;
  if (t === 'number') return Number.isFinite(value) ? value : String(value);
  if (t === 'bigint') return value.toString();
  if (t === 'function' || t === 'symbol') return undefined;
  if (depth > 12) return '[depth]';
  if (seen.has(value)) return '[circular]';
  seen.add(value);
  try {
    if (value instanceof Error) {
      const out = { name: value.name, message: value.message };
      for (const k of Object.keys(value)) {
        const v = safe(value[k], depth + 1, seen);
        if (v !== undefined) out[k] = v;
      }
      return out;
    }
    if (Buffer.isBuffer(value) || value instanceof Uint8Array) {
      return Buffer.from(value).toString('base64');
    }
    if (Array.isArray(value)) {
      return value.map((v) => {
        const s = safe(v, depth + 1, seen);
        return s === undefined ? null : s;
      });
    }
    const out = {};
    for (const k of Object.keys(value)) {
      // faye event objects carry back-references to the socket; skip them.
      if (k === 'target' || k === 'currentTarget') continue;
      const v = safe(value[k], depth + 1, seen);
      if (v !== undefined) out[k] = v;
    }
    return out;
  } finally {
    seen.delete(value);
  }
}

function emit(obj) {
  let line;
  try {
    line = JSON.stringify(safe(obj));
  } catch (e) {
    line = JSON.stringify({
      client: obj && obj.client,
      type: 'driver_error',
      message: 'could not serialise event: ' + e.message,
    });
  }
  process.stdout.write(line + '\n');
}

/** Find a Pusher close/error code anywhere in the usual error shapes. */
function extractCode(err) {
  if (!err || typeof err !== 'object') return null;
  const candidates = [
    err.data && err.data.code,
    err.error && err.error.data && err.error.data.code,
    err.error && err.error.code,
    err.code,
    err.status,
  ];
  for (const c of candidates) {
    if (typeof c === 'number') return c;
  }
  return null;
}

// ---------------------------------------------------------------------------
// WebSocket instrumentation
//
// Every client is given a unique wsPath marker ("/__pjsdrv/<n>"). The patched
// Runtime.createWebSocket strips the marker (so the server sees the normal
// "/app/<key>?protocol=7..." URL), optionally rewrites the protocol query
// parameter, and hooks the raw socket so we can report raw frames and the
// exact close code/reason per client.
// ---------------------------------------------------------------------------

const MARKER_RE = /\/__pjsdrv\/(\d+)(?=\/app\/)/;
const clientsByMarker = new Map(); // marker id -> client record
let markerSeq = 0;

const origCreateWebSocket = Pusher.Runtime.createWebSocket;
Pusher.Runtime.createWebSocket = function (url) {
  const m = MARKER_RE.exec(url);
  const rec = m ? clientsByMarker.get(m[1]) : null;
  let realUrl = m ? url.replace(MARKER_RE, '') : url;
  if (rec && rec.queryProtocol !== undefined && rec.queryProtocol !== null) {
    if (rec.queryProtocol === false || rec.queryProtocol === '') {
      realUrl = realUrl.replace(/([?&])protocol=[^&]*&?/, '$1').replace(/[?&]$/, '');
    } else {
      realUrl = realUrl.replace(/([?&])protocol=[^&]*/, '$1protocol=' + encodeURIComponent(String(rec.queryProtocol)));
    }
  }
  if (rec && rec.urlQuery) {
    realUrl += (realUrl.indexOf('?') >= 0 ? '&' : '?') + rec.urlQuery;
  }
  const socket = origCreateWebSocket.call(this, realUrl);
  if (!rec) return socket;

  const name = rec.name;
  const gen = ++rec.socketGen;
  emit({ client: name, type: 'ws_open_attempt', url: realUrl, socket_gen: gen });
  try {
    socket.addEventListener('open', () => emit({ client: name, type: 'ws_open', socket_gen: gen }));
    // Report the raw frame BEFORE pusher-js processes it: wrap the onmessage
    // handler the transport installs (faye calls this['onmessage'] first).
    let userOnMessage = null;
    Object.defineProperty(socket, 'onmessage', {
      configurable: true,
      enumerable: true,
      get() {
        return userOnMessage;
      },
      set(fn) {
        userOnMessage = typeof fn === 'function'
          ? function (ev) {
            if (rec.raw) emit({ client: name, type: 'raw', dir: 'in', data: String(ev && ev.data), socket_gen: gen });
            return fn.apply(this, arguments);
          }
          : fn;
      },
    });
    socket.addEventListener('close', (ev) => {
      emit({
        client: name,
        type: 'closed',
        code: ev && typeof ev.code === 'number' ? ev.code : null,
        reason: ev && ev.reason !== undefined ? String(ev.reason) : null,
        wasClean: ev ? !!ev.wasClean : null,
        socket_gen: gen,
      });
    });
    const origSend = socket.send;
    socket.send = function (data) {
      if (rec.raw) emit({ client: name, type: 'raw', dir: 'out', data: String(data), socket_gen: gen });
      return origSend.apply(this, arguments);
    };
  } catch (e) {
    process.stderr.write('[driver] could not instrument socket: ' + e.stack + '\n');
  }
  return socket;
};

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

const clients = new Map(); // name -> record

function serverSdk(rec, forged) {
  const opts = {
    appId: String(rec.appId || 'app'),
    key: rec.key,
    secret: forged ? String(rec.secret || '') + 'x' : String(rec.secret || ''),
    host: rec.host,
    port: String(rec.port),
    useTLS: false,
  };
  if (rec.encryptionMasterKeyBase64) opts.encryptionMasterKeyBase64 = rec.encryptionMasterKeyBase64;
  return new PusherServer(opts);
}

function requireSecret(rec) {
  if (!rec.secret) throw new Error('client "' + rec.name + '" was connected without a secret; cannot sign auth');
}

function channelAuthHandler(rec) {
  return (params, callback) => {
    const channelName = params.channelName;
    const socketId = params.socketId;
    try {
      if (rec.authFail) {
        const msg = typeof rec.authFail === 'string' ? rec.authFail : 'driver: auth refused (authFail)';
        emit({ client: rec.name, type: 'auth', kind: 'channel', channel: channelName, failed: true });
        callback(new Error(msg), null);
        return;
      }
      requireSecret(rec);
      const forged = forgeFor(rec, channelName);
      let presenceData;
      if (channelName.indexOf('presence-') === 0 && rec.userData && rec.userData.user_id !== undefined) {
        presenceData = { user_id: rec.userData.user_id }; // as given: tests may probe numeric ids
        if (rec.userData.user_info !== undefined) presenceData.user_info = rec.userData.user_info;
      }
      const auth = serverSdk(rec, forged).authorizeChannel(socketId, channelName, presenceData);
      emit({
        client: rec.name,
        type: 'auth',
        kind: 'channel',
        channel: channelName,
        socket_id: socketId,
        forged,
        auth: auth.auth,
        channel_data: auth.channel_data === undefined ? null : auth.channel_data,
        has_shared_secret: !!auth.shared_secret,
      });
      callback(null, auth);
    } catch (e) {
      emit({ client: rec.name, type: 'auth_error', kind: 'channel', channel: channelName, message: String(e && e.message || e) });
      callback(e instanceof Error ? e : new Error(String(e)), null);
    }
  };
}

function userAuthHandler(rec) {
  return (params, callback) => {
    const socketId = params.socketId;
    try {
      if (rec.authFail) {
        const msg = typeof rec.authFail === 'string' ? rec.authFail : 'driver: auth refused (authFail)';
        emit({ client: rec.name, type: 'auth', kind: 'user', failed: true });
        callback(new Error(msg), null);
        return;
      }
      requireSecret(rec);
      const forged = forgeFor(rec, null);
      const u = rec.userData || {};
      const userData = {};
      // Accept {id,...} (signin shape) or fall back to {user_id,...} (presence shape).
      const id = u.id !== undefined ? u.id : u.user_id;
      if (id !== undefined) userData.id = id; // as given (pusher-js itself requires a string id)
      if (u.user_info !== undefined) userData.user_info = u.user_info;
      if (u.watchlist !== undefined) userData.watchlist = u.watchlist;
      for (const k of Object.keys(u)) {
        if (!(k in userData) && k !== 'user_id') userData[k] = u[k];
      }
      const auth = serverSdk(rec, forged).authenticateUser(socketId, userData);
      emit({
        client: rec.name,
        type: 'auth',
        kind: 'user',
        socket_id: socketId,
        forged,
        auth: auth.auth,
        user_data: auth.user_data,
      });
      callback(null, auth);
    } catch (e) {
      emit({ client: rec.name, type: 'auth_error', kind: 'user', message: String(e && e.message || e) });
      callback(e instanceof Error ? e : new Error(String(e)), null);
    }
  };
}

/** forgeAuth: true -> forge everything; array -> forge only those channels (use "#user" for signin). */
function forgeFor(rec, channelName) {
  const f = rec.forgeAuth;
  if (Array.isArray(f)) return f.indexOf(channelName === null ? '#user' : channelName) >= 0;
  return !!f;
}

function serializeMembers(members) {
  return {
    count: members.count,
    ids: Object.keys(members.members || {}),
    members: members.members || {},
    me: members.me,
    myID: members.myID === undefined ? null : members.myID,
  };
}

function isMembers(x) {
  return !!x && typeof x === 'object' && typeof x.each === 'function' && typeof x.get === 'function' &&
    'members' in x && 'count' in x;
}

function instrumentChannel(rec, channel) {
  if (channel.__pjsdrv) return;
  channel.__pjsdrv = true;
  // Wrap emit rather than bind_global: global callbacks do not receive the
  // metadata argument (user_id of client events on presence channels).
  const origEmit = channel.emit;
  channel.emit = function (eventName, data, metadata) {
    let payload = data;
    if (eventName === 'pusher:subscription_succeeded' && isMembers(data)) {
      payload = serializeMembers(data);
    }
    const ev = { client: rec.name, type: 'event', channel: channel.name, event: eventName, data: payload };
    if (metadata && Object.keys(metadata).length) ev.metadata = metadata;
    emit(ev);
    return origEmit.apply(this, arguments);
  };
}

function createClient(cmd) {
  const name = cmd.client;
  if (!name || typeof name !== 'string') throw new Error('connect: "client" (a name string) is required');
  if (cmd.key === undefined || cmd.port === undefined) throw new Error('connect: "key" and "port" are required');
  const old = clients.get(name);
  if (old) {
    if (old.pusher.connection.state !== 'disconnected' && old.pusher.connection.state !== 'failed') {
      throw new Error('client "' + name + '" already exists and is ' + old.pusher.connection.state + '; disconnect it first');
    }
    clientsByMarker.delete(old.marker);
  }

  const marker = String(++markerSeq);
  const rec = {
    name,
    marker,
    key: cmd.key,
    host: cmd.host || '127.0.0.1',
    port: Number(cmd.port),
    secret: cmd.secret,
    appId: cmd.appId,
    forgeAuth: cmd.forgeAuth || false,
    authFail: cmd.authFail || false,
    userData: cmd.userData || null,
    encryptionMasterKeyBase64: cmd.encryptionMasterKeyBase64,
    queryProtocol: cmd.queryProtocol,
    urlQuery: cmd.urlQuery,
    raw: cmd.raw !== false,
    socketGen: 0,
    pusher: null,
  };
  clientsByMarker.set(marker, rec);

  const options = Object.assign(
    {
      cluster: 'mt1',
      wsHost: rec.host,
      wsPort: rec.port,
      wssPort: rec.port,
      forceTLS: false,
      enabledTransports: ['ws'],
      enableStats: false,
    },
    cmd.options || {},
    {
      wsPath: (cmd.options && cmd.options.wsPath ? cmd.options.wsPath : '') + '/__pjsdrv/' + marker,
      channelAuthorization: { customHandler: channelAuthHandler(rec) },
      userAuthentication: { customHandler: userAuthHandler(rec) },
    },
  );
  if (cmd.activityTimeout !== undefined) options.activityTimeout = cmd.activityTimeout;
  if (cmd.pongTimeout !== undefined) options.pongTimeout = cmd.pongTimeout;
  if (cmd.unavailableTimeout !== undefined) options.unavailableTimeout = cmd.unavailableTimeout;

  // Construct without auto-connecting so the very first state_change
  // (initialized -> connecting) is observed too; connect() after binding.
  const wasReady = PusherBase.isReady;
  PusherBase.isReady = false;
  let pusher;
  try {
    pusher = new Pusher(String(rec.key), options);
  } finally {
    PusherBase.isReady = wasReady;
  }
  rec.pusher = pusher;
  clients.set(name, rec);

  bindFirst(pusher.connection, 'state_change', (s) => {
    emit({ client: name, type: 'state', current: s.current, previous: s.previous });
  });
  bindFirst(pusher.connection, 'connected', (data) => {
    emit({ client: name, type: 'connected', socket_id: (data && data.socket_id) || pusher.connection.socket_id });
  });
  pusher.connection.bind('connecting_in', (delay) => {
    emit({ client: name, type: 'connecting_in', delay });
  });
  pusher.connection.bind('error', (err) => {
    emit({ client: name, type: 'error', code: extractCode(err), error: err });
  });
  bindFirst(pusher.connection, 'message', (m) => {
    const ev = { client: name, type: 'message', event: m.event, channel: m.channel === undefined ? null : m.channel, data: m.data };
    if (m.user_id !== undefined) ev.user_id = m.user_id;
    emit(ev);
    if (m.event === 'pusher:signin_success') {
      emit({ client: name, type: 'signin_success', data: m.data });
    }
  });

  pusher.user.bind_global((eventName, data) => {
    emit({ client: name, type: 'user_event', event: eventName, data });
    if (eventName === 'pusher:signin_error') {
      emit({ client: name, type: 'signin_error', data });
    }
  });
  pusher.user.watchlist.bind_global((eventName, data) => {
    emit({ client: name, type: 'watchlist', event: eventName, data });
  });
  pusher.connect();
  return rec;
}

/** Bind so that our callback runs before pusher-js's own handlers for the event
 * (so 'message' precedes the channel 'event' it causes, 'connected' precedes
 * the subscribe frames it triggers). Falls back to a plain bind. */
function bindFirst(dispatcher, eventName, fn) {
  dispatcher.bind(eventName, fn);
  try {
    const list = dispatcher.callbacks && dispatcher.callbacks._callbacks && dispatcher.callbacks._callbacks['_' + eventName];
    if (Array.isArray(list) && list.length > 1 && list[list.length - 1].fn === fn) {
      list.unshift(list.pop());
    }
  } catch (e) {
    /* keep the plain bind */
  }
}

function getClient(cmd) {
  const rec = clients.get(cmd.client);
  if (!rec) throw new Error('unknown client "' + cmd.client + '"');
  return rec;
}

function snapshot(rec) {
  const p = rec.pusher;
  const channels = {};
  for (const ch of p.allChannels()) {
    const info = {
      subscribed: !!ch.subscribed,
      subscriptionPending: !!ch.subscriptionPending,
      subscriptionCancelled: !!ch.subscriptionCancelled,
    };
    if (ch.subscriptionCount !== undefined && ch.subscriptionCount !== null) info.subscriptionCount = ch.subscriptionCount;
    if (ch.members) info.members = serializeMembers(ch.members);
    channels[ch.name] = info;
  }
  return {
    state: p.connection.state,
    socket_id: p.connection.socket_id || null,
    channels,
    user: p.user && p.user.user_data ? p.user.user_data : null,
  };
}

// ---------------------------------------------------------------------------
// REST calls with the Node server SDK (what Laravel/Node backends publish with)
// ---------------------------------------------------------------------------

const REST_METHODS = ['trigger', 'triggerBatch', 'get', 'post', 'sendToUser', 'terminateUserConnections'];

/** Credentials for `rest`: explicit fields win over those of the named client. */
function restSdk(cmd) {
  const rec = cmd.client !== undefined && cmd.client !== null ? getClient(cmd) : {};
  const pick = (k) => (cmd[k] !== undefined ? cmd[k] : rec[k]);
  const opts = {
    appId: String(pick('appId') || ''),
    key: String(pick('key') || ''),
    secret: String(pick('secret') || ''),
    host: pick('host') || '127.0.0.1',
    port: String(pick('port') || ''),
    useTLS: false,
    timeout: cmd.timeout !== undefined ? Number(cmd.timeout) : 10000,
  };
  if (!opts.appId || !opts.key || !opts.secret || !opts.port) {
    throw new Error('rest: appId, key, secret and port are required (or a client connected with them)');
  }
  const master = pick('encryptionMasterKeyBase64');
  if (master) opts.encryptionMasterKeyBase64 = master;
  return new PusherServer(opts);
}

function parseBody(text) {
  if (text === undefined || text === null) return null;
  try {
    return JSON.parse(text);
  } catch (e) {
    return String(text);
  }
}

function runRest(cmd) {
  const method = cmd.method;
  if (REST_METHODS.indexOf(method) < 0) {
    throw new Error('rest: unknown method "' + method + '" (one of ' + REST_METHODS.join(', ') + ')');
  }
  const args = Array.isArray(cmd.args) ? cmd.args : [];
  const sdk = restSdk(cmd);
  // Synchronous SDK validation errors (bad channel name, socket id...) become cmd_error.
  const promise = Promise.resolve(sdk[method].apply(sdk, args));
  const base = { client: cmd.client === undefined ? null : cmd.client, type: 'rest_result', id: cmd.id, method };
  promise.then(
    (res) => res.text().then((text) => {
      emit(Object.assign({}, base, { ok: true, status: res.status, body: parseBody(text) }));
    }),
    (err) => {
      emit(Object.assign({}, base, {
        ok: false,
        status: err && typeof err.status === 'number' ? err.status : null,
        body: parseBody(err && err.body),
        message: String((err && err.message) || err),
      }));
    },
  ).catch((e) => {
    emit(Object.assign({}, base, { ok: false, status: null, body: null, message: 'driver: ' + String(e && e.message || e) }));
  });
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

const handlers = {
  connect(cmd) {
    createClient(cmd);
  },
  subscribe(cmd) {
    const rec = getClient(cmd);
    if (!cmd.channel) throw new Error('subscribe: "channel" is required');
    const channel = rec.pusher.subscribe(cmd.channel);
    instrumentChannel(rec, channel);
  },
  unsubscribe(cmd) {
    const rec = getClient(cmd);
    rec.pusher.unsubscribe(cmd.channel);
  },
  trigger(cmd) {
    const rec = getClient(cmd);
    const channel = rec.pusher.channel(cmd.channel);
    if (!channel) throw new Error('trigger: not subscribed to "' + cmd.channel + '"');
    const ok = channel.trigger(cmd.event, cmd.data);
    emit({ client: rec.name, type: 'triggered', ok: !!ok, channel: cmd.channel, event: cmd.event, id: cmd.id });
  },
  signin(cmd) {
    const rec = getClient(cmd);
    rec.pusher.signin();
  },
  disconnect(cmd) {
    const rec = getClient(cmd);
    rec.pusher.disconnect();
  },
  reconnect(cmd) {
    const rec = getClient(cmd);
    rec.pusher.connect();
  },
  send_raw(cmd) {
    const rec = getClient(cmd);
    const ok = rec.pusher.send_event(cmd.event, cmd.data, cmd.channel || undefined);
    emit({ client: rec.name, type: 'sent', ok: !!ok, event: cmd.event, channel: cmd.channel || null, id: cmd.id });
  },
  set_options(cmd) {
    // Change auth behaviour of an existing client (affects future auth calls).
    const rec = getClient(cmd);
    for (const k of ['forgeAuth', 'authFail', 'userData', 'secret', 'appId', 'encryptionMasterKeyBase64', 'raw']) {
      if (k in cmd) rec[k] = cmd[k];
    }
  },
  query(cmd) {
    const rec = getClient(cmd);
    emit(Object.assign({ client: rec.name, type: 'query_result', id: cmd.id }, snapshot(rec)));
  },
  rest(cmd) {
    // Node SDK call; the HTTP answer comes later as a rest_result event.
    runRest(cmd);
  },
  ping() {
    // No-op: the ack proves the driver is alive and has processed everything before it.
  },
  exit() {
    shutdown(0);
  },
};

function handleLine(line) {
  line = line.trim();
  if (!line) return;
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (e) {
    emit({ client: null, type: 'cmd_error', message: 'invalid JSON command: ' + e.message, line });
    return;
  }
  const base = { client: cmd && cmd.client !== undefined ? cmd.client : null, cmd: cmd && cmd.cmd, id: cmd && cmd.id };
  try {
    const h = cmd && Object.prototype.hasOwnProperty.call(handlers, cmd.cmd) ? handlers[cmd.cmd] : null;
    if (!h) throw new Error('unknown command "' + (cmd && cmd.cmd) + '"');
    h(cmd);
    if (cmd.cmd !== 'exit') emit(Object.assign({ type: 'ack' }, base));
  } catch (e) {
    const message = e instanceof Error ? e.message : typeof e === 'string' ? e : JSON.stringify(safe(e));
    emit(Object.assign({ type: 'cmd_error', message }, base));
    if (DEBUG && e instanceof Error) process.stderr.write('[driver] ' + e.stack + '\n');
  }
}

let shuttingDown = false;
function shutdown(code) {
  if (shuttingDown) return;
  shuttingDown = true;
  for (const rec of clients.values()) {
    try {
      rec.pusher.disconnect();
    } catch (e) {
      /* ignore */
    }
  }
  // Flush stdout before leaving.
  process.stdout.write('', () => process.exit(code));
  setTimeout(() => process.exit(code), 500).unref();
}

process.on('uncaughtException', (e) => {
  process.stderr.write('[driver] uncaughtException: ' + (e && e.stack ? e.stack : String(e)) + '\n');
  try {
    emit({ client: null, type: 'driver_error', message: 'uncaughtException: ' + (e && e.message ? e.message : String(e)) });
  } catch (_) {
    /* ignore */
  }
});
process.on('unhandledRejection', (e) => {
  process.stderr.write('[driver] unhandledRejection: ' + (e && e.stack ? e.stack : String(e)) + '\n');
  try {
    emit({ client: null, type: 'driver_error', message: 'unhandledRejection: ' + (e && e.message ? e.message : String(e)) });
  } catch (_) {
    /* ignore */
  }
});
process.stdout.on('error', (e) => {
  // Parent went away (EPIPE): nothing left to talk to.
  if (e && e.code === 'EPIPE') process.exit(0);
});

const rl = readline.createInterface({ input: process.stdin, terminal: false });
rl.on('line', handleLine);
rl.on('close', () => shutdown(0)); // stdin closed: the test process is gone
emit({ client: null, type: 'driver_ready', pid: process.pid, pusher_js: Pusher.VERSION || require('pusher-js/package.json').version });
