// postillon admin page: plain JavaScript, no build step, no third-party code.
// Everything shown comes from the JSON API with the token in an
// Authorization header. Mail data (senders, subjects, headers) is untrusted:
// it only ever reaches the page as text nodes (never innerHTML).
"use strict";

const TOKEN_KEY = "postillon-admin-token";
const REFRESH_MS = 5000;
const SERIES = ["received", "delivered", "deferred", "bounced"];
const state = { hours: 6, offset: 0, limit: 50, filters: {}, timer: null };

// ---------------------------------------------------------------- helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, String(value));
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const $ = (id) => document.getElementById(id);

function age(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
  if (seconds < 86400) return `${(seconds / 3600).toFixed(1)} h`;
  return `${(seconds / 86400).toFixed(1)} d`;
}

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function size(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1048576).toFixed(1)} MiB`;
}

function badge(text) {
  return h("span", { class: `badge ${text}` }, text);
}

function toast(text, bad) {
  const el = $("toast");
  el.textContent = text;
  el.className = bad ? "toast bad" : "toast";
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, 3500);
}

// ---------------------------------------------------------------- API

class Unauthorized extends Error {}

async function api(path, options) {
  const token = sessionStorage.getItem(TOKEN_KEY) || "";
  const response = await fetch(path, {
    ...(options || {}),
    headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
  });
  if (response.status === 401) {
    showLogin("The token was not accepted.");
    throw new Unauthorized();
  }
  const body = response.headers.get("Content-Type")?.includes("json") ? await response.json() : null;
  if (!response.ok) {
    const error = new Error(body?.error || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

// ---------------------------------------------------------------- login

function showLogin(message) {
  stopRefresh();
  sessionStorage.removeItem(TOKEN_KEY);
  $("app").hidden = true;
  $("login").hidden = false;
  $("login-error").hidden = !message;
  $("login-error").textContent = message || "";
  $("token").focus();
}

async function login(event) {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    await api("/api/status");
  } catch (e) {
    if (!(e instanceof Unauthorized)) showLogin(e.message);
    return;
  }
  $("token").value = "";
  $("login").hidden = true;
  $("app").hidden = false;
  route();
}

// ---------------------------------------------------------------- routing

function route() {
  if (!sessionStorage.getItem(TOKEN_KEY)) { showLogin(); return; }
  $("login").hidden = true;
  $("app").hidden = false;
  stopRefresh();
  const hash = location.hash || "#/dashboard";
  const [, view, arg] = hash.split("/");
  for (const el of document.querySelectorAll(".view")) el.hidden = true;
  for (const a of document.querySelectorAll("[data-nav]")) {
    a.classList.toggle("active", a.dataset.nav === (view === "message" ? "queue" : view));
  }
  if (view === "sessions") {
    $("view-sessions").hidden = false;
    every(loadSessions);
  } else if (view === "queue") {
    $("view-queue").hidden = false;
    every(loadQueue);
  } else if (view === "message" && arg) {
    $("view-message").hidden = false;
    every(() => loadMessage(decodeURIComponent(arg)));
  } else if (view === "tls") {
    $("view-tls").hidden = false;
    every(() => loadTls(arg ? decodeURIComponent(arg) : null));
  } else {
    $("view-dashboard").hidden = false;
    state.chartKey = null;
    every(loadDashboard);
  }
}

function every(load) {
  // Refresh every few seconds; a slow answer (a long queue) waits ten times as
  // long as it took, so an open page never keeps the server busy.
  const generation = (state.generation = (state.generation || 0) + 1);
  const run = async () => {
    const started = performance.now();
    try {
      await load();
    } catch (e) {
      if (!(e instanceof Unauthorized)) toast(e.message, true);
    }
    if (generation !== state.generation) return;
    const delay = Math.max(REFRESH_MS, 10 * (performance.now() - started));
    state.timer = setTimeout(run, delay);
  };
  run();
}

function stopRefresh() {
  state.generation = (state.generation || 0) + 1;
  if (state.timer) clearTimeout(state.timer);
  state.timer = null;
}

// ---------------------------------------------------------------- dashboard

async function loadDashboard() {
  // Counters every refresh; the chart (a heavier query) every sixth, or when its range changed.
  const chartKey = `${state.hours}`;
  state.ticks = (state.ticks || 0) + 1;
  const chartDue = state.chartKey !== chartKey || state.ticks % 6 === 0;
  const [status, summary, activity] = await Promise.all([
    api("/api/status"),
    api("/api/queue/summary"),
    chartDue ? api(`/api/activity?hours=${state.hours}&bucket_minutes=${bucketFor(state.hours)}`) : null,
  ]);
  $("host").textContent = `${status.hostname} · postillon ${status.version}`;
  const s = summary.by_state;
  const counters = [
    ["queued", "Messages queued", summary.messages],
    ["deferred", "Recipients deferred", s.deferred],
    ["held", "Recipients held", s.held],
    ["active", "Deliveries in flight", status.connections.deliveries_in_flight],
    ["connections", "Inbound connections", status.connections.inbound],
    ["oldest", "Oldest message", age(summary.oldest_age_seconds)],
  ];
  $("counters").replaceChildren(...counters.map(([cls, label, value]) =>
    h("div", { class: `counter ${cls}`, "data-counter": cls },
      h("div", { class: "value" }, value), h("div", { class: "label" }, label))));
  if (activity) {
    drawChart(activity);
    state.chartKey = chartKey;
  }
  drawDomains(summary);
  drawSuspensions(summary.suspensions || []);
  drawServer(status);
}

// A 421 or a burst of 4xx suspends a destination by itself (docs/shaping.md);
// an operator can suspend and resume one here.
function drawSuspensions(rows) {
  if (!rows.length) {
    $("suspensions").replaceChildren(h("p", { class: "empty" }, "No destination is suspended."));
    return;
  }
  const body = rows.map((s) => h("tr", { "data-destination": s.destination },
    h("td", { "data-label": "Destination", class: "wrap mono" }, s.destination),
    h("td", { "data-label": "Until" }, new Date(s.until).toLocaleString()),
    h("td", { "data-label": "Left", class: "num" }, age(s.remaining_seconds)),
    h("td", { "data-label": "Reason", class: "wrap" }, (s.by_operator ? "operator: " : "") + s.reason),
    h("td", {}, h("button", { class: "secondary small", onclick: async () => {
      const result = await api(`/api/queue/suspensions/${encodeURIComponent(s.destination)}`, { method: "DELETE" });
      toast(`${result.destination} resumed; ${result.recipients} recipient(s) due now`);
      route();
    } }, "Resume"))));
  $("suspensions").replaceChildren(h("table", { class: "stack" },
    h("thead", {}, h("tr", {}, h("th", {}, "Destination"), h("th", {}, "Until"), h("th", { class: "num" }, "Left"), h("th", {}, "Reason"), h("th", {}, ""))),
    h("tbody", {}, body)));
}

function bucketFor(hours) {
  return hours <= 1 ? 2 : hours <= 6 ? 10 : 30;
}

function drawChart(activity) {
  // Draw at the container's own width so labels keep their size on a phone.
  const W = Math.max(300, Math.round($("chart").clientWidth || 720));
  const H = Math.round(Math.min(280, Math.max(190, W * 0.28))), L = 36, R = 10, T = 10, B = 26;
  const n = activity.buckets.length;
  const max = Math.max(4, ...SERIES.flatMap((k) => activity.series[k]));
  // A "nice" tick (1, 2 or 5 times a power of ten) so the axis reads in round numbers.
  const rough = max / 5;
  const power = Math.pow(10, Math.floor(Math.log10(rough)));
  const tick = [1, 2, 5, 10].map((m) => m * power).find((t) => t >= rough);
  const lines = Math.ceil(max / tick);
  const top = tick * lines;
  const x = (i) => L + (n <= 1 ? 0 : (i * (W - L - R)) / (n - 1));
  const y = (v) => T + (H - T - B) * (1 - v / top);
  const parts = [];
  for (let i = 0; i <= lines; i++) {
    const v = tick * i;
    parts.push(svg("line", { class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    parts.push(svg("text", { class: "axis", x: L - 6, y: y(v) + 4, "text-anchor": "end" }, v));
  }
  const labels = Math.min(W < 560 ? 4 : 7, n);
  for (let j = 0; j < labels; j++) {
    const i = Math.round((j * (n - 1)) / Math.max(1, labels - 1));
    const t = new Date(activity.buckets[i]);
    parts.push(svg("text", { class: "axis", x: x(i), y: H - 6, "text-anchor": j === 0 ? "start" : j === labels - 1 ? "end" : "middle" },
      t.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" })));
  }
  const colors = { received: "#2563eb", delivered: "#16a34a", deferred: "#d97706", bounced: "#dc2626" };
  for (const key of SERIES) {
    const values = activity.series[key];
    const line = values.map((v, i) => `${i ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    if (key === "received") {
      parts.push(svg("path", { d: `${line} L${x(n - 1)},${y(0)} L${x(0)},${y(0)} Z`, fill: colors[key], "fill-opacity": 0.08, stroke: "none" }));
    }
    parts.push(svg("path", { d: line, fill: "none", stroke: colors[key], "stroke-width": 2, "stroke-linejoin": "round", "stroke-linecap": "round" }));
    values.forEach((v, i) => {
      if (v > 0 && n <= 40) parts.push(svg("circle", { cx: x(i), cy: y(v), r: 2.6, fill: colors[key] }, svg("title", {}, `${key}: ${v}`)));
    });
  }
  $("chart").replaceChildren(svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" }, parts));
  $("legend").replaceChildren(...SERIES.map((key) => {
    const total = activity.series[key].reduce((a, b) => a + b, 0);
    return h("span", { class: "key", "data-series": key }, h("span", { class: `swatch ${key}` }), key, h("span", { class: "total" }, total));
  }), h("span", { class: "muted" }, `per ${activity.bucket_seconds / 60} min, last ${state.hours} h`));
}

