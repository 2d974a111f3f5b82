#!/usr/bin/env node
'use strict';
/*
 * The benchmark's load generator: a pool of raw `ws` clients in one Node process.
 *
 * Two wire shapes, both as cheap per message as we can make them:
 *   pusher  Pusher protocol 7: wait for pusher:connection_established, send pusher:subscribe,
 *           wait for pusher_internal:subscription_succeeded.
 *   eio     Socket.IO 5 over a raw Engine.IO 4 WebSocket (no polling upgrade): wait for the
 *           open packet "0{...}", send "40", wait for "40{...}", send the "subscribe" event
 *           with an ack id, wait for the ack "43<id>[...]". Server pings "2" are answered "3".
 *
 * Config is one JSON argument; commands arrive as JSON lines on stdin and every answer is
 * one JSON line on stdout (diagnostics go to stderr). Per delivered message a client only
 * counts (fan-out), or parses one timestamp (latency); nothing else.
 *
 *   {"cmd":"connect"}                  open every client, subscribe each to its channel
 *   {"cmd":"count"}                    reset the counter; "progress" lines each time it
 *                                      passes a multiple of the pool size
 *   {"cmd":"latency"}                  from now on parse {"t":ms} from each message
 *   {"cmd":"stats"}                    counters and latency samples so far
 *   {"cmd":"churn", ...}               subscribe/unsubscribe cycles, see churn() below
 *   {"cmd":"held"}                     after churn: the channel each client holds now
 *   {"cmd":"client_events", ...}       every client sends client-* events at a fixed rate
 *   {"cmd":"track"}                    (protocol 2) parse each message, keep serials per client
 *   {"cmd":"positions"}                per-client last serial seen, and gaps/duplicates so far
 *   {"cmd":"drop"}                     abruptly terminate every client (keep their positions)
 *   {"cmd":"resume", ...}              reconnect, resubscribe, sockudo:resume; see resumeAll()
 *   {"cmd":"close"}                    close every client and exit
 *
 * Config extras (bench/features.py): "protocol" (7 or 2), channel kinds "private" (signed with
 * "app_secret") and "mod" (prefix + i % m).
 */

const WebSocket = require('ws');
const crypto = require('crypto');
const { performance } = require('perf_hooks');

const cfg = JSON.parse(process.argv[2]);
const N = cfg.n;
const PROTO = cfg.proto; // 'pusher' | 'eio'
const INFLIGHT = cfg.inflight || 100;
const LOCAL = cfg.local_addresses || [];
const PROTOCOL = cfg.protocol || 7;

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function channelOf(i) {
  const c = cfg.channels;
  if (c.kind === 'same') return c.name;
  if (c.kind === 'distinct' || c.kind === 'private') return c.prefix + (cfg.offset + i);
  if (c.kind === 'mod') return c.prefix + ((cfg.offset + i) % c.m);
  throw new Error('unknown channel kind ' + c.kind);
}

function nowMs() {
  return performance.timeOrigin + performance.now();
}

// -- wire shapes -------------------------------------------------------------

const enc = {
  pusher: {
    url: (base) => base + '/app/' + cfg.app_key + '?protocol=' + PROTOCOL + '&client=bench&version=1.0',
    subscribe: (ch, ackId, socketId) => {
      const data = { channel: ch };
      if (ch.startsWith('private-')) data.auth = channelAuth(socketId, ch);
      return JSON.stringify({ event: 'pusher:subscribe', data });
    },
    unsubscribe: (ch) => JSON.stringify({ event: 'pusher:unsubscribe', data: { channel: ch } }),
  },
  eio: {
    url: (base) => base + '/socket.io/?EIO=4&transport=websocket',
    subscribe: (ch, ackId) => '42' + ackId + JSON.stringify(['subscribe', ch]),
    unsubscribe: (ch) => '42' + JSON.stringify(['unsubscribe', ch]),
  },
}[PROTO];

function channelAuth(socketId, channel) {
  const sig = crypto.createHmac('sha256', cfg.app_secret).update(socketId + ':' + channel).digest('hex');
  return cfg.app_key + ':' + sig;
}

// client state
const S_OPENING = 0; // waiting for the server's hello
const S_JOINING = 1; // eio only: sent "40", waiting for "40{...}"
const S_SUBSCRIBING = 2; // waiting for the subscription ack
const S_READY = 3;

