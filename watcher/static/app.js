// LionMQ watcher page: one WebSocket (/feed), two tables, five canvas charts. No dependencies.
// Everything a node sends is shown with textContent or drawn on a canvas, never parsed as HTML.
"use strict";

(() => {
  // History point layout (see watcher/state.py):
  // [t, cpu, rss, mem%, hostCpu%, hostMem%, {ch: [...]}, [node totals]]; a node with many channels
  // lists only its deepest and busiest, so node-wide series come from the totals.
  const P = { t: 0, cpu: 1, rss: 2, mem: 3, hostCpu: 4, hostMem: 5, ch: 6, tot: 7 };
  const C = { ready: 0, delayed: 1, inFlight: 2, enq: 3, deq: 4, ack: 5, nack: 6, dead: 7, oldest: 8, p50: 9, p99: 10 };
  const COLORS = ["#2563eb", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#0891b2", "#db2777", "#65a30d"];

  const model = {
    nodes: new Map(), // id -> node view (latest snapshot + status)
    history: new Map(), // id -> [point, ...] oldest first
    offset: 0, // server clock minus ours
    windowMs: 15 * 60 * 1000,
    stepMs: 1000,
    ingest: null,
    cluster: null, // shards, node cards and the failover timeline (watcher/cluster.py)
    alerts: { alerts: [], cleared: [] }, // raised now, and the last cleared (watcher/alerts.py)
    focus: { node: null, channel: null },
    sort: { key: "depth", dir: -1 },
    rangeMs: 5 * 60 * 1000,
    filter: "",
    lastMessage: 0,
  };

  const $ = (sel) => document.querySelector(sel);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = String(value);
      else if (key.startsWith("data-") || key === "title" || key === "role" || key === "tabindex" || key.startsWith("aria-")) node.setAttribute(key, String(value));
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }

  // -- formatting -------------------------------------------------------------------------------
  const serverNow = () => Date.now() + model.offset;

  function fmtNum(v, digits = 0) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    const abs = Math.abs(v);
    if (abs >= 1e9) return (v / 1e9).toFixed(1) + "G";
    if (abs >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (abs >= 1e4) return (v / 1e3).toFixed(1) + "k";
    return v.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: 0 });
  }
  const fmtRate = (v) => (v === null || v === undefined ? "–" : v < 10 && v > 0 ? v.toFixed(2) : fmtNum(v, 1));

  function fmtMs(v) {
    if (v === null || v === undefined) return "–";
    if (v < 1000) return Math.round(v) + " ms";
    if (v < 60000) return (v / 1000).toFixed(v < 10000 ? 2 : 1) + " s";
    if (v < 3600000) return (v / 60000).toFixed(1) + " min";
    return (v / 3600000).toFixed(1) + " h";
  }

  function fmtDuration(s) {
    if (s === null || s === undefined) return "–";
    s = Math.floor(s);
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${s % 60}s`;
    return `${s}s`;
  }

  function fmtBytes(b) {
    if (b === null || b === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
    return (i === 0 ? b : b.toFixed(b < 10 ? 2 : 1)) + " " + units[i];
  }

  function fmtAgo(ms) {
    if (ms < 1000) return "just now";
    return fmtMs(ms) + " ago";
  }

  const fmtClock = (t) => new Date(t).toLocaleTimeString("en-GB", { hour12: false });

  // -- the feed ---------------------------------------------------------------------------------
  let retryMs = 500;
  // The viewer token (WATCHER_VIEW_TOKEN), when the watcher has one: from #token=... (a fragment
  // never reaches a server's logs), else asked for when the feed answers UNAUTHORIZED.
  const UNAUTHORIZED = 4401;
  let viewToken = new URLSearchParams(location.hash.slice(1)).get("token")
    || sessionStorage.getItem("lionmq.viewToken") || "";
  if (new URLSearchParams(location.hash.slice(1)).has("token")) {
    history.replaceState(null, "", location.pathname + location.search);
  }

  function feedProtocols() {
    if (!viewToken) return ["lionmq.view"];
    const bytes = new TextEncoder().encode(viewToken);
    const b64 = btoa(String.fromCharCode(...bytes))
      .replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
    return ["lionmq.view", `lionmq.token.${b64}`];
  }

  function connect() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${proto}//${location.host}/feed`, feedProtocols());
    ws.onopen = () => { retryMs = 500; };
    ws.onmessage = (event) => {
      let msg;
      try { msg = JSON.parse(event.data); } catch { return; }
      handle(msg);
    };
    ws.onclose = (event) => {
      if (event.code === UNAUTHORIZED) {
        const given = prompt(viewToken ? "Wrong viewer token. Viewer token (WATCHER_VIEW_TOKEN):"
          : "This watcher needs its viewer token (WATCHER_VIEW_TOKEN):");
        if (given === null) { setConn("wait", "Viewer token needed (reload to enter it)"); return; }
        viewToken = given;
        sessionStorage.setItem("lionmq.viewToken", given);
      }
      setConn("wait", "Reconnecting…");
      setTimeout(connect, retryMs);
      retryMs = Math.min(retryMs * 2, 5000);
    };
  }

  function setConn(kind, text) {
    const c = $("#conn");
    c.className = `conn conn-${kind}`;
    c.textContent = text;
  }

  function trim(points) {
    const horizon = serverNow() - model.windowMs;
    let i = 0;
    while (i < points.length && points[i][P.t] < horizon) i++;
    if (i) points.splice(0, i);
  }

  function handle(msg) {
    if (msg.now_ms) model.offset = msg.now_ms - Date.now();
    model.lastMessage = Date.now();
    if (msg.type === "hello") {
      setConn("live", "Live");
      model.windowMs = msg.window_ms;
      model.stepMs = msg.step_ms;
      model.nodes = new Map(msg.nodes.map((n) => [n.id, n]));
      model.history = new Map(Object.entries(msg.history));
      model.ingest = msg.ingest;
      model.cluster = msg.cluster || null;
      model.alerts = msg.alerts || { alerts: [], cleared: [] };
      if (model.focus.node && !model.nodes.has(model.focus.node)) model.focus = { node: null, channel: null };
    } else if (msg.type === "node") {
      const view = msg.node;
      model.nodes.set(view.id, view);
      if (msg.point) {
        let points = model.history.get(view.id);
        if (!points) model.history.set(view.id, (points = []));
        points.push(msg.point);
        trim(points);
      }
    } else if (msg.type === "status") {
      for (const [id, s] of Object.entries(msg.nodes)) {
        const view = model.nodes.get(id);
        if (view) { view.status = s.status; view.connected = s.connected; }
      }
      for (const id of msg.removed || []) { model.nodes.delete(id); model.history.delete(id); }
      model.ingest = msg.ingest;
    } else if (msg.type === "cluster") {
      model.cluster = msg.cluster;
    } else if (msg.type === "alerts") {
      model.alerts = { alerts: msg.alerts, cleared: msg.cleared };
    } else {
      return;
    }
    scheduleRender();
  }

  let renderPending = false;
  let lastRender = 0;
  function scheduleRender() {
    if (renderPending) return;
    renderPending = true;
    const wait = Math.max(0, 250 - (Date.now() - lastRender));
    setTimeout(() => requestAnimationFrame(() => { renderPending = false; lastRender = Date.now(); render(); }), wait);
  }

  // -- rendering --------------------------------------------------------------------------------
  function render() {
    renderAlerts();
    renderOverview();
    renderCluster();
    renderNodes();
    renderChannels();
    renderCharts();
    renderFooter();
  }

  const KIND_NAMES = {
    node_down: "Node down",
    node_suspect: "Node suspect",
    shard_unowned: "Shard without owner",
    backup_lag: "Backup lagging",
    dead_letters_growing: "Dead letters growing",
    oldest_ready: "Messages waiting",
    memory: "Memory high",
  };

  function renderAlerts() {
    const { alerts, cleared } = model.alerts;
    const banner = $("#alert-banner");
    const section = $("#alerts");
    section.hidden = !alerts.length && !cleared.length;
    const critical = alerts.filter((a) => a.severity === "critical").length;
    if (alerts.length) {
      const first = alerts[0];
      const more = alerts.length > 1 ? ` (and ${alerts.length - 1} more)` : "";
      banner.className = `alert-banner sev-${critical ? "critical" : "warning"}`;
      banner.textContent = `${alerts.length} alert${alerts.length === 1 ? "" : "s"}: ${first.message}${more}`;
      banner.hidden = false;
    } else {
      banner.hidden = true;
      banner.textContent = "";
    }
    $("#alerts-note").textContent = alerts.length
      ? `${alerts.length} active${critical ? `, ${critical} critical` : ""}` : "none active";
    const now = serverNow();
    const rows = alerts.map((a) => el(
      "tr",
      { class: `sev-${a.severity}`, "data-alert": a.id, "data-kind": a.kind },
      el("td", {}, el("span", { class: `badge badge-${a.severity}`, text: a.severity })),
      el("td", { class: "strong", text: KIND_NAMES[a.kind] || a.kind }),
      el("td", { "data-started": a.started_ms, text: fmtClock(a.started_ms) }),
      el("td", { class: "num", text: fmtMs(Math.max(0, now - a.started_ms)) }),
      el("td", { text: a.message }),
    ));
    if (!rows.length) {
      rows.push(el("tr", {}, el("td", { class: "empty-row", text: "No alert now." })));
      rows[0].firstChild.setAttribute("colspan", "5");
    }
    $("#alert-list tbody").replaceChildren(...rows);
    $("#alerts-cleared").hidden = !cleared.length;
    $("#alert-cleared tbody").replaceChildren(...cleared.map((a) => el(
      "tr",
      { "data-alert": a.id },
      el("td", { class: "strong", text: KIND_NAMES[a.kind] || a.kind }),
      el("td", { text: fmtClock(a.started_ms) }),
      el("td", { text: fmtClock(a.ended_ms) }),
      el("td", { text: a.message }),
    )));
  }

  function sortedNodes() {
    return [...model.nodes.values()].sort((a, b) => a.id.localeCompare(b.id));
  }

  function renderOverview() {
    const nodes = [...model.nodes.values()];
    const counts = { up: 0, suspect: 0, down: 0 };
    const sum = { channels: 0, ready: 0, in_flight: 0, delayed: 0, enqueue_rate: 0, dequeue_rate: 0, ack_rate: 0 };
    for (const n of nodes) {
      counts[n.status] = (counts[n.status] || 0) + 1;
      if (n.status === "down") continue;
      for (const key of Object.keys(sum)) sum[key] += n.totals[key] || 0;
    }
    $("#ov-nodes").textContent = nodes.length ? `${counts.up} / ${nodes.length}` : "0";
    const sub = [];
    if (counts.suspect) sub.push(`${counts.suspect} suspect`);
    if (counts.down) sub.push(`${counts.down} down`);
    const subEl = $("#ov-nodes-sub");
    subEl.textContent = nodes.length ? (sub.length ? sub.join(", ") : "all up") : "";
    subEl.className = "card-sub" + (counts.down ? " bad" : counts.suspect ? " warn" : "");
    $("#ov-channels").textContent = fmtNum(sum.channels);
    $("#ov-ready").textContent = fmtNum(sum.ready);
    $("#ov-inflight").textContent = fmtNum(sum.in_flight);
    $("#ov-delayed").textContent = fmtNum(sum.delayed);
    $("#ov-in").textContent = fmtRate(sum.enqueue_rate);
    $("#ov-out").textContent = fmtRate(sum.dequeue_rate);
    $("#ov-ack").textContent = fmtRate(sum.ack_rate);
  }

  function statusBadge(n) {
    const stopped = n.node_status === "stopped";
    const label = stopped ? "down (stopped)" : n.status;
    return el("span", { class: `badge badge-${n.status}`, text: label, title: n.connected ? "connected" : "disconnected" });
  }

  // -- the cluster: node cards, shards, failover timeline ----------------------------------------
  function shortUrl(url) {
    return url ? url.replace(/^https?:\/\//, "") : "–";
  }

  function nodeName(url, id) {
    return id ? `${id} (${shortUrl(url)})` : shortUrl(url);
  }

  function cardRow(key, value, cls) {
    return el("div", { class: "ncard-row" }, el("span", { class: "k", text: key }), el("span", { class: `v${cls ? " " + cls : ""}`, text: value }));
  }

  function fmtLag(lag) {
    if (!lag) return "–";
    const parts = Object.entries(lag).map(([shard, beats]) => `${shard}: ${beats} beat${beats === 1 ? "" : "s"}`);
    return parts.length ? parts.join(", ") : "–";
  }

  function renderCluster() {
    const c = model.cluster;
    const section = $("#cluster");
    if (!c || !c.shards.length) { section.hidden = true; return; }
    section.hidden = false;
    const failed = c.nodes.filter((n) => n.status === "failed").length;
    const unowned = c.shards.filter((s) => !s.owner).length;
    const note = [`topology v${c.version}`, `${c.shards.length} shard${c.shards.length === 1 ? "" : "s"}`];
    if (unowned) note.push(`${unowned} without owner`);
    if (failed) note.push(`${failed} failed`);
    $("#cluster-note").textContent = note.join(" · ");

    $("#node-cards").replaceChildren(...c.nodes.map((n) => {
      const owns = n.owns.map((o) => `${o.shard} (epoch ${o.epoch})`).join(", ");
      const peers = n.peer_status && n.peer_status !== n.status ? ` · peers: ${n.peer_status}` : "";
      return el(
        "div",
        { class: `ncard st-${n.status}`, "data-url": n.url, "data-status": n.status, "data-role": n.role },
        el("div", { class: "ncard-head" },
          el("span", { class: "ncard-id", text: n.id || shortUrl(n.url), title: n.id || n.url }),
          el("span", { class: `badge badge-${n.status}`, text: n.status })),
        el("div", { class: "ncard-url", text: n.url + peers }),
        el("div", { class: "ncard-row" }, el("span", { class: "k", text: "Role" }), el("span", { class: `v role role-${n.role}`, text: n.role })),
        cardRow("Shards", n.shards.length ? n.shards.join(", ") : "–"),
        cardRow("Owns", owns || "–", "owns"),
        n.role === "backup" ? cardRow("Mirror lag", fmtLag(n.lag), "lag") : null,
        n.heartbeat_age_ms !== null && n.heartbeat_age_ms !== undefined ? cardRow("Last seen by peers", fmtMs(n.heartbeat_age_ms)) : null,
      );
    }));

    const now = serverNow();
    $("#shards tbody").replaceChildren(...c.shards.map((s) => el(
      "tr",
      { "data-shard": s.id, class: s.owner ? "" : "no-owner" },
      el("td", { class: "strong", text: s.id }),
      el("td", { class: s.owner ? "" : "bad", text: s.owner ? nodeName(s.owner, s.owner_id) : "no owner" }),
      el("td", { class: "num", text: String(s.epoch) }),
      el("td", { text: s.primary ? shortUrl(s.primary) : "–" }),
      el("td", { text: s.backups.length ? s.backups.map(shortUrl).join(", ") : "–" }),
      el("td", { class: "num", text: fmtNum(s.channels) }),
      el("td", { class: "num", text: s.owner && s.since_ms ? fmtMs(Math.max(0, now - s.since_ms)) : "–" }),
    )));

    const events = c.timeline.map((e) => el(
      "tr",
      { "data-shard": e.shard, "data-kind": e.kind },
      el("td", { text: fmtClock(e.at_ms) }),
      el("td", { class: "strong", text: e.shard }),
      el("td", { class: `ev-${e.kind}`, text: e.kind }),
      el("td", { text: e.from ? nodeName(e.from, e.from_id) : "–" }),
      el("td", { text: nodeName(e.to, e.to_id) }),
      el("td", { class: "num", text: String(e.epoch) }),
      el("td", { class: "num gap", text: fmtMs(e.gap_ms) }),
    ));
    if (!events.length) events.push(el("tr", {}, el("td", { class: "empty-row", text: "No owner change seen yet." })));
    if (!c.timeline.length) events[0].firstChild.setAttribute("colspan", "7");
    $("#timeline tbody").replaceChildren(...events);
  }

  function renderNodes() {
    const body = $("#nodes tbody");
    const rows = [];
    const now = serverNow();
    for (const n of sortedNodes()) {
      const focused = model.focus.node === n.id && !model.focus.channel;
      const store = n.store ? `${n.store.kind} ${n.store.healthy ? "✓" : "✗"}` : "–";
      const row = el(
        "tr",
        { class: `clickable${focused ? " focused" : ""}${n.status === "down" ? " is-down" : ""}`, "data-node": n.id, tabindex: 0, title: "Focus the charts on this node" },
        el("td", { class: "strong", text: n.id }),
        el("td", {}, el("div", { text: n.url || "–" }), n.ip ? el("div", { class: "muted small", text: n.ip }) : null),
        el("td", { text: n.role }),
        el("td", {}, statusBadge(n)),
        el("td", { class: "num", text: fmtDuration(n.uptime_s) }),
        el("td", { class: "num" }, el("div", { text: `${n.cpu_percent.toFixed(1)} %` }), el("div", { class: "muted small", text: `host ${n.system_cpu_percent.toFixed(0)} %` })),
        el("td", { class: "num" }, el("div", { text: fmtBytes(n.memory_rss_bytes) }), el("div", { class: "muted small", text: `host ${n.system_memory_percent.toFixed(0)} %` })),
        el("td", { class: n.store && !n.store.healthy ? "bad" : "", text: store }),
        el("td", { class: "num", text: fmtNum(n.totals.channels) }),
        el("td", { class: "num", "data-received": n.received_ms, text: fmtAgo(now - n.received_ms) }),
      );
      row.addEventListener("click", () => setFocus(n.id, null));
      row.addEventListener("keydown", (e) => { if (e.key === "Enter") setFocus(n.id, null); });
      rows.push(row);
    }
    body.replaceChildren(...rows);
    $("#empty").hidden = rows.length > 0;
    $("#nodes-note").textContent = rows.length ? "click a node to focus the charts on it" : "";
  }

  function channelRows() {
    const rows = [];
    for (const n of model.nodes.values()) {
      for (const ch of n.channels) {
        rows.push({ ...ch, node: n.id, depth: ch.ready + ch.delayed + ch.in_flight, down: n.status === "down" });
      }
    }
    const { key, dir } = model.sort;
    rows.sort((a, b) => {
      const x = a[key], y = b[key];
      if (typeof x === "string" || typeof y === "string") return dir * String(x).localeCompare(String(y));
      return dir * ((x ?? -1) - (y ?? -1)) || a.name.localeCompare(b.name);
    });
    const f = model.filter.toLowerCase();
    return f ? rows.filter((r) => r.name.toLowerCase().includes(f) || r.node.toLowerCase().includes(f)) : rows;
  }

  // "top 70 of 100,000": how many channels the table shows of how many the nodes hold.
  function renderChannelsNote() {
    let listed = 0, total = 0;
    for (const n of model.nodes.values()) { listed += n.channels.length; total += n.totals.channels; }
    $("#channels-note").textContent = total > listed ? `the deepest and busiest ${fmtNum(listed)} of ${fmtNum(total)} channels` : "";
  }

  function renderChannels() {
    renderChannelsNote();
    const body = $("#channels tbody");
    const rows = channelRows().map((c) => {
      const focused = model.focus.node === c.node && model.focus.channel === c.name;
      const row = el(
        "tr",
        { class: `clickable${focused ? " focused" : ""}${c.down ? " is-down" : ""}`, "data-node": c.node, "data-channel": c.name, tabindex: 0, title: "Focus the charts on this channel" },
        el("td", { class: "strong", text: c.name }),
        el("td", { text: c.node }),
        el("td", { class: "num", text: fmtNum(c.ready) }),
        el("td", { class: "num", text: fmtNum(c.delayed) }),
        el("td", { class: "num", text: fmtNum(c.in_flight) }),
        el("td", { class: "num strong", text: fmtNum(c.depth) }),
        el("td", { class: "num", text: fmtRate(c.enqueue_rate) }),
        el("td", { class: "num", text: fmtRate(c.dequeue_rate) }),
        el("td", { class: "num", text: fmtRate(c.ack_rate) }),
        el("td", { class: `num${c.nack_rate > 0 ? " warn" : ""}`, text: fmtRate(c.nack_rate) }),
        el("td", { class: `num${c.dead_lettered > 0 ? " bad" : ""}`, text: fmtNum(c.dead_lettered) }),
        el("td", { class: "num", text: fmtMs(c.oldest_ready_age_ms) }),
        el("td", { class: "num", text: c.ack_p50_ms === null && c.ack_p99_ms === null ? "–" : `${fmtMs(c.ack_p50_ms)} / ${fmtMs(c.ack_p99_ms)}` }),
      );
      row.addEventListener("click", () => setFocus(c.node, c.name));
      row.addEventListener("keydown", (e) => { if (e.key === "Enter") setFocus(c.node, c.name); });
      return row;
    });
    if (!rows.length) rows.push(el("tr", {}, el("td", { class: "empty-row", text: model.filter ? "No channel matches." : "No channels yet." })));
    if (!rows[0].dataset.node) rows[0].firstChild.setAttribute("colspan", "13");
    body.replaceChildren(...rows);
    for (const th of document.querySelectorAll("#channels th[data-sort]")) {
      th.classList.toggle("sorted", th.dataset.sort === model.sort.key);
      th.dataset.dir = th.dataset.sort === model.sort.key ? (model.sort.dir > 0 ? "asc" : "desc") : "";
    }
  }

  function renderFooter() {
    const i = model.ingest;
    if (!i) return;
    const dropped = i.malformed + i.invalid + i.oversized + i.rate_limited + i.wrong_node + i.too_many;
    $("#ingest-stats").textContent = `ingest: ${fmtNum(i.accepted)} snapshots accepted, ${fmtNum(dropped)} dropped, ${fmtNum(i.refused)} connections refused`;
    $("#updated").textContent = model.lastMessage ? `updated ${fmtClock(serverNow())}` : "";
  }

  function setFocus(node, channel) {
    model.focus = { node, channel };
    render();
  }

  // -- series -----------------------------------------------------------------------------------
  function channelSeries(nodeId, name, idx) {
    return (model.history.get(nodeId) || []).map((p) => {
      const c = p[P.ch][name];
      return [p[P.t], c ? c[idx] : null];
    });
  }

  function nodeSeries(nodeId, idx, mode) {
    return (model.history.get(nodeId) || []).map((p) => {
      const tot = p[P.tot];
      if (tot && tot[idx] !== null && tot[idx] !== undefined) return [p[P.t], tot[idx]];
      let acc = mode === "max" ? null : 0;
      for (const c of Object.values(p[P.ch])) {
        const v = c[idx];
        if (v === null || v === undefined) continue;
        acc = mode === "max" ? (acc === null ? v : Math.max(acc, v)) : acc + v;
      }
      return [p[P.t], acc];
    });
  }

  function processSeries(nodeId, idx) {
    return (model.history.get(nodeId) || []).map((p) => [p[P.t], p[idx]]);
  }

  // Adds up (or takes the maximum of) several nodes' series, aligned on the history step; a node
  // missing from a step carries its last value for two steps.
  function combine(seriesList, mode) {
    const step = model.stepMs;
    const maps = seriesList.map((s) => new Map(s.map(([t, v]) => [Math.round(t / step), v])));
    const buckets = [...new Set(maps.flatMap((m) => [...m.keys()]))].sort((a, b) => a - b);
    const last = maps.map(() => null);
    return buckets.map((b) => {
      let acc = null;
      maps.forEach((m, i) => {
        let v = m.has(b) ? m.get(b) : null;
        if (m.has(b)) last[i] = [b, v];
        else if (last[i] && b - last[i][0] <= 2) v = last[i][1];
        if (v === null || v === undefined) return;
        acc = acc === null ? v : mode === "max" ? Math.max(acc, v) : acc + v;
      });
      return [b * step, acc];
    });
  }

  function metric(idx, mode) {
    const { node, channel } = model.focus;
    if (node && channel) return channelSeries(node, channel, idx);
    if (node) return nodeSeries(node, idx, mode);
    return combine([...model.nodes.keys()].map((id) => nodeSeries(id, idx, mode)), mode);
  }

  function focusedNodes() {
    return model.focus.node ? [model.focus.node].filter((id) => model.nodes.has(id)) : sortedNodes().map((n) => n.id);
  }

  function renderCharts() {
    const { node, channel } = model.focus;
    const label = $("#focus-label");
    label.replaceChildren();
    if (node && channel) label.append("· channel ", el("b", { text: channel }), " on ", el("b", { text: node }));
    else if (node) label.append("· node ", el("b", { text: node }));
    else label.append("· all nodes");
    $("#focus-all").hidden = !node;

    const tMax = serverNow();
    const tMin = tMax - model.rangeMs;
    const range = { tMin, tMax };
    drawChart("#chart-depth", range, fmtNum, [
      { label: "Ready", color: COLORS[0], points: metric(C.ready, "sum"), fill: true },
      { label: "Delayed", color: COLORS[1], points: metric(C.delayed, "sum") },
      { label: "In flight", color: COLORS[2], points: metric(C.inFlight, "sum") },
    ], "integer");
    drawChart("#chart-rates", range, fmtRate, [
      { label: "Enqueue", color: COLORS[0], points: metric(C.enq, "sum") },
      { label: "Dequeue", color: COLORS[2], points: metric(C.deq, "sum") },
      { label: "Ack", color: COLORS[4], points: metric(C.ack, "sum") },
      { label: "Nack", color: COLORS[3], points: metric(C.nack, "sum") },
    ]);
    drawChart("#chart-delay", range, fmtMs, [
      { label: "Oldest ready", color: COLORS[1], points: metric(C.oldest, "max") },
      { label: "Ack p50", color: COLORS[0], points: metric(C.p50, "max") },
      { label: "Ack p99", color: COLORS[3], points: metric(C.p99, "max") },
    ]);
    const ids = focusedNodes();
    const single = ids.length === 1;
    const cpu = ids.map((id, i) => ({ label: single ? "Process" : id, color: COLORS[i % COLORS.length], points: processSeries(id, P.cpu) }));
    if (single) cpu.push({ label: "Host", color: "#94a3b8", points: processSeries(ids[0], P.hostCpu), dash: true });
    drawChart("#chart-cpu", range, (v) => `${v.toFixed(v < 10 ? 1 : 0)} %`, cpu);
    drawChart("#chart-mem", range, fmtBytes, ids.map((id, i) => ({ label: single ? "Resident" : id, color: COLORS[i % COLORS.length], points: processSeries(id, P.rss), fill: single })), "bytes");
  }

  // -- the chart --------------------------------------------------------------------------------
  // A tick step of 1, 2, 2.5 or 5 times a power of ten, so that four steps cover `max`.
  function niceStep(max, integer) {
    const raw = max > 0 ? max / 4 : 0.25;
    const exp = Math.pow(10, Math.floor(Math.log10(raw)));
    let step = 10 * exp;
    for (const m of [1, 2, 2.5, 5]) if (m * exp >= raw) { step = m * exp; break; }
    return integer ? Math.max(1, Math.ceil(step)) : step;
  }

  const hover = new Map(); // chart selector -> hovered time

  // Byte axes step in whole KiB/MiB/GiB so that their labels read well.
  function byteStep(max) {
    let unit = 1;
    while (max / unit >= 1024 && unit < 1024 ** 4) unit *= 1024;
    return niceStep(max / unit, false) * unit;
  }

  const axisLabel = (text) => text.replace(/(\.\d*?[1-9])0+\b|\.0+\b/, "$1");

  function drawChart(sel, { tMin, tMax }, fmt, series, scale = "float") {
    const fig = $(sel);
    const canvas = fig.querySelector("canvas");
    const dpr = window.devicePixelRatio || 1;
    const width = canvas.clientWidth, height = canvas.clientHeight;
    if (!width || !height) return;
    if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
      canvas.width = Math.round(width * dpr);
      canvas.height = Math.round(height * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const pad = { left: 62, right: 12, top: 10, bottom: 24 };
    const w = width - pad.left - pad.right, h = height - pad.top - pad.bottom;

    let max = 0, count = 0;
    const visible = series.map((s) => s.points.filter(([t, v]) => t >= tMin - model.stepMs && t <= tMax && v !== null && v !== undefined));
    for (const pts of visible) for (const [, v] of pts) { max = Math.max(max, v); count++; }
    const yMax = 4 * (scale === "bytes" ? byteStep(max) : niceStep(max, scale === "integer"));
    const x = (t) => pad.left + ((t - tMin) / (tMax - tMin)) * w;
    const y = (v) => pad.top + h - (v / yMax) * h;

    // grid and axes
    ctx.font = "11px system-ui, -apple-system, 'Segoe UI', sans-serif";
    ctx.textBaseline = "middle";
    ctx.strokeStyle = "#e5e7eb";
    ctx.fillStyle = "#6b7280";
    ctx.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const v = (yMax * i) / 4, yy = Math.round(y(v)) + 0.5;
      ctx.beginPath(); ctx.moveTo(pad.left, yy); ctx.lineTo(pad.left + w, yy); ctx.stroke();
      ctx.textAlign = "right";
      ctx.fillText(axisLabel(fmt(v)), pad.left - 8, yy);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const span = tMax - tMin;
    const tick = span <= 60000 ? 15000 : span <= 300000 ? 60000 : 180000;
    for (let t = Math.ceil(tMin / tick) * tick; t <= tMax; t += tick) {
      const xx = Math.round(x(t)) + 0.5;
      const text = fmtClock(t).slice(0, span <= 60000 ? 8 : 5);
      const half = ctx.measureText(text).width / 2;
      if (xx - half < pad.left - 20 || xx + half > width - 2) continue;
      ctx.beginPath(); ctx.moveTo(xx, pad.top + h); ctx.lineTo(xx, pad.top + h + 4); ctx.stroke();
      ctx.fillText(text, xx, pad.top + h + 7);
    }

    // series
    ctx.save();
    ctx.beginPath(); ctx.rect(pad.left, pad.top - 2, w, h + 4); ctx.clip();
    const gap = Math.max(3 * model.stepMs, 3000);
    series.forEach((s, i) => {
      const pts = visible[i];
      if (!pts.length) return;
      ctx.strokeStyle = s.color;
      ctx.lineWidth = 1.75;
      ctx.setLineDash(s.dash ? [4, 3] : []);
      const segments = [];
      let seg = [];
      for (let k = 0; k < pts.length; k++) {
        if (k && pts[k][0] - pts[k - 1][0] > gap) { segments.push(seg); seg = []; }
        seg.push(pts[k]);
      }
      segments.push(seg);
      for (const part of segments) {
        if (s.fill && part.length > 1) {
          ctx.beginPath();
          ctx.moveTo(x(part[0][0]), y(0));
          for (const [t, v] of part) ctx.lineTo(x(t), y(v));
          ctx.lineTo(x(part[part.length - 1][0]), y(0));
          ctx.closePath();
          ctx.fillStyle = s.color + "1f";
          ctx.fill();
        }
        ctx.beginPath();
        part.forEach(([t, v], k) => (k ? ctx.lineTo(x(t), y(v)) : ctx.moveTo(x(t), y(v))));
        if (part.length === 1) { ctx.arc(x(part[0][0]), y(part[0][1]), 2, 0, 2 * Math.PI); ctx.fillStyle = s.color; ctx.fill(); }
        ctx.stroke();
      }
    });
    ctx.setLineDash([]);
    ctx.restore();

    // hover cross-hair
    const ht = hover.get(sel);
    let at = null;
    if (ht !== undefined && ht >= tMin && ht <= tMax) {
      const xx = Math.round(x(ht)) + 0.5;
      ctx.strokeStyle = "#9ca3af";
      ctx.beginPath(); ctx.moveTo(xx, pad.top); ctx.lineTo(xx, pad.top + h); ctx.stroke();
      at = ht;
    }
    if (!count) {
      ctx.fillStyle = "#9ca3af";
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.font = "12px system-ui, -apple-system, 'Segoe UI', sans-serif";
      ctx.fillText("no data in this range", pad.left + w / 2, pad.top + h / 2);
    }
    canvas.dataset.points = String(count);

    // legend: the latest value (or the value under the mouse)
    const legend = fig.querySelector(".legend");
    legend.replaceChildren(...series.map((s, i) => {
      const pts = visible[i];
      let value = null;
      if (at !== null) {
        let best = null;
        for (const p of pts) if (best === null || Math.abs(p[0] - at) < Math.abs(best[0] - at)) best = p;
        value = best ? best[1] : null;
      } else if (pts.length) {
        value = pts[pts.length - 1][1];
      }
      const swatch = el("span", { class: "swatch" + (s.dash ? " dash" : "") });
      swatch.style.background = s.dash ? "transparent" : s.color;
      swatch.style.borderColor = s.color;
      return el("span", { class: "legend-item", "data-series": s.label }, swatch, el("span", { class: "legend-label", text: s.label }), el("span", { class: "legend-value", text: value === null ? "–" : fmt(value) }));
    }));
  }

  // -- wiring -----------------------------------------------------------------------------------
  function init() {
    for (const th of document.querySelectorAll("#channels th[data-sort]")) {
      th.addEventListener("click", () => {
        const key = th.dataset.sort;
        const textual = key === "name" || key === "node";
        model.sort = model.sort.key === key ? { key, dir: -model.sort.dir } : { key, dir: textual ? 1 : -1 };
        renderChannels();
      });
    }
    for (const btn of document.querySelectorAll("[data-range]")) {
      btn.addEventListener("click", () => {
        model.rangeMs = Number(btn.dataset.range);
        for (const b of document.querySelectorAll("[data-range]")) b.classList.toggle("active", b === btn);
        renderCharts();
      });
    }
    $("#focus-all").addEventListener("click", () => setFocus(null, null));
    $("#channel-filter").addEventListener("input", (e) => { model.filter = e.target.value; renderChannels(); });
    for (const fig of document.querySelectorAll(".chart")) {
      const canvas = fig.querySelector("canvas");
      const sel = "#" + fig.id;
      canvas.addEventListener("mousemove", (e) => {
        const rect = canvas.getBoundingClientRect();
        const w = rect.width - 62 - 12;
        const frac = (e.clientX - rect.left - 62) / w;
        const tMax = serverNow();
        hover.set(sel, frac >= 0 && frac <= 1 ? tMax - model.rangeMs + frac * model.rangeMs : undefined);
        renderCharts();
      });
      canvas.addEventListener("mouseleave", () => { hover.delete(sel); renderCharts(); });
    }
    new ResizeObserver(() => renderCharts()).observe($(".charts"));
    // Ages and the moving time axis advance even when nothing arrives.
    setInterval(() => {
      for (const td of document.querySelectorAll("#nodes td[data-received]")) {
        td.textContent = fmtAgo(serverNow() - Number(td.dataset.received));
      }
      renderCharts();
      renderFooter();
    }, 1000);
    render();
    connect();
  }

  init();
})();