function drawDomains(summary) {
  if (!summary.by_domain.length) {
    $("domains").replaceChildren(h("p", { class: "empty" }, "Nothing waiting. Every message has been delivered."));
    return;
  }
  const rows = summary.by_domain.slice(0, 10).map((d) =>
    h("tr", { class: "clickable", onclick: () => { location.hash = `#/queue/${encodeURIComponent(d.domain)}`; } },
      h("td", { "data-label": "Domain", class: "wrap" }, d.domain),
      h("td", { "data-label": "Recipients", class: "num" }, d.total),
      h("td", { "data-label": "States" }, Object.entries(d.by_state).map(([k, v]) => [badge(k), ` ${v} `])),
      h("td", { "data-label": "Oldest", class: "num" }, age(d.oldest_age_seconds))));
  $("domains").replaceChildren(h("table", { class: "stack" },
    h("thead", {}, h("tr", {}, h("th", {}, "Domain"), h("th", { class: "num" }, "Recipients"), h("th", {}, "States"), h("th", { class: "num" }, "Oldest"))),
    h("tbody", {}, rows)));
}

function drawServer(status) {
  const facts = [
    ["Host", status.hostname],
    ["Version", status.version],
    ["Up for", age(status.uptime_seconds)],
    ["Connections", `${status.connections.inbound} in (limit ${status.connections.inbound_limit}), ${status.connections.deliveries_in_flight} deliveries`],
  ];
  const cert = status.certificate;
  if (cert) {
    const until = cert.not_after ? `valid until ${cert.not_after.slice(0, 10)}` : "none yet";
    const text = cert.state === "failing"
      ? `renewal failing (${cert.failures} in a row; the current certificate stays in use): ${cert.last_error}`
      : `${cert.state}, ${until}${cert.issuer ? `, issued by ${cert.issuer}` : ""}`;
    facts.push(["Certificate (ACME)", h("span", { class: cert.state === "failing" ? "badge deferred" : "" }, text)]);
  }
  const listeners = status.listeners.map((l) => h("div", {}, h("span", { class: "mono" }, l.address), ` ${l.kind}`, h("span", { class: "muted" }, ` · ${l.sessions} session(s)`)));
  $("server").replaceChildren(h("dl", { class: "facts" }, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
    h("dt", {}, "Listeners"), h("dd", {}, listeners)));
}