let mode = 'count'; // 'count' | 'latency' | 'churn'
let count = 0;
let nextProgress = N;
let latencies = [];
let badMessages = 0;
let closedEarly = 0;
let errors = [];
const clients = [];
// private channels need the socket id for their auth; resume needs protocol-2 positions
const NEED_SOCKET_ID = cfg.channels.kind === 'private';

// churn bookkeeping
let churn = null;

function isAck(str) {
  if (PROTO === 'pusher') return str.indexOf('subscription_succeeded') !== -1;
  return str.charCodeAt(0) === 52 && str.charCodeAt(1) === 51; // "43"
}

function handleControl(c, buf) {
  // Small frames while ready: pings (answer them), acks during churn. Returns true when
  // the frame was control traffic and must not be counted as a delivery.
  if (PROTO === 'eio') {
    if (buf.length === 1 && buf[0] === 50) { // "2" ping
      c.ws.send('3');
      return true;
    }
    if (buf[0] === 52 && buf[1] === 51) return true; // "43..." an ack
    return false;
  }
  if (buf.length < 64) {
    const s = buf.toString();
    if (s.indexOf(':ping') !== -1) {
      c.ws.send('{"event":"pusher:pong","data":{}}');
      return true;
    }
    if (s.indexOf(':error') !== -1) {
      badMessages++;
      if (errors.length < 5) errors.push(s);
      return true;
    }
  }
  return false;
}

function onMessage(c, buf) {
  if (c.state === S_READY) {
    if (mode === 'churn') return churnMessage(c, buf);
    if (buf.length < 64 && handleControl(c, buf)) return;
    if (mode === 'track') return trackMessage(c, buf);
    if (mode === 'latency') {
      const s = buf.toString();
      let t;
      if (PROTO === 'pusher') {
        t = JSON.parse(JSON.parse(s).data).t;
      } else {
        const d = JSON.parse(s.slice(2))[1];
        t = (typeof d === 'string' ? JSON.parse(d) : d).t;
      }
      latencies.push(nowMs() - t);
    }
    count++;
    if (count >= nextProgress) {
      nextProgress += N;
      out({ ev: 'progress', count });
    }
    return;
  }
  const s = buf.toString();
  if (c.state === S_OPENING) {
    if (PROTO === 'pusher') {
      if (s.indexOf('connection_established') === -1) return fail(c, 'unexpected hello ' + s.slice(0, 200));
      c.established = nowMs();
      c.state = S_SUBSCRIBING;
      if (NEED_SOCKET_ID) c.socketId = JSON.parse(JSON.parse(s).data).socket_id;
      c.ws.send(enc.subscribe(c.channel, 1, c.socketId));
    } else {
      if (s.charCodeAt(0) !== 48) return fail(c, 'unexpected eio open ' + s.slice(0, 200));
      c.state = S_JOINING;
      c.ws.send('40');
    }
    return;
  }
  if (c.state === S_JOINING) {
    if (s === '2') return c.ws.send('3');
    if (!s.startsWith('40')) return fail(c, 'unexpected eio connect ' + s.slice(0, 200));
    c.established = nowMs();
    c.state = S_SUBSCRIBING;
    c.ws.send(enc.subscribe(c.channel, 1));
    return;
  }
  if (c.state === S_SUBSCRIBING) {
    if (PROTO === 'eio' && s === '2') return c.ws.send('3');
    if (!isAck(s)) {
      if (PROTO === 'pusher' && s.indexOf(':ping') !== -1) return;
      return fail(c, 'unexpected before ack ' + s.slice(0, 200));
    }
    c.state = S_READY;
    c.subscribed = nowMs();
    if (PROTOCOL === 2 && c.pos === null) {
      // the ack's stream_id and serial: a starting position even before any message
      const ack = JSON.parse(s);
      c.pos = { stream_id: ack.stream_id, serial: ack.serial };
    }
    if (c.resume) return sendResume(c);
    if (connectDone) connectDone(c);
  }
}

function fail(c, why) {
  if (errors.length < 5) errors.push(why);
  badMessages++;
  try { c.ws.terminate(); } catch (e) { /* already gone */ }
}

// -- connect -----------------------------------------------------------------

let connectDone = null;

