// The rollout dashboard: polls the read-only data routes and renders them. Every value from the
// database is set with textContent or as an SVG attribute, never parsed as HTML. The token comes
// from the URL's #token= fragment (kept in sessionStorage for reloads) and goes out as a bearer token.

const COLORS = { notified: "#2f6fde", succeeded: "#17914a", failed: "#c7312b" };
const RUNNING = new Set(["IN_PROGRESS", "ABORT_REQUESTED"]);
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

function takeToken() {
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (m) {
    let value = "";
    try {
      value = decodeURIComponent(m[1]);
    } catch (e) {  // a malformed %-escape: no token, and the page says what to open instead
      value = "";
    }
    sessionStorage.setItem("edgepeft-dashboard-token", value);
    history.replaceState(null, "", location.pathname + location.search);  // the token leaves the address bar
  }
  return sessionStorage.getItem("edgepeft-dashboard-token") || "";
}

const token = takeToken();
let selected = new URLSearchParams(location.search).get("rollout");
let updates = 0;

async function api(path) {
  const res = await fetch(path, { headers: { Authorization: `Bearer ${token}` }, cache: "no-store" });
  const body = await res.json().catch(() => ({}));
  if (!res.ok) {
    const e = body.error || {};
    throw new Error(`${e.message || `HTTP ${res.status}`}${e.hint ? ` (${e.hint})` : ""}`);
  }
  return body;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

const statusCell = (s) => { const td = el("td"); td.append(el("span", s, `status s-${String(s).replace(/[^A-Z_]/g, "")}`)); return td; };
const time = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "-");
const counts = (c) => Object.entries(c || {}).sort().map(([k, v]) => `${k} ${v}`).join(", ") || "none";

function renderRollouts(items) {
  const body = $("rollouts").tBodies[0];
  body.replaceChildren();
  for (const r of items) {
    const tr = el("tr");
    tr.dataset.id = r.id;
    if (r.id === selected) tr.className = "selected";
    tr.append(el("td", r.id), statusCell(r.status), el("td", counts(r.counts)), el("td", r.reason || ""), el("td", time(r.updated)));
    tr.addEventListener("click", () => { selected = r.id; refresh(); });
    body.append(tr);
  }
  if (!items.length) {
    const tr = el("tr");
    tr.append(el("td", "no rollouts yet"));
    body.append(tr);
  }
}

function renderDetail(d) {
  $("detail").hidden = false;
  $("detail-id").textContent = d.id;
  $("detail-status").replaceChildren(el("span", d.status, `status s-${String(d.status).replace(/[^A-Z_]/g, "")}`));
  $("detail-reason").textContent = d.reason || "";
  $("detail-summary").textContent = `devices: ${counts(d.counts)}; ${d.waves || 0} wave(s), rate ${Math.round(d.rate_per_minute || 0)}/min`;
  const body = $("devices").tBodies[0];
  body.replaceChildren();
  for (const x of d.devices) {
    const tr = el("tr");
    tr.dataset.device = x.device;
    tr.dataset.status = x.status;
    tr.append(el("td", x.device), el("td", x.link), statusCell(x.status), el("td", x.attempts),
      el("td", x.wave ?? "-"), el("td", x.reason || ""));
    body.append(tr);
  }
  drawChart(d.progress.lines, d.devices.length);
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = String(text);
  return e;
}

// Cumulative step lines, seconds on x, devices on y; axes with a few ticks.
function drawChart(lines, total) {
  const chart = $("chart");
  chart.replaceChildren();
  const W = 720, H = 240, L = 44, R = 12, T = 12, B = 30;
  const xmax = Math.max(1e-3, ...Object.values(lines).flat().map((p) => p[0]));
  const ymax = Math.max(1, total);
  const x = (s) => L + (s / xmax) * (W - L - R), y = (n) => H - B - (n / ymax) * (H - T - B);
  chart.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#9aa3ad" }),
    svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#9aa3ad" }));
  for (let i = 0; i <= 4; i++) {
    const sx = (xmax * i) / 4, ny = Math.round((ymax * i) / 4);
    chart.append(svg("text", { x: x(sx), y: H - B + 16, "text-anchor": "middle", "font-size": 11, fill: "#6b7280" }, sx.toFixed(sx < 10 ? 1 : 0)),
      svg("text", { x: L - 6, y: y(ny) + 4, "text-anchor": "end", "font-size": 11, fill: "#6b7280" }, ny));
  }
  chart.append(svg("text", { x: W - R, y: H - 4, "text-anchor": "end", "font-size": 11, fill: "#6b7280" }, "seconds"));
  const legend = $("chart-legend");
  legend.replaceChildren();
  for (const [name, pts] of Object.entries(lines)) {
    if (pts.length) {
      let d = `M ${x(0)} ${y(0)}`;
      for (const [s, n] of pts) d += ` H ${x(s)} V ${y(n)}`;
      d += ` H ${x(xmax)}`;  // flat to the end: nothing more happened
      chart.append(svg("path", { d, fill: "none", stroke: COLORS[name] || "#333", "stroke-width": 2, "data-line": name }));
    }
    const item = el("span");
    item.append(el("i", undefined, `l-${name}`), `${name} ${pts.length ? pts[pts.length - 1][1] : 0}`);
    legend.append(item);
  }
}

let timer = null;
async function refresh() {
  clearTimeout(timer);
  let running = false;
  try {
    if (!token) throw new Error("no token: open the address `edgepeft rollout serve` printed (it ends with #token=...)");
    const { rollouts } = await api("/api/rollouts");
    if (!selected || !rollouts.some((r) => r.id === selected)) selected = rollouts[0]?.id ?? null;
    renderRollouts(rollouts);
    running = rollouts.some((r) => RUNNING.has(r.status));
    if (selected) renderDetail(await api(`/api/rollouts/${encodeURIComponent(selected)}`));
    $("error").hidden = true;
    updates += 1;
    document.body.dataset.updates = String(updates);
    document.body.dataset.running = String(running);
    $("refresh").textContent = `updated ${new Date().toLocaleTimeString()}${running ? " · refreshing every second while a rollout runs" : ""}`;
  } catch (err) {
    $("error").hidden = false;
    $("error").textContent = `cannot load the rollouts: ${err.message}`;
  }
  timer = setTimeout(refresh, running ? 1000 : 5000);
}

refresh();