// ---------------------------------------------------------------- queue

function readFilters() {
  const form = new FormData($("filters"));
  const filters = {};
  for (const [key, value] of form.entries()) if (value) filters[key] = value;
  return filters;
}

async function loadQueue() {
  const [, , domain] = location.hash.split("/");
  if (domain && !state.filters.domain) {
    state.filters.domain = decodeURIComponent(domain);
    $("filters").elements.domain.value = state.filters.domain;
  }
  const params = new URLSearchParams({ ...state.filters, offset: state.offset, limit: state.limit });
  const page = await api(`/api/queue/messages?${params}`);
  const filtered = Object.keys(state.filters).length > 0;
  $("queue-title").textContent = `${page.total} message${page.total === 1 ? "" : "s"}${filtered ? " (filtered)" : " in the queue"}`;
  $("page-info").textContent = page.total ? `${page.offset + 1}–${page.offset + page.messages.length} of ${page.total}` : "";
  $("prev").disabled = page.offset === 0;
  $("next").disabled = page.offset + page.messages.length >= page.total;
  if (!page.messages.length) {
    $("queue-table").replaceChildren(h("p", { class: "empty" }, filtered ? "No message matches these filters." : "The queue is empty."));
    return;
  }
  const rows = page.messages.map((m) => {
    const first = m.recipients.find((r) => r.state === m.state) || m.recipients[0];
    const more = m.recipients.length > 1 ? ` +${m.recipients.length - 1}` : "";
    return h("tr", { class: "clickable", "data-queue-id": m.queue_id, onclick: (e) => { if (!e.target.closest("button")) location.hash = `#/message/${m.queue_id}`; } },
      h("td", { "data-label": "Queue ID" }, h("a", { href: `#/message/${m.queue_id}`, class: "mono" }, m.queue_id)),
      h("td", { "data-label": "Age", class: "num" }, age(m.age_seconds)),
      h("td", { "data-label": "From", class: "wrap" }, m.sender || "<>"),
      h("td", { "data-label": "To", class: "wrap" }, first.recipient, h("span", { class: "muted" }, more)),
      h("td", { "data-label": "State" }, badge(m.state), first.attempts ? h("span", { class: "muted" }, ` ×${first.attempts}`) : null),
      h("td", { "data-label": "Last reply", class: "reply" }, first.last_reply || ""),
      h("td", { "data-label": "Actions" }, actionButtons(m, true)));
  });
  $("queue-table").replaceChildren(h("table", { class: "stack" },
    h("thead", {}, h("tr", {}, ["Queue ID", "Age", "From", "To", "State", "Last reply", ""].map((t, i) => h("th", { class: i === 1 ? "num" : null }, t)))),
    h("tbody", {}, rows)));
}

