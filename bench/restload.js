// The REST scenario's load generator: closed-loop publishers on keep-alive HTTP
// connections, the way SDK users publish, from one Node process (so it is not the bottleneck).
//
//   node restload.js '{"port": 7000, "path": "/apps/1/events", "signed": true, "app_key": "k",
//                      "app_secret": "s", "body": "{...}", "connections": 8, "seconds": 10}'
//
// Every connection keeps exactly one request in flight: the next publish leaves when the
// previous response has been read. Signed requests carry auth_key, auth_timestamp,
// auth_version=1.0, body_md5 and an HMAC-SHA256 over "POST\n{path}\n{sorted query}"; like
// the Python publisher, the signature is reused for the same body within the same second.
//
// stdout, one JSON line each: {"ev":"ready",...} once every connection has completed one
// publish (connected and warm); then, after a "go" line on stdin, it runs for `seconds` and
// prints {"ev":"done","ok","errors","seconds","statuses","cpu_s"} and exits. Loopback only,
// bounded: it exits by itself after seconds + 60 s whatever happens, and when stdin closes.
"use strict";

const net = require("net");
const crypto = require("crypto");

const cfg = JSON.parse(process.argv[2]);
const HOST = "127.0.0.1";
const N = Math.max(1, cfg.connections | 0);
const body = Buffer.from(cfg.body, "utf8");
const bodyMd5 = crypto.createHash("md5").update(body).digest("hex");

const hardStop = setTimeout(() => {
  out({ ev: "error", error: "hard time limit reached" });
  process.exit(3);
}, (Number(cfg.seconds) + 60) * 1000);
hardStop.unref();

function out(msg) {
  process.stdout.write(JSON.stringify(msg) + "\n");
}

let signedFor = -1;
let signedPath = cfg.path;
function url() {
  if (!cfg.signed) return cfg.path;
  const ts = Math.floor(Date.now() / 1000);
  if (ts !== signedFor) {
    // already in sorted order; none of these values needs URL-encoding
    const query = `auth_key=${cfg.app_key}&auth_timestamp=${ts}&auth_version=1.0&body_md5=${bodyMd5}`;
    const sig = crypto.createHmac("sha256", cfg.app_secret).update(`POST\n${cfg.path}\n${query}`).digest("hex");
    signedPath = `${cfg.path}?${query}&auth_signature=${sig}`;
    signedFor = ts;
  }
  return signedPath;
}

// One keep-alive connection with one publish in flight. The request is written whole in one
// write (pre-built bytes, rebuilt when the signature's second changes); the response is framed
// by its Content-Length (every server here sends one), its status read from the status line.
// Raw `net` rather than the `http` module: `http`'s client cost ~120 µs of CPU per request
// here, which on this 2-core machine took a third of a core from the server under test.
let reqFor = null;
let reqBytes = null;
function request() {
  const u = url();
  if (u !== reqFor) {
    const head = `POST ${u} HTTP/1.1\r\nHost: ${HOST}:${cfg.port}\r\nContent-Type: application/json\r\n` +
      `Content-Length: ${body.length}\r\nConnection: keep-alive\r\n\r\n`;
    reqBytes = Buffer.concat([Buffer.from(head, "latin1"), body]);
    reqFor = u;
  }
  return reqBytes;
}

const statuses = {};
let ok = 0;
let errors = 0;
let counting = false;
let deadline = 0;
const errorSamples = [];

function noteError(what) {
  if (counting) errors += 1;
  if (errorSamples.length < 5) errorSamples.push(String(what));
}

function count(status) {
  if (counting) {
    statuses[status] = (statuses[status] || 0) + 1;
    if (status === 200) ok += 1;
    else errors += 1;
  } else if (status !== 200) {
    noteError(`warm-up status ${status}`);
  }
}

const CRLF2 = Buffer.from("\r\n\r\n");

