// The Sockudo console page: plain JavaScript, no build step, no dependencies.
// Everything shown comes from the server as JSON and is written with textContent (never as
// HTML): event names, channels and payloads are whatever clients sent.
"use strict";

(function () {
  const PATH = document.body.dataset.path;
  const LOG_LIMIT = 500; // rows kept in the page; older ones are removed
  const PAUSED_LIMIT = 500; // events held while paused; beyond that they are counted as dropped
  const CHART_SECONDS = 300;

  const $ = (id) => document.getElementById(id);
  let csrf = "";
  let kinds = [];
  let appId = "";
  let source = null;
  let paused = false;
  let held = [];
  let droppedServer = 0;
  let droppedPage = 0;
  let samples = [];

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  async function api(method, url, body) {
    const init = { method, credentials: "same-origin", headers: {} };
    if (method !== "GET") init.headers["X-Console-CSRF"] = csrf;
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const resp = await fetch(PATH + url, init);
    if (resp.status === 401) {
      window.location.href = PATH + "/";
      throw new Error("signed out");
    }
    const data = await resp.json().catch(() => ({}));
    if (!resp.ok) throw new Error(data.error || resp.statusText);
    return data;
  }

  // -- charts ------------------------------------------------------------------------

  function drawChart(canvas, values) {
    const ctx = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height;
    ctx.clearRect(0, 0, w, h);
    if (values.length < 2) return;
    const max = Math.max(1, ...values);
    ctx.strokeStyle = "#3b6fd8";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    values.forEach((v, i) => {
      const x = (i / (CHART_SECONDS - 1)) * w + (w - (values.length / CHART_SECONDS) * w);
      const y = h - 2 - (v / max) * (h - 4);
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
  }

  function showSamples() {
    const last = samples[samples.length - 1];
    if (last) {
      $("stat-connections").textContent = last.connections;
      $("stat-channels").textContent = last.channels;
      $("stat-messages").textContent = last.messages;
    }
    drawChart($("chart-connections"), samples.map((s) => s.connections));
    drawChart($("chart-channels"), samples.map((s) => s.channels));
    drawChart($("chart-messages"), samples.map((s) => s.messages));
  }

  function showCluster(cluster) {
    const list = $("nodes");
    list.replaceChildren();
    for (const node of cluster.nodes) {
      const item = el("li", node.id + ": " + node.connections + " connections");
      if (node.id === cluster.this_node) item.className = "this-node";
      list.appendChild(item);
    }
  }

  async function loadOverview() {
    const data = await api("GET", "/api/apps/" + encodeURIComponent(appId) + "/overview");
    samples = data.samples.slice(-CHART_SECONDS);
    showSamples();
    showCluster(data.cluster);
  }

  // -- channels ------------------------------------------------------------------------

  async function loadChannels() {
    const data = await api("GET", "/api/apps/" + encodeURIComponent(appId) + "/channels");
    const body = $("channels");
    body.replaceChildren();
    for (const ch of data.channels) {
      const row = el("tr");
      const name = el("td");
      if (ch.presence) {
        const link = el("button", ch.name, "link");
        link.type = "button";
        link.addEventListener("click", () => loadMembers(ch.name));
        name.appendChild(link);
      } else {
        name.textContent = ch.name;
      }
      row.appendChild(name);
      row.appendChild(el("td", ch.subscribers));
      row.dataset.channel = ch.name;
      body.appendChild(row);
    }
    let note = data.total + " channel(s)";
    if (data.total > data.channels.length) note += ", first " + data.channels.length + " shown";
    if (!data.complete) note += " (some nodes did not answer)";
    $("channels-note").textContent = note;
  }

  async function loadMembers(channel) {
    const data = await api("GET", "/api/apps/" + encodeURIComponent(appId) + "/channels/" +
      encodeURIComponent(channel) + "/members");
    $("members").hidden = false;
    $("members-title").textContent = channel + ": " + data.count + " member(s)";
    const list = $("members-list");
    list.replaceChildren();
    for (const m of data.members) list.appendChild(el("li", m.user_id + " " + JSON.stringify(m.user_info)));
  }

  // -- event log ------------------------------------------------------------------------

  function details(ev) {
    const skip = new Set(["t", "node", "app", "kind", "channel", "event"]);
    const parts = [];
    for (const [k, v] of Object.entries(ev)) {
      if (skip.has(k) || v === null || v === undefined) continue;
      parts.push(k + "=" + (typeof v === "string" ? v : JSON.stringify(v)));
    }
    return parts.join("  ");
  }

  function visible(row) {
    const channel = $("filter-channel").value.trim();
    const kindBox = document.querySelector('#filter-kinds input[value="' + row.dataset.kind + '"]');
    if (kindBox && !kindBox.checked) return false;
    return !channel || (row.dataset.channel || "").includes(channel);
  }

  function addRow(ev) {
    const row = el("tr", undefined, "kind-" + ev.kind);
    row.dataset.kind = ev.kind;
    row.dataset.channel = ev.channel || "";
    row.appendChild(el("td", new Date(ev.t).toISOString().substring(11, 23)));
    row.appendChild(el("td", ev.node));
    row.appendChild(el("td", ev.kind));
    row.appendChild(el("td", ev.channel || ""));
    row.appendChild(el("td", ev.event || ""));
    row.appendChild(el("td", details(ev), "details"));
    row.hidden = !visible(row);
    const body = $("log");
    body.insertBefore(row, body.firstChild);
    while (body.childElementCount > LOG_LIMIT) body.removeChild(body.lastChild);
  }

  function showCounts() {
    $("log-count").textContent = $("log").childElementCount;
    $("dropped").textContent = droppedServer + droppedPage;
    $("paused-note").textContent = paused ? " · paused, " + held.length + " waiting" : "";
  }

  function onEvents(list) {
    for (const ev of list) {
      if (paused) {
        if (held.length >= PAUSED_LIMIT) { held.shift(); droppedPage++; }
        held.push(ev);
      } else {
        addRow(ev);
      }
    }
    showCounts();
  }

  function refilter() {
    for (const row of $("log").children) row.hidden = !visible(row);
  }

  function connectStream() {
    if (source) source.close();
    source = new EventSource(PATH + "/api/apps/" + encodeURIComponent(appId) + "/events");
    const state = $("stream-state");
    source.onopen = () => { state.textContent = "live"; state.className = "badge live"; };
    source.onerror = () => { state.textContent = "reconnecting"; state.className = "badge"; };
    source.addEventListener("events", (msg) => onEvents(JSON.parse(msg.data)));
    source.addEventListener("stats", (msg) => {
      const data = JSON.parse(msg.data);
      droppedServer = data.dropped;
      if (data.sample && (!samples.length || samples[samples.length - 1].t !== data.sample.t)) {
        samples.push(data.sample);
        if (samples.length > CHART_SECONDS) samples.shift();
        showSamples();
      }
      showCounts();
    });
  }

  // -- actions ------------------------------------------------------------------------

  async function publish(e) {
    e.preventDefault();
    const result = $("pub-result");
    result.className = "result";
    let data;
    try {
      data = JSON.parse($("pub-data").value || "null");
    } catch (err) {
      result.textContent = "Data is not valid JSON: " + err.message;
      result.className = "result error";
      return;
    }
    try {
      await api("POST", "/api/apps/" + encodeURIComponent(appId) + "/publish",
        { channel: $("pub-channel").value, name: $("pub-event").value, data: data });
      result.textContent = "Sent.";
    } catch (err) {
      result.textContent = "Refused: " + err.message;
      result.className = "result error";
    }
  }

  async function pushLookup(e) {
    e.preventDefault();
    const out = $("push-result");
    try {
      const data = await api("GET", "/api/apps/" + encodeURIComponent(appId) + "/push/" +
        encodeURIComponent($("push-id").value));
      out.textContent = JSON.stringify(data, null, 2);
    } catch (err) {
      out.textContent = err.message;
    }
  }

  async function loadDeadLetters() {
    const body = $("dead-letters");
    const note = $("dl-result");
    let data;
    try {
      data = await api("GET", "/api/apps/" + encodeURIComponent(appId) + "/dead-letters");
    } catch (err) {
      body.replaceChildren();
      note.textContent = err.message;
      return;
    }
    body.replaceChildren();
    for (const d of data.dead_letters) {
      const row = el("tr");
      row.dataset.id = d.id;
      row.appendChild(el("td", d.failed_ms ? new Date(d.failed_ms).toISOString() : "-"));
      row.appendChild(el("td", d.events.join(", ")));
      row.appendChild(el("td", d.url));
      row.appendChild(el("td", d.reason + (d.status ? " (" + d.status + ")" : d.error ? " (" + d.error + ")" : "")));
      row.appendChild(el("td", d.attempts));
      const cell = el("td");
      const button = el("button", "Replay", "small replay");
      button.type = "button";
      button.addEventListener("click", async () => {
        try {
          const r = await api("POST", "/api/apps/" + encodeURIComponent(appId) + "/dead-letters/" +
            encodeURIComponent(d.id) + "/replay");
          note.textContent = "Replayed " + r.replayed + " (delivery " + r.delivery_id + ").";
          row.remove();
        } catch (err) {
          note.textContent = "Replay refused: " + err.message;
        }
      });
      cell.appendChild(button);
      row.appendChild(cell);
      body.appendChild(row);
    }
    note.textContent = data.stored + " dead letter(s) stored";
  }

  // -- start ------------------------------------------------------------------------------

  function selectApp(id) {
    appId = id;
    $("log").replaceChildren();
    held = [];
    samples = [];
    connectStream();
    loadOverview().catch(() => {});
    loadChannels().catch(() => {});
    loadDeadLetters();
  }

  async function start() {
    $("log-limit").textContent = LOG_LIMIT;
    const session = await api("GET", "/api/session");
    csrf = session.csrf;
    kinds = session.kinds;
    $("node").textContent = "node " + session.node;
    const picker = $("app");
    for (const app of session.apps) {
      const option = el("option", app.id + " (" + app.key + ")");
      option.value = app.id;
      picker.appendChild(option);
    }
    const box = $("filter-kinds");
    for (const kind of kinds) {
      const label = el("label", undefined, "check");
      const input = el("input");
      input.type = "checkbox";
      input.value = kind;
      input.checked = true;
      input.addEventListener("change", refilter);
      label.appendChild(input);
      label.appendChild(document.createTextNode(" " + kind));
      box.appendChild(label);
    }
    picker.addEventListener("change", () => selectApp(picker.value));
    $("filter-channel").addEventListener("input", refilter);
    $("pause").addEventListener("click", () => {
      paused = !paused;
      $("pause").textContent = paused ? "Resume" : "Pause";
      if (!paused) { const waiting = held; held = []; for (const ev of waiting) addRow(ev); }
      showCounts();
    });
    $("clear").addEventListener("click", () => { $("log").replaceChildren(); showCounts(); });
    $("publish").addEventListener("submit", publish);
    $("push").addEventListener("submit", pushLookup);
    $("channels-refresh").addEventListener("click", () => loadChannels().catch(() => {}));
    $("dl-refresh").addEventListener("click", loadDeadLetters);
    $("signout").addEventListener("click", async () => {
      await api("POST", "/logout").catch(() => {});
      window.location.href = PATH + "/";
    });
    if (session.apps.length) selectApp(session.apps[0].id);
    setInterval(() => { if (appId) { loadChannels().catch(() => {}); loadOverview().catch(() => {}); } }, 5000);
  }

  start().catch((err) => { $("stream-state").textContent = err.message; });
})();