function actionButtons(message, compact) {
  const states = new Set(message.recipients.map((r) => r.state));
  const waiting = states.has("deferred") || states.has("pending");
  const live = waiting || states.has("leased") || states.has("held");
  const cls = compact ? "secondary small" : "secondary";
  const button = (action, label, enabled, danger) =>
    h("button", { class: danger ? `danger${compact ? " small" : ""}` : cls, "data-action": action, disabled: !enabled, onclick: () => act(message.queue_id, action) }, label);
  return h("div", { class: "actions" },
    button("retry", "Retry now", states.has("deferred")),
    states.has("held") ? button("release", "Release", true) : button("hold", "Hold", waiting || states.has("leased")),
    button("bounce", "Bounce", live, true),
    button("delete", "Delete", true, true));
}

const CONFIRM = {
  delete: "Delete this message? Nobody will be told.",
  bounce: "Return this message to its sender now? Recipients still waiting will not get it.",
};
const DONE = { retry: "will be tried now", hold: "held", release: "released", delete: "deleted", bounce: "bounced to the sender" };

async function act(queueId, action) {
  if (CONFIRM[action] && !confirm(CONFIRM[action])) return;
  try {
    const result = await api(`/api/queue/messages/${queueId}/${action}`, { method: "POST" });
    toast(`${queueId}: ${result.recipients} recipient(s) ${DONE[action]}`);
  } catch (e) {
    if (!(e instanceof Unauthorized)) toast(e.message, true);
    return;
  }
  if (action === "delete" && location.hash.startsWith("#/message/")) location.hash = "#/queue";
  else route();
}

// ---------------------------------------------------------------- message

const EVENT_TEXT = {
  authentication: "Checked: SPF, DKIM, DMARC, ARC",
  warning: "Warning",
  rejected: "Refused",
  received: "Received and queued",
  deferred: "Delivery deferred",
  delivered: "Delivered",
  bounced: "Delivery failed",
  expired: "Expired in the queue",
  bounce: "Notice sent to the sender",
  operator: "Operator action",
  error: "Error",
};

