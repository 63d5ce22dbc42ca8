// rackpower status page: polls the API once a second, no build step, no external files.
// Bars show load (max of measured and estimated power) against the envelope in force:
// green below 90 %, amber up to 100 %, red above (the bar is then full).
"use strict";

const POLL_MS = 1000;
const BIG_TREE = 400; // above this many rows, servers are hidden by default
const state = { selected: null, serversChosen: false, tree: null };

function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}

function fmtW(watts) {
  if (watts === null || watts === undefined || !isFinite(watts)) return "–";
  const a = Math.abs(watts);
  if (a >= 1e6) return (watts / 1e6).toFixed(2) + " MW";
  if (a >= 1e3) return (watts / 1e3).toFixed(1) + " kW";
  return watts.toFixed(0) + " W";
}

function band(ratio) {
  if (ratio > 1) return "over";
  if (ratio >= 0.9) return "warn";
  return "ok";
}

function barHtml(node) {
  const ratio = node.envelope_w > 0 ? node.load_w / node.envelope_w : 1;
  const width = Math.max(0, Math.min(1, ratio)) * 100;
  return (
    `<div class="barwrap" title="${esc(fmtW(node.load_w))} of ${esc(fmtW(node.envelope_w))}">` +
    `<div class="bar"><div class="fill ${band(ratio)}" data-ratio="${ratio.toFixed(4)}"` +
    ` style="width:${width.toFixed(1)}%"></div></div>` +
    `<span class="pct">${(ratio * 100).toFixed(0)} %</span></div>`
  );
}

function capText(cap) {
  if (!cap || !cap.capped_gpus) return cap && cap.mode ? esc(cap.mode) : "";
  return `${cap.capped_gpus} GPU @ ${esc(fmtW(cap.limit_w))}` + (cap.mode ? ` (${esc(cap.mode)})` : "");
}

function renderTree(tree) {
  const showServers = document.getElementById("show-servers").checked;
  const rows = [];
  const alarms = [];
  for (const n of tree.nodes) {
    for (const a of n.alarms) alarms.push({ node: n.id, ...a });
    if (n.kind === "node" && !showServers) continue;
    const sel = n.id === state.selected ? " selected" : "";
    const pad = 6 + n.depth * 16;
    const room = n.headroom_w < 0 ? "neg" : "";
    rows.push(
      `<tr class="kind-${esc(n.kind)}${sel}" data-node="${esc(n.id)}">` +
      `<td style="padding-left:${pad}px">${esc(n.id)}</td>` +
      `<td>${esc(n.kind)}</td>` +
      `<td class="barcol">${barHtml(n)}</td>` +
      `<td>${fmtW(n.power_w)}${n.stale ? " ⚠" : ""}</td>` +
      `<td>${fmtW(n.estimated_w)}</td>` +
      `<td>${fmtW(n.envelope_w)}</td>` +
      `<td>${n.reserved_w ? fmtW(n.reserved_w) : ""}</td>` +
      `<td class="${room}">${fmtW(n.headroom_w)}</td>` +
      `<td>${capText(n.cap)}</td>` +
      `<td class="alarms">${n.alarms.map((a) => esc(a.kind)).join(", ")}</td></tr>`
    );
  }
  document.querySelector("#tree tbody").innerHTML = rows.join("");
  const list = document.getElementById("alarms");
  list.innerHTML = alarms.length
    ? alarms
        .map((a) => `<li class="alarm" data-kind="${esc(a.kind)}">${esc(a.node)}: ` +
          `${esc(a.kind)} - ${esc(a.message)}</li>`)
        .join("")
    : '<li class="muted">none</li>';
}

function renderHealth(health) {
  const h = document.getElementById("health");
  h.textContent = health.status;
  h.className = "pill " + health.status;
  document.getElementById("mode").textContent = health.mode;
  const age = health.cycle_age_s === null ? "no cycle yet" : `last cycle ${health.cycle_age_s.toFixed(1)} s ago`;
  document.getElementById("updated").textContent =
    `${age} · ${health.cycles} cycles · ${health.overruns} overruns · ` +
    `${health.devices_stale}/${health.devices_total} devices stale · ` +
    `${health.reservations} reservations`;
}