function connectAll() {
  const started = nowMs();
  let launched = 0;
  let finished = 0; // ready or failed
  let ready = 0;
  let failed = 0;
  let lastEstablished = 0;
  let lastSubscribed = 0;
  const url = enc.url(cfg.url);

  function finish() {
    finished++;
    if (finished === N) {
      connectDone = null;
      out({
        ev: 'connected', ok: ready, failed,
        established_ms: lastEstablished - started,
        subscribed_ms: lastSubscribed - started,
        errors,
      });
    } else {
      launch();
    }
  }

  connectDone = (c) => {
    c.done = true; // a later close is not a connect failure
    ready++;
    if (c.established > lastEstablished) lastEstablished = c.established;
    if (c.subscribed > lastSubscribed) lastSubscribed = c.subscribed;
    finish();
  };

  function launch() {
    while (launched < N && launched - finished < INFLIGHT) {
      const i = launched++;
      const c = { ws: null, i, channel: channelOf(i), state: S_OPENING, established: 0, subscribed: 0, done: false,
        dropped: false, socketId: null, pos: null, resume: null, seen: 0, gaps: 0, dups: 0, onFail: null };
      c.onFail = () => {
        failed++;
        finish();
      };
      clients.push(c);
      openClient(c, url);
    }
  }

  launch();
}

// One WebSocket for client `c` (a first connect or a reconnect). Events of a socket the
// client has since replaced are ignored.
function openClient(c, url) {
  const opts = { perMessageDeflate: false, skipUTF8Validation: true };
  if (LOCAL.length) opts.localAddress = LOCAL[c.i % LOCAL.length];
  const ws = new WebSocket(url, opts);
  c.ws = ws;
  c.state = S_OPENING;
  c.done = false;
  c.dropped = false;
  ws.on('message', (data) => {
    if (c.ws === ws) onMessage(c, data);
  });
  ws.on('error', (err) => {
    if (errors.length < 5) errors.push(String(err && err.message));
  });
  ws.on('close', () => {
    if (c.ws !== ws) return;
    if (!c.done) {
      c.done = true;
      if (c.onFail) c.onFail(c);
    } else if (!closing && !c.dropped) {
      closedEarly++;
    }
  });
}

// -- protocol 2: positions, drop, resume ---------------------------------------
//
// In 'track' mode every delivered message is parsed: a message with a serial must be the
// client's last serial + 1 on the same stream (else a gap or a duplicate is counted).
// During a resume, serial-bearing frames before sockudo:resume_success are the replay.

function trackMessage(c, buf) {
  const msg = JSON.parse(buf.toString());
  const ev = msg.event;
  if (ev === 'sockudo:resume_success' || ev === 'sockudo:resume_failed') return resumeReply(c, msg);
  if (typeof ev === 'string' && (ev.startsWith('sockudo:') || ev.startsWith('sockudo_internal:'))) {
    if (ev.indexOf('error') !== -1) {
      badMessages++;
      if (errors.length < 5) errors.push(buf.toString().slice(0, 300));
    }
    return;
  }
  if (msg.serial !== undefined) {
    if (c.pos && c.pos.stream_id === msg.stream_id) {
      if (msg.serial <= c.pos.serial) {
        c.dups++;
        return;
      }
      if (msg.serial !== c.pos.serial + 1) c.gaps += msg.serial - c.pos.serial - 1;
    }
    c.pos = { stream_id: msg.stream_id, serial: msg.serial };
    if (c.resume && !c.resume.success) c.resume.got.push(msg.serial);
  }
  c.seen++;
  count++;
  if (count >= nextProgress) {
    nextProgress += N;
    out({ ev: 'progress', count });
  }
}

let resumeState = null;

function sendResume(c) {
  c.resume.subscribed = nowMs();
  const positions = {};
  positions[c.channel] = { stream_id: c.resume.from.stream_id, serial: c.resume.from.serial };
  c.ws.send(JSON.stringify({ event: 'sockudo:resume', data: { channel_positions: positions } }));
}

function resumeReply(c, msg) {
  const r = c.resume;
  if (!r) return;
  if (msg.event === 'sockudo:resume_failed') {
    r.failed = msg.data;
    return;
  }
  r.success = nowMs();
  const data = JSON.parse(msg.data);
  r.failedChannels = data.failed.length;
  r.replayedReported = data.recovered.reduce((a, x) => a + (x.replayed || 0), 0);
  r.sources = data.recovered.map((x) => x.source);
  c.done = true;
  if (resumeState) resumeState.finish(c);
}