function eventDetail(e) {
  const f = e.fields;
  const parts = [];
  const mono = (text) => h("span", { class: "mono" }, text);
  if (e.event === "received") {
    parts.push(h("div", {}, "from ", mono(f.from || "<>"), ` · ${f.nrcpt} recipient(s) · ${size(f.size || 0)}`));
    if (f.client) parts.push(h("div", {}, "client ", mono(f.client), f.proto ? ` over ${f.proto}` : ""));
    if (f.source) parts.push(h("div", { class: "muted" }, `via ${f.source}`));
  } else if (["delivered", "deferred", "bounced", "expired"].includes(e.event)) {
    parts.push(h("div", {}, "to ", mono(f.to || ""), f.orig_to ? [" (was ", mono(f.orig_to), ")"] : "", f.relay ? [" · relay ", mono(f.relay)] : ""));
    if (f.status || f.reply) parts.push(h("div", {}, "reply ", mono(`${f.status || ""} ${f.reply || ""}`.trim())));
    if (f.tls_result) parts.push(h("div", { class: "tls-line" }, tlsSummary({ mx: f.mx, policy: f.tls_policy, result: f.tls_result, verified: f.tls_verified === "yes", version: f.tls_version, cipher: f.tls_cipher })));
    const meta = [f.attempts ? `attempt ${f.attempts}` : "", f.delay ? `after ${age(Number(f.delay))}` : "", f.next_try ? `next try in ${age(parseFloat(f.next_try))}` : ""].filter(Boolean).join(" · ");
    if (meta) parts.push(h("div", { class: "muted" }, meta));
  } else if (e.event === "authentication") {
    parts.push(h("div", {}, mono(f.results || ""), f.action ? ` → ${f.action}` : ""));
    if (f.reason) parts.push(h("div", { class: "muted" }, f.reason));
  } else if (e.event === "bounce") {
    parts.push(h("div", {}, "to ", mono(f.to || ""), " as ", h("a", { href: `#/message/${f.dsn_id}`, class: "mono" }, f.dsn_id || "")));
  } else if (e.event === "operator") {
    parts.push(h("div", {}, `${f.action} by ${f.by}`, f.recipients !== undefined ? ` · ${f.recipients} recipient(s)` : ""));
  } else {
    parts.push(h("div", {}, Object.entries(f).map(([k, v]) => `${k}=${v}`).join(", ")));
  }
  return parts;
}