function drawPlot(hist) {
  const canvas = document.getElementById("plot");
  const ratio = window.devicePixelRatio || 1;
  const cssW = canvas.clientWidth || 1200;
  const cssH = canvas.clientHeight || 220;
  canvas.width = Math.round(cssW * ratio);
  canvas.height = Math.round(cssH * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, cssW, cssH);
  document.getElementById("plot-node").textContent = hist.node;
  const left = 70, right = 10, top = 10, bottom = 24;
  const w = cssW - left - right, h = cssH - top - bottom;
  ctx.strokeStyle = "#dde2e8";
  ctx.strokeRect(left, top, w, h);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#6b7480";
  if (hist.ts_s.length < 2) {
    ctx.fillText("collecting samples…", left + 10, top + 20);
    return;
  }
  const t1 = hist.ts_s[hist.ts_s.length - 1];
  const t0 = Math.min(hist.ts_s[0], t1 - 60);
  const values = hist.load_w.concat(hist.envelope_w);
  const yMax = Math.max(...values) * 1.1 || 1;
  const x = (t) => left + ((t - t0) / (t1 - t0)) * w;
  const y = (v) => top + h - (v / yMax) * h;
  for (let k = 0; k <= 4; k++) {
    const v = (yMax * k) / 4;
    ctx.fillText(fmtW(v), 4, y(v) + 4);
    ctx.beginPath(); ctx.moveTo(left, y(v)); ctx.lineTo(left + w, y(v)); ctx.stroke();
  }
  const spanMin = (t1 - t0) / 60;
  ctx.fillText(`-${spanMin.toFixed(1)} min`, left, cssH - 6);
  ctx.fillText("now", left + w - 22, cssH - 6);
  const line = (series, colour, dash) => {
    ctx.strokeStyle = colour; ctx.lineWidth = 2; ctx.setLineDash(dash);
    ctx.beginPath();
    series.forEach((v, k) => {
      const px = x(hist.ts_s[k]), py = y(v);
      if (k === 0) ctx.moveTo(px, py); else ctx.lineTo(px, py);
    });
    ctx.stroke(); ctx.setLineDash([]); ctx.lineWidth = 1;
  };
  line(hist.envelope_w, "#d64541", [6, 4]);
  line(hist.load_w, "#2f6fd6", []);
}

async function getJson(path) {
  const resp = await fetch(path, { cache: "no-store" });
  if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
  return resp.json();
}

async function tick() {
  try {
    const [tree, health] = await Promise.all([getJson("/v1/tree"), getJson("/v1/health")]);
    state.tree = tree;
    document.getElementById("site").textContent = tree.site;
    if (!state.serversChosen && tree.nodes.length > BIG_TREE) {
      document.getElementById("show-servers").checked = false;
    }
    if (state.selected === null && tree.nodes.length) state.selected = tree.nodes[0].id;
    renderTree(tree);
    renderHealth(health);
    if (state.selected !== null) {
      drawPlot(await getJson("/v1/history?node=" + encodeURIComponent(state.selected)));
    }
  } catch (err) {
    const h = document.getElementById("health");
    h.textContent = "unreachable";
    h.className = "pill down";
    document.getElementById("updated").textContent = String(err);
  }
}

document.querySelector("#tree tbody").addEventListener("click", (ev) => {
  const row = ev.target.closest("tr[data-node]");
  if (!row) return;
  state.selected = row.dataset.node;
  if (state.tree) renderTree(state.tree);
  tick();
});
document.getElementById("show-servers").addEventListener("change", () => {
  state.serversChosen = true;
  if (state.tree) renderTree(state.tree);
});

tick();
setInterval(tick, POLL_MS);