class Conn {
  constructor() {
    this.sock = null;
    this.buf = null; // unparsed response bytes
    this.need = -1; // total bytes of the current response once its head is parsed
    this.status = 0;
    this.onIdle = null;
    this.inFlight = false;
    this.closeAfter = false;
  }

  open() {
    const sock = net.connect({ host: HOST, port: cfg.port, noDelay: true });
    sock.setNoDelay(true);
    // events of a socket this connection has already given up on are ignored
    sock.on("data", (chunk) => {
      if (this.sock === sock) this.data(chunk);
    });
    sock.on("error", (err) => {
      if (this.sock === sock) this.fail(err.message);
    });
    sock.on("close", () => {
      if (this.sock !== sock) return;
      if (this.inFlight) this.fail("connection closed mid-response");
      this.sock = null;
    });
    this.sock = sock;
    this.buf = null;
    this.need = -1;
    this.closeAfter = false;
  }

  publish(onIdle) {
    this.onIdle = onIdle;
    if (this.sock === null || this.sock.destroyed) this.open();
    this.inFlight = true;
    this.sock.write(request());
  }

  data(chunk) {
    this.buf = this.buf === null ? chunk : Buffer.concat([this.buf, chunk]);
    if (this.need < 0) {
      const end = this.buf.indexOf(CRLF2);
      if (end < 0) return;
      const head = this.buf.toString("latin1", 0, end);
      this.status = parseInt(head.slice(9, 12), 10);
      const m = /\r\ncontent-length:\s*(\d+)/i.exec(head);
      if (!m) {
        this.fail("response without Content-Length");
        return;
      }
      this.need = end + 4 + parseInt(m[1], 10);
      if (/\r\nconnection:\s*close/i.test(head)) this.closeAfter = true;
    }
    if (this.buf.length < this.need) return;
    if (this.buf.length > this.need) {
      this.fail("bytes after the response (one request was in flight)");
      return;
    }
    this.buf = null;
    this.need = -1;
    this.inFlight = false;
    if (this.closeAfter) {
      const sock = this.sock;
      this.sock = null;
      sock.destroy();
    }
    count(this.status);
    next(this, 0);
  }

  fail(what) {
    if (!this.inFlight) return;
    this.inFlight = false;
    this.buf = null;
    this.need = -1;
    const sock = this.sock;
    this.sock = null;
    if (sock !== null) sock.destroy();
    noteError(what);
    next(this, 10); // back off a little: a refused connection must not spin
  }
}

function next(conn, delayMs) {
  if (counting && performance.now() < deadline) {
    if (delayMs) setTimeout(() => conn.publish(conn.onIdle), delayMs);
    else conn.publish(conn.onIdle);
  } else {
    conn.onIdle();
  }
}

const conns = [];
for (let i = 0; i < N; i++) conns.push(new Conn());

function warmUp() {
  let pending = N;
  for (let i = 0; i < N; i++) {
    conns[i].publish(() => {
      if (--pending === 0) out({ ev: "ready", connections: N, errors: errorSamples });
    });
  }
}

function go() {
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  deadline = t0 + Number(cfg.seconds) * 1000;
  counting = true;
  let running = N;
  for (let i = 0; i < N; i++) {
    conns[i].publish(() => {
      if (--running > 0) return;
      const seconds = (performance.now() - t0) / 1000;
      const cpu = process.cpuUsage(cpu0);
      out({
        ev: "done", ok, errors, seconds: Math.round(seconds * 1000) / 1000, statuses,
        cpu_s: Math.round((cpu.user + cpu.system) / 1000) / 1000, error_samples: errorSamples,
      });
      for (const c of conns) if (c.sock) c.sock.destroy();
      process.exit(0);
    });
  }
}

let buf = "";
process.stdin.on("data", (chunk) => {
  buf += chunk;
  let i;
  while ((i = buf.indexOf("\n")) >= 0) {
    const line = buf.slice(0, i).trim();
    buf = buf.slice(i + 1);
    if (line === "go") go();
  }
});
process.stdin.on("end", () => process.exit(0)); // the harness went away

warmUp();