async function loadMessage(queueId) {
  let message = null;
  try {
    message = await api(`/api/queue/messages/${queueId}`);
  } catch (e) {
    if (e.status !== 404) throw e;
  }
  let history = { events: [], in_queue: false };
  try {
    history = await api(`/api/queue/messages/${queueId}/events`);
  } catch (e) {
    if (e.status !== 404) throw e;
  }
  let explained = { steps: [] };
  try {
    explained = await api(`/api/queue/messages/${queueId}/explain`);
  } catch (e) {
    if (e.status !== 404) throw e;
  }
  const out = [];
  if (!message && !history.events.length && !explained.steps.length) {
    $("message").replaceChildren(h("div", { class: "card" }, h("p", { class: "empty" }, `Nothing is known about ${queueId}.`)));
    return;
  }
  if (message) {
    out.push(h("div", { class: "card msg-head" },
      h("div", { class: "card-head" }, h("span", { class: "mono muted" }, message.queue_id), badge(message.state)),
      h("h2", {}, message.subject || "(no subject)"),
      h("dl", { class: "facts" },
        h("dt", {}, "From"), h("dd", { class: "mono" }, message.sender || "<> (a bounce)"),
        h("dt", {}, "Received"), h("dd", {}, `${when(message.received_at)} (${age(message.age_seconds)} ago)`),
        h("dt", {}, "Client"), h("dd", { class: "mono" }, message.client || "–"),
        h("dt", {}, "Size"), h("dd", {}, size(message.size)),
        h("dt", {}, "Came in via"), h("dd", {}, message.source)),
      actionButtons(message, false)));
    out.push(h("div", { class: "card" }, h("h2", {}, "Recipients"),
      h("table", { class: "stack" },
        h("thead", {}, h("tr", {}, ["Recipient", "State", "Attempts", "Next try", "Last reply", "TLS (last attempt)", "Lease holder"].map((t) => h("th", {}, t)))),
        h("tbody", {}, message.recipients.map((r) => h("tr", { "data-recipient": r.recipient },
          h("td", { "data-label": "Recipient", class: "mono wrap" }, r.recipient, r.original_recipient ? h("div", { class: "muted" }, `was ${r.original_recipient}`) : null),
          h("td", { "data-label": "State" }, badge(r.state)),
          h("td", { "data-label": "Attempts", class: "num" }, r.attempts),
          h("td", { "data-label": "Next try" }, r.next_try ? when(r.next_try) : "–"),
          h("td", { "data-label": "Last reply", class: "reply" }, r.last_reply || "–"),
          h("td", { "data-label": "TLS", "data-tls": r.tls ? r.tls.result : "" }, r.tls ? tlsSummary(r.tls) : "–"),
          // the node (host:pid) delivering it right now; several share a PostgreSQL queue
          h("td", { "data-label": "Lease holder", class: "mono" }, r.lease_owner || "–")))))));
  } else {
    // Gone from the queue: tell its story from the history alone.
    const received = history.events.find((e) => e.event === "received");
    const outcome = new Map();
    const lastTls = new Map();
    for (const e of history.events) {
      if (["delivered", "bounced", "expired"].includes(e.event) && e.fields.to) outcome.set(e.fields.to, e.event === "delivered" ? "delivered" : "failed");
      if (e.fields.to && e.fields.tls_result) lastTls.set(e.fields.to, { mx: e.fields.mx, policy: e.fields.tls_policy, result: e.fields.tls_result, verified: e.fields.tls_verified === "yes", version: e.fields.tls_version, cipher: e.fields.tls_cipher });
    }
    const finals = new Set(outcome.values());
    const word = finals.size === 1 ? [...finals][0] : finals.size ? "partly delivered" : "gone";
    out.push(h("div", { class: "card msg-head" },
      h("div", { class: "card-head" }, h("span", { class: "mono muted" }, queueId), badge(word)),
      h("p", { class: "notice", "data-gone": "true" }, "This message has left the queue. Its history is below."),
      received ? h("dl", { class: "facts" },
        h("dt", {}, "From"), h("dd", { class: "mono" }, received.fields.from || "<>"),
        h("dt", {}, "Received"), h("dd", {}, when(received.at)),
        h("dt", {}, "Client"), h("dd", { class: "mono" }, received.fields.client || "–"),
        h("dt", {}, "Recipients"), h("dd", {}, [...outcome].map(([to, st]) => h("div", { "data-recipient": to }, h("span", { class: "mono" }, to), " ", badge(st),
          lastTls.has(to) ? h("div", { "data-tls": lastTls.get(to).result }, tlsSummary(lastTls.get(to))) : null)))) : null));
  }
  out.push(h("div", { class: "card" }, h("h2", {}, "History"),
    history.events.length ? h("ol", { class: "timeline" }, history.events.map((e) =>
      h("li", { "data-event": e.event },
        h("span", { class: `dot ${e.event}` }),
        h("div", { class: "when" }, when(e.at)),
        h("div", { class: "what" }, EVENT_TEXT[e.event] || e.event),
        h("div", { class: "detail" }, eventDetail(e))))) : h("p", { class: "empty" }, "No history recorded.")));
  out.push(decisionsCard("Decisions", explained.steps));
  if (message) {
    out.push(h("div", { class: "card" },
      h("details", { class: "headers" }, h("summary", {}, `Headers (${message.headers.length})`),
        h("div", { class: "header-list" }, message.headers.map((hd) => h("div", {}, h("b", {}, `${hd.name}: `), hd.value)))),
      h("p", {}, h("button", { class: "secondary small", onclick: () => download(queueId) }, "Download message (.eml)"))));
  }
  const open = document.querySelector("details.headers")?.open;
  $("message").replaceChildren(...out);
  if (open) document.querySelector("details.headers").open = true;
}

// ---------------------------------------------------------------- decisions (explain)