function resumeAll(cmd) {
  const url = enc.url(cmd.url || cfg.url);
  const expect = cmd.expect;
  const t0 = nowMs();
  mode = 'track';
  let launched = 0;
  let finished = 0;
  const res = { ok: 0, exact: 0, failed_connect: 0, failed_resume: 0, wrong: [], total_ms: [], resume_ms: [], last: 0,
    sources: {} };
  function launch() {
    while (launched < clients.length && launched - finished < INFLIGHT) {
      const c = clients[launched++];
      c.resume = { from: c.pos, got: [], t0: nowMs(), subscribed: 0, success: 0, failed: null, dups0: c.dups, gaps0: c.gaps };
      c.onFail = () => {
        res.failed_connect++;
        done();
      };
      openClient(c, url);
    }
  }
  let reported = false;
  function done(timedOut) {
    if (reported) return;
    if (!timedOut) finished++;
    if (finished === clients.length || timedOut) {
      reported = true;
      resumeState = null;
      out({
        incomplete: clients.length - finished,
        ev: 'resumed', clients: clients.length, ok: res.ok, exact: res.exact, failed_connect: res.failed_connect,
        failed_resume: res.failed_resume, wall_ms: res.last - t0, wrong: res.wrong.slice(0, 5),
        total_ms: res.total_ms, resume_ms: res.resume_ms, sources: res.sources, errors,
      });
    } else {
      launch();
    }
  }
  setTimeout(() => done(true), cmd.timeout_ms || 60000);
  resumeState = {
    finish(c) {
      if (reported) return;
      const r = c.resume;
      const from = r.from.serial;
      let exact = r.got.length === expect && !r.failed && r.failedChannels === 0 && c.dups === r.dups0 &&
        c.gaps === r.gaps0;
      for (let k = 0; exact && k < r.got.length; k++) if (r.got[k] !== from + 1 + k) exact = false;
      for (const src of r.sources) res.sources[src] = (res.sources[src] || 0) + 1;
      if (r.failed || r.failedChannels) res.failed_resume++;
      else res.ok++;
      if (exact) res.exact++;
      else if (res.wrong.length < 5) res.wrong.push({ i: c.i, from, got: r.got.slice(0, 30), failed: r.failed });
      res.total_ms.push(Math.round((r.success - r.t0) * 1000) / 1000);
      res.resume_ms.push(Math.round((r.success - r.subscribed) * 1000) / 1000);
      if (r.success > res.last) res.last = r.success;
      done();
    },
  };
  launch();
}

function dropAll() {
  let open = 0;
  for (const c of clients) {
    c.dropped = true;
    c.done = true;
    if (c.ws.readyState === WebSocket.OPEN || c.ws.readyState === WebSocket.CONNECTING) open++;
    try { c.ws.terminate(); } catch (e) { /* gone */ }
  }
  out({ ev: 'dropped', clients: clients.length, open });
}

function positions() {
  let gaps = 0;
  let dups = 0;
  let withPos = 0;
  for (const c of clients) {
    gaps += c.gaps;
    dups += c.dups;
    if (c.pos && c.pos.stream_id) withPos++;
  }
  out({ ev: 'positions', gaps, dups, with_position: withPos, serials: clients.map((c) => (c.pos ? c.pos.serial : null)) });
}

// -- client events --------------------------------------------------------------
//
// Every ready client sends `rate` client events per second on its own channel (which must be
// private or presence), spread evenly with a random phase, for `duration_ms`.

function clientEvents(cmd) {
  const period = 1000 / cmd.rate;
  let sent = 0;
  let stopping = false;
  const timers = [];
  const t0 = nowMs();
  const received0 = count;
  for (const c of clients) {
    if (c.state !== S_READY) continue;
    let k = 0;
    const tick = () => {
      if (stopping || c.ws.readyState !== WebSocket.OPEN) return;
      c.ws.send('{"event":"' + cmd.event + '","channel":"' + c.channel + '","data":{"n":' + (k++) + ',"pad":"' +
        'x'.repeat(40) + '"}}');
      sent++;
    };
    timers.push(setTimeout(() => {
      tick();
      timers.push(setInterval(tick, period));
    }, Math.random() * period));
  }
  setTimeout(() => {
    stopping = true;
    const elapsed = nowMs() - t0;
    for (const t of timers) clearTimeout(t);
    setTimeout(() => {
      out({ ev: 'client_events_done', sent, elapsed_ms: elapsed, frames_received: count - received0, bad: badMessages, errors });
    }, 300);
  }, cmd.duration_ms);
}

// -- churn -------------------------------------------------------------------
//
// Every client holds at most one channel. Each cycle: subscribe to a random channel out of
// `channels`, time the ack, then unsubscribe from the one held before. Cycles are paced:
// each client waits `interval_ms` (randomised start) between cycles, for `duration_ms`.

