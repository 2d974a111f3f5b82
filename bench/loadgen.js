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
 *   {"cmd":"close"}                    close every client and exit
 */

const WebSocket = require('ws');
const { performance } = require('perf_hooks');

const cfg = JSON.parse(process.argv[2]);
const N = cfg.n;
const PROTO = cfg.proto; // 'pusher' | 'eio'
const INFLIGHT = cfg.inflight || 100;
const LOCAL = cfg.local_addresses || [];

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function channelOf(i) {
  const c = cfg.channels;
  if (c.kind === 'same') return c.name;
  if (c.kind === 'distinct') return c.prefix + (cfg.offset + i);
  throw new Error('unknown channel kind ' + c.kind);
}

function nowMs() {
  return performance.timeOrigin + performance.now();
}

// -- wire shapes -------------------------------------------------------------

const enc = {
  pusher: {
    url: (base) => base + '/app/' + cfg.app_key + '?protocol=7&client=bench&version=1.0',
    subscribe: (ch) => JSON.stringify({ event: 'pusher:subscribe', data: { channel: ch } }),
    unsubscribe: (ch) => JSON.stringify({ event: 'pusher:unsubscribe', data: { channel: ch } }),
  },
  eio: {
    url: (base) => base + '/socket.io/?EIO=4&transport=websocket',
    subscribe: (ch, ackId) => '42' + ackId + JSON.stringify(['subscribe', ch]),
    unsubscribe: (ch) => '42' + JSON.stringify(['unsubscribe', ch]),
  },
}[PROTO];

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
    if (s.indexOf('pusher:ping') !== -1) {
      c.ws.send('{"event":"pusher:pong","data":{}}');
      return true;
    }
    if (s.indexOf('pusher:error') !== -1) {
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
      if (s.indexOf('pusher:connection_established') === -1) return fail(c, 'unexpected hello ' + s.slice(0, 200));
      c.established = nowMs();
      c.state = S_SUBSCRIBING;
      c.ws.send(enc.subscribe(c.channel, 1));
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
      if (PROTO === 'pusher' && s.indexOf('pusher:ping') !== -1) return;
      return fail(c, 'unexpected before ack ' + s.slice(0, 200));
    }
    c.state = S_READY;
    c.subscribed = nowMs();
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
      const opts = { perMessageDeflate: false, skipUTF8Validation: true };
      if (LOCAL.length) opts.localAddress = LOCAL[i % LOCAL.length];
      const ws = new WebSocket(url, opts);
      const c = { ws, i, channel: channelOf(i), state: S_OPENING, established: 0, subscribed: 0, done: false };
      clients.push(c);
      ws.on('message', (data) => onMessage(c, data));
      ws.on('error', (err) => {
        if (errors.length < 5) errors.push(String(err && err.message));
      });
      ws.on('close', () => {
        if (!c.done) {
          c.done = true;
          failed++;
          finish();
        } else if (!closing) {
          closedEarly++;
        }
      });
    }
  }

  launch();
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
    // let in-flight acks land before reporting
    setTimeout(() => {
      out({ ev: 'churn_done', cycles: churn.cycles, elapsed_ms: elapsed, latencies: churn.lat.map((x) => Math.round(x * 1000) / 1000), errors });
    }, 500);
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