function stepTime(at) {
  return new Date(at * 1000).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

// One numbered list of the checks' decisions, as `postillon explain` prints them.
function decisionsList(steps) {
  return h("ol", { class: "decisions" }, steps.map((s) =>
    h("li", { "data-action": s.action, "data-check": s.check },
      h("span", { class: "muted" }, stepTime(s.at), " "),
      h("b", {}, `${s.phase} · ${s.check}: `), badge(s.action),
      s.saw ? h("span", {}, " ", s.saw) : null,
      s.reply ? h("div", { class: "reply mono" }, "→ ", s.reply) : null)));
}

function decisionsCard(title, steps) {
  return h("div", { class: "card", id: "decisions" }, h("h2", {}, title),
    steps.length ? decisionsList(steps) : h("p", { class: "empty" }, "No decisions recorded."));
}

async function loadSessions() {
  const form = $("session-filters");
  const query = new URLSearchParams();
  const client = form.elements.client.value.trim();
  if (client) query.set("client", client);
  query.set("hours", form.elements.hours.value);
  if (form.elements.rejected.checked) query.set("rejected", "true");
  const result = await api(`/api/sessions?${query}`);
  $("sessions").replaceChildren(...(result.sessions.length ? result.sessions.map((s) =>
    h("div", { class: "card session", "data-session": s.session_id },
      h("div", { class: "card-head" },
        h("span", { class: "mono" }, s.client_ip || "local", " · ", s.session_id),
        badge(s.rejected ? "rejected" : "accepted")),
      h("p", { class: "muted" }, when(s.started_at), " · ", s.outcome,
        ...s.queue_ids.map((q) => h("span", {}, " · ", h("a", { href: `#/message/${q}`, class: "mono" }, q)))),
      decisionsList(s.steps))) : [h("div", { class: "card" }, h("p", { class: "empty" }, "No sessions recorded."))]));
}

// ---------------------------------------------------------------- TLS

function tlsSummary(t) {
  // "TLSv1.3 TLS_AES_256_GCM_SHA384 · verified (policy mta-sts) · mx.example.net"
  const proto = t.version ? [h("span", { class: "mono" }, `${t.version}${t.cipher ? " " + t.cipher : ""}`), " · "] : ["no TLS · "];
  return h("span", { class: "tls" }, proto,
    h("span", { class: `badge ${t.verified ? "delivered" : "deferred"}` }, t.verified ? "verified" : "not verified"),
    ` ${t.result} (policy ${t.policy})`, t.mx ? [" · ", h("span", { class: "mono" }, t.mx)] : "");
}

async function loadTls(domain) {
  if (domain) {
    let d = null;
    try {
      d = await api(`/api/tls/${encodeURIComponent(domain)}`);
    } catch (e) {
      if (e.status !== 404) throw e;
    }
    $("tls").replaceChildren(d ? tlsDomainCard(d, d.days, d.counting) : h("div", { class: "card" }, h("p", { class: "empty" }, `Nothing is known about TLS to ${domain}.`)));
    return;
  }
  const overview = await api("/api/tls");
  const note = overview.counting ? `Sessions on ${overview.days.join(", ")} (UTC).`
    : "Sessions are not counted: set [tls_reports] enabled = true. Cached MTA-STS policies are shown.";
  if (!overview.domains.length) {
    $("tls").replaceChildren(h("div", { class: "card" }, h("h2", {}, "TLS by destination"), h("p", { class: "muted" }, note), h("p", { class: "empty" }, "No outbound TLS to show yet.")));
    return;
  }
  const rows = overview.domains.map((d) =>
    h("tr", { class: "clickable", "data-tls-domain": d.domain, onclick: () => { location.hash = `#/tls/${encodeURIComponent(d.domain)}`; } },
      h("td", { "data-label": "Domain", class: "wrap" }, h("a", { href: `#/tls/${encodeURIComponent(d.domain)}` }, d.domain)),
      h("td", { "data-label": "Policy" }, policyName(d)),
      h("td", { "data-label": "Sessions", class: "num" }, d.sessions),
      h("td", { "data-label": "Failed", class: "num" }, d.failed),
      h("td", { "data-label": "Results" }, Object.entries(d.results).map(([k, v]) => [h("span", { class: `badge ${k === "success" ? "delivered" : "failed"}` }, k), ` ${v} `]))));
  $("tls").replaceChildren(h("div", { class: "card" }, h("h2", {}, "TLS by destination"), h("p", { class: "muted" }, note),
    h("table", { class: "stack" },
      h("thead", {}, h("tr", {}, h("th", {}, "Domain"), h("th", {}, "Policy"), h("th", { class: "num" }, "Sessions"), h("th", { class: "num" }, "Failed"), h("th", {}, "Results"))),
      h("tbody", {}, rows))));
}

function policyName(d) {
  const types = d.policy_types.filter((t) => t !== "no-policy-found");
  if (types.includes("tlsa")) return "DANE";
  if (d.mta_sts) return `MTA-STS ${d.mta_sts.mode}`;
  if (types.includes("sts")) return "MTA-STS";
  return "none published";
}

function tlsDomainCard(d, days, counting) {
  const facts = [
    ["Published policy", policyName(d)],
    ["Sessions", counting ? `${d.sessions} (${d.successful} successful, ${d.failed} failed) on ${days.join(", ")}` : "not counted ([tls_reports] enabled = false)"],
  ];
  const sts = d.mta_sts ? h("dl", { class: "facts", "data-mta-sts": d.mta_sts.mode },
    h("dt", {}, "Mode"), h("dd", {}, d.mta_sts.mode),
    h("dt", {}, "MX"), h("dd", { class: "mono" }, d.mta_sts.mx.join(", ")),
    h("dt", {}, "Policy id"), h("dd", { class: "mono" }, d.mta_sts.policy_id),
    h("dt", {}, "Fetched"), h("dd", {}, when(d.mta_sts.fetched_at)),
    h("dt", {}, "Expires"), h("dd", {}, `${when(d.mta_sts.expires_at)}${d.mta_sts.fresh ? "" : " (expired)"}`),
    h("dt", {}, "Last refresh error"), h("dd", {}, d.mta_sts.last_error || "–")) : h("p", { class: "muted" }, "No MTA-STS policy cached.");
  const failures = d.failures.length ? h("table", { class: "stack" },
    h("thead", {}, h("tr", {}, ["Result", "MX host", "Address", "Reason", "Count"].map((t) => h("th", {}, t)))),
    h("tbody", {}, d.failures.map((f) => h("tr", { "data-failure": f.result },
      h("td", { "data-label": "Result" }, h("span", { class: "badge failed" }, f.result)),
      h("td", { "data-label": "MX host", class: "mono wrap" }, f.mx_host || "–"),
      h("td", { "data-label": "Address", class: "mono" }, f.receiving_ip || "–"),
      h("td", { "data-label": "Reason", class: "reply" }, f.reason || "–"),
      h("td", { "data-label": "Count", class: "num" }, f.count))))) : h("p", { class: "empty" }, "No failed session.");
  return h("div", { class: "card", "data-tls-detail": d.domain },
    h("div", { class: "card-head" }, h("h2", {}, `TLS to ${d.domain}`), h("a", { href: "#/tls", class: "back" }, "‹ All destinations")),
    h("dl", { class: "facts" }, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
    h("div", { class: "results" }, Object.entries(d.results).map(([k, v]) => h("span", { "data-result": k }, h("span", { class: `badge ${k === "success" ? "delivered" : "failed"}` }, k), ` ${v} `))),
    h("h3", {}, "MTA-STS"), sts,
    h("h3", {}, "Failures"), failures);
}

async function download(queueId) {
  const token = sessionStorage.getItem(TOKEN_KEY) || "";
  const response = await fetch(`/api/queue/messages/${queueId}/raw`, { headers: { Authorization: `Bearer ${token}` } });
  if (!response.ok) { toast(`download failed (HTTP ${response.status})`, true); return; }
  const url = URL.createObjectURL(await response.blob());
  const link = h("a", { href: url, download: `${queueId}.eml` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// ---------------------------------------------------------------- start

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", () => showLogin());
  $("filters").addEventListener("submit", (e) => {
    e.preventDefault();
    state.filters = readFilters();
    state.offset = 0;
    if (location.hash !== "#/queue") location.hash = "#/queue"; else route();
  });
  $("filters").addEventListener("reset", () => {
    state.filters = {};
    state.offset = 0;
    setTimeout(() => { location.hash = "#/queue"; route(); });
  });
  $("session-filters").addEventListener("submit", (e) => { e.preventDefault(); route(); });
  $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.limit); route(); });
  $("next").addEventListener("click", () => { state.offset += state.limit; route(); });
  $("suspend-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = new FormData($("suspend-form"));
    const body = JSON.stringify({
      destination: form.get("destination"),
      seconds: Number(form.get("minutes") || 60) * 60,
      reason: form.get("reason") || "",
    });
    try {
      const result = await api("/api/queue/suspensions", { method: "POST", body });
      toast(`${result.destination} suspended until ${new Date(result.until).toLocaleString()}`);
      $("suspend-form").reset();
      route();
    } catch (error) {
      if (!(error instanceof Unauthorized)) toast(error.message, true);
    }
  });
  $("flush").addEventListener("click", async () => {
    const result = await api("/api/queue/flush", { method: "POST" });
    toast(`${result.recipients} deferred recipient(s) will be tried now`);
    route();
  });
  for (const b of document.querySelectorAll("#range button")) {
    b.addEventListener("click", () => {
      state.hours = Number(b.dataset.hours);
      for (const o of document.querySelectorAll("#range button")) o.classList.toggle("active", o === b);
      route();
    });
  }
  window.addEventListener("hashchange", route);
  route();
});