function churnMessage(c, buf) {
  if (buf.length < 64 && PROTO === 'eio' && buf.length === 1 && buf[0] === 50) {
    c.ws.send('3');
    return;
  }
  const s = buf.toString();
  if (!isAck(s)) {
    if (s.indexOf('pusher:ping') !== -1) c.ws.send('{"event":"pusher:pong","data":{}}');
    return;
  }
  if (c.churnPending === null) return; // the initial subscription's late ack
  churn.lat.push(nowMs() - c.churnSent);
  churn.cycles++;
  if (c.held !== null) c.ws.send(enc.unsubscribe(c.held));
  c.held = c.churnPending;
  c.churnPending = null;
  if (!churn.stopping) setTimeout(() => churnCycle(c), churn.interval);
}

function churnCycle(c) {
  if (churn.stopping || c.ws.readyState !== WebSocket.OPEN) return;
  let ch = c.held;
  while (ch === c.held) ch = churn.prefix + Math.floor(Math.random() * churn.channels);
  c.churnPending = ch;
  c.churnSent = nowMs();
  churn.ackId = (churn.ackId + 1) % 1000000;
  c.ws.send(enc.subscribe(ch, churn.ackId));
}

function startChurn(cmd) {
  churn = {
    channels: cmd.channels,
    prefix: cmd.prefix,
    interval: cmd.interval_ms,
    stopping: false,
    cycles: 0,
    lat: [],
    ackId: 0,
  };
  mode = 'churn';
  const t0 = nowMs();
  for (const c of clients) {
    if (c.state !== S_READY) continue;
    c.held = c.channel; // the channel it subscribed to at connect
    c.churnPending = null;
    setTimeout(() => churnCycle(c), Math.random() * cmd.interval_ms);
  }
  setTimeout(() => {
    churn.stopping = true;
    const elapsed = nowMs() - t0;
    // let in-flight acks land before reporting (bounded: 10 s)
    const settle = nowMs();
    const check = () => {
      const pending = clients.filter((c) => c.churnPending !== null && c.churnPending !== undefined &&
        c.ws.readyState === WebSocket.OPEN).length;
      if (pending && nowMs() - settle < 10000) return setTimeout(check, 50);
      setTimeout(() => {
        out({ ev: 'churn_done', cycles: churn.cycles, elapsed_ms: elapsed, pending_left: pending,
          latencies: churn.lat.map((x) => Math.round(x * 1000) / 1000), errors });
      }, 100);
    };
    check();
  }, cmd.duration_ms);
}

// -- commands ----------------------------------------------------------------

let closing = false;

function command(msg) {
  switch (msg.cmd) {
    case 'connect':
      return connectAll();
    case 'count':
      mode = 'count';
      count = 0;
      nextProgress = N;
      return out({ ev: 'ok' });
    case 'latency':
      mode = 'latency';
      count = 0;
      nextProgress = N;
      latencies = [];
      return out({ ev: 'ok' });
    case 'stats': {
      const open = clients.filter((c) => c.ws.readyState === WebSocket.OPEN).length;
      const body = { ev: 'stats', count, open, bad: badMessages, closed_early: closedEarly, errors };
      if (msg.latencies) body.latencies = latencies.map((x) => Math.round(x * 1000) / 1000);
      return out(body);
    }
    case 'churn':
      return startChurn(msg);
    case 'held':
      return out({ ev: 'held', channels: clients.filter((c) => c.ws.readyState === WebSocket.OPEN).map((c) => c.held) });
    case 'client_events':
      return clientEvents(msg);
    case 'track':
      mode = 'track';
      count = 0;
      nextProgress = N;
      return out({ ev: 'ok' });
    case 'positions':
      return positions();
    case 'drop':
      return dropAll();
    case 'resume':
      return resumeAll(msg);
    case 'close':
      closing = true;
      for (const c of clients) {
        try { c.ws.terminate(); } catch (e) { /* gone */ }
      }
      out({ ev: 'closed' });
      return setTimeout(() => process.exit(0), 50);
    default:
      out({ ev: 'error', message: 'unknown command ' + msg.cmd });
  }
}

let pending = '';
process.stdin.on('data', (chunk) => {
  pending += chunk.toString();
  let nl;
  while ((nl = pending.indexOf('\n')) !== -1) {
    const line = pending.slice(0, nl).trim();
    pending = pending.slice(nl + 1);
    if (line) command(JSON.parse(line));
  }
});
process.stdin.on('end', () => process.exit(0));
