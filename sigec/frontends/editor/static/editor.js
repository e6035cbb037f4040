// sigec editor: paint a label map, send each stroke to the server, show the re-rendered picture.
// Strokes are sent on pointerup, one at a time and in order (a promise chain), so the server
// applies them in the order they were painted.
"use strict";

const state = {
  config: null, session: null, cls: 0, radius: 8, scale: 1,
  painting: null,           // {points: [[x, y], ...]} while the pointer is down
  queue: Promise.resolve(), // strokes in flight, in order
  pending: 0,
};

const $ = (id) => document.getElementById(id);
const labelsCanvas = $("labels");
const labelsCtx = labelsCanvas.getContext("2d");

function setStatus(text, error = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", error);
}

function setBusy(delta) {
  state.pending += delta;
  document.body.dataset.busy = String(state.pending > 0);
}

async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const res = await fetch(path, opts);
  let data = null;
  try { data = await res.json(); } catch (_) { /* 204 or not JSON */ }
  if (!res.ok) {
    const err = new Error((data && data.detail) || `${res.status} ${res.statusText}`);
    err.status = res.status;
    throw err;
  }
  return data;
}

function rgb(c) { return `rgb(${c[0]}, ${c[1]}, ${c[2]})`; }

// -- the palette and tools ------------------------------------------------------------------
function buildPalette() {
  const palette = $("palette");
  state.config.classes.forEach((name, i) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "swatch";
    b.setAttribute("role", "radio");
    b.dataset.class = name;
    b.dataset.index = String(i);
    b.innerHTML = `<span class="chip" style="background:${rgb(state.config.palette[name])}"></span>${name}`;
    b.addEventListener("click", () => selectClass(i));
    palette.appendChild(b);
  });
  selectClass(state.config.classes.indexOf("water") >= 0 ? state.config.classes.indexOf("water") : 0);
}

function selectClass(i) {
  state.cls = i;
  for (const b of document.querySelectorAll(".swatch")) {
    b.setAttribute("aria-checked", String(Number(b.dataset.index) === i));
  }
}

function setupTools() {
  const brush = $("brush");
  brush.max = String(Math.floor(state.config.max_radius));
  brush.value = String(Math.max(2, Math.round(Math.min(state.config.height, state.config.width) / 24)));
  const update = () => { state.radius = Number(brush.value); $("brush-value").textContent = brush.value; };
  brush.addEventListener("input", update);
  update();
  $("overlay-toggle").addEventListener("change", (e) => $("overlay").classList.toggle("hidden", !e.target.checked));
  $("undo").addEventListener("click", () => enqueue(() => command("undo")));
  $("reset").addEventListener("click", () => enqueue(() => command("reset")));
  document.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "z") { e.preventDefault(); enqueue(() => command("undo")); }
  });
}

function layout() {
  const { width: W, height: H } = state.config;
  state.scale = Math.max(1, Math.floor(512 / W));
  labelsCanvas.width = W;
  labelsCanvas.height = H;
  for (const el of [labelsCanvas, $("image"), $("overlay")]) {
    el.style.width = `${W * state.scale}px`;
    el.style.height = `${H * state.scale}px`;
  }
}

// -- painting -------------------------------------------------------------------------------
function toLabel(e) {
  // pointer -> label-map pixels, clamped to the canvas (the server rejects points outside it)
  const r = labelsCanvas.getBoundingClientRect();
  const { width: W, height: H } = state.config;
  const x = Math.min(Math.max((e.clientX - r.left) * W / r.width, 0), W - 0.01);
  const y = Math.min(Math.max((e.clientY - r.top) * H / r.height, 0), H - 0.01);
  return [Math.round(x * 100) / 100, Math.round(y * 100) / 100];
}

function paintSegment(a, b) {
  labelsCtx.strokeStyle = labelsCtx.fillStyle = rgb(state.config.palette[state.config.classes[state.cls]]);
  labelsCtx.lineWidth = 2 * state.radius;
  labelsCtx.lineCap = labelsCtx.lineJoin = "round";
  labelsCtx.beginPath();
  labelsCtx.moveTo(a[0], a[1]);
  labelsCtx.lineTo(b[0], b[1]);
  labelsCtx.stroke();
}

function moveCursor(e) {
  const c = $("cursor");
  const r = labelsCanvas.getBoundingClientRect();
  const d = 2 * state.radius * r.width / state.config.width;
  c.style.display = "block";
  c.style.width = c.style.height = `${d}px`;
  c.style.left = `${e.clientX - r.left - d / 2}px`;
  c.style.top = `${e.clientY - r.top - d / 2}px`;
}

function setupPainting() {
  labelsCanvas.addEventListener("pointerdown", (e) => {
    if (e.button !== 0 || !state.session) return;
    labelsCanvas.setPointerCapture(e.pointerId);
    const p = toLabel(e);
    state.painting = { points: [p], cls: state.cls, radius: state.radius };
    paintSegment(p, p);
  });
  labelsCanvas.addEventListener("pointermove", (e) => {
    moveCursor(e);
    if (!state.painting) return;
    const p = toLabel(e);
    const pts = state.painting.points;
    const last = pts[pts.length - 1];
    if (Math.hypot(p[0] - last[0], p[1] - last[1]) < Math.max(0.5, state.radius / 4)) return;
    paintSegment(last, p);
    pts.push(p);
  });
  const finish = (e) => {
    if (!state.painting) return;
    const stroke = state.painting;
    state.painting = null;
    if (e.type === "pointerup") {
      const p = toLabel(e);
      const last = stroke.points[stroke.points.length - 1];
      if (p[0] !== last[0] || p[1] !== last[1]) { paintSegment(last, p); stroke.points.push(p); }
    }
    enqueue(() => sendStroke(stroke));
  };
  labelsCanvas.addEventListener("pointerup", finish);
  labelsCanvas.addEventListener("pointercancel", finish);
  labelsCanvas.addEventListener("pointerleave", () => { $("cursor").style.display = "none"; });
}

function decimate(points, max) {
  if (points.length <= max) return points;
  const step = Math.ceil(points.length / (max - 1));
  const out = points.filter((_, i) => i % step === 0);
  out.push(points[points.length - 1]);
  return out;
}

// -- talking to the server ------------------------------------------------------------------
function enqueue(task) {
  setBusy(+1);
  state.queue = state.queue.then(task).catch(handleError).finally(() => setBusy(-1));
  return state.queue;
}

async function handleError(err) {
  if (err.status === 404) {
    setStatus("session expired on the server; starting a new one", true);
    await startSession();
    return;
  }
  setStatus(err.message, true);
  if (state.session) await refresh();   // show the server's label map again, not the failed preview
}

async function sendStroke(stroke) {
  setStatus("rendering…");
  const body = {
    points: decimate(stroke.points, state.config.max_points),
    radius: stroke.radius,
    class: state.config.classes[stroke.cls],
  };
  show(await api("POST", `/api/sessions/${state.session}/strokes`, body));
}

async function command(name) {
  setStatus(`${name}…`);
  show(await api("POST", `/api/sessions/${state.session}/${name}`));
}

async function refresh() {
  try { show(await api("GET", `/api/sessions/${state.session}`)); } catch (_) { /* keep the error shown */ }
}

function drawLabels(url) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => {
      labelsCtx.imageSmoothingEnabled = false;
      labelsCtx.drawImage(img, 0, 0);
      resolve();
    };
    img.src = url;
  });
}

function loadImage(el, url) {
  return new Promise((resolve) => {
    el.onload = () => resolve();
    el.onerror = () => resolve();
    el.src = url;
  });
}

function fmtMs(ms) { return ms >= 100 ? `${ms.toFixed(0)} ms` : `${ms.toFixed(1)} ms`; }
function fmtPct(f) { return f >= 0.1 ? `${(100 * f).toFixed(0)}%` : `${(100 * f).toFixed(2)}%`; }
function fmtMacs(n) { return n >= 1e9 ? `${(n / 1e9).toFixed(2)} G` : `${(n / 1e6).toFixed(1)} M`; }

async function show(data) {
  await Promise.all([
    loadImage($("image"), data.image),
    drawLabels(data.labels),
    data.overlay ? loadImage($("overlay"), data.overlay) : Promise.resolve(),
  ]);
  $("stat-dense").textContent = fmtMs(data.dense_ms);
  $("undo").disabled = data.undo_depth === 0;
  const s = data.stats;
  if (s && s.kind === "incremental") {
    $("stat-incremental").textContent = fmtMs(s.engine_ms);
    $("stat-speedup").textContent = s.speedup ? `${s.speedup.toFixed(1)}×` : "–";
    $("stat-edit").textContent = fmtPct(s.edit_fraction);
    $("stat-recomputed").textContent = fmtPct(s.recomputed_fraction);
    $("stat-macs").textContent = s.incremental_macs != null
      ? `${fmtMacs(s.incremental_macs)} of ${fmtMacs(s.dense_macs)}` : "–";
    $("stat-macs").parentElement.hidden = s.incremental_macs == null;
    const li = document.createElement("li");
    li.textContent = `${fmtMs(s.engine_ms)} incremental vs ${fmtMs(s.dense_ms)} dense` +
      (s.speedup ? ` (${s.speedup.toFixed(1)}×)` : "") +
      `, edit ${fmtPct(s.edit_fraction)}, recomputed ${fmtPct(s.recomputed_fraction)}`;
    $("log").prepend(li);
    setStatus(`updated in ${fmtMs(s.engine_ms)} (engine); ${fmtMs(data.server_ms)} on the server in all`);
  } else if (s) {
    $("stat-incremental").textContent = "–";
    $("stat-speedup").textContent = $("stat-edit").textContent = $("stat-recomputed").textContent = "–";
    $("stat-macs").textContent = "–";
    setStatus(`dense recording: ${fmtMs(s.engine_ms)}; paint a stroke`);
  }
  document.body.dataset.strokes = String(data.strokes);
}

// Every page load gets a session of its own (not kept in sessionStorage: a duplicated tab would
// copy it and two tabs would paint one picture); leaving the page ends it on the server.
async function startSession() {
  setStatus("starting a session (recording the scene, measuring the dense latency)…");
  const data = await api("POST", "/api/sessions");
  state.session = data.session;
  await show(data);
}

window.addEventListener("pagehide", () => {
  if (state.session) fetch(`/api/sessions/${state.session}`, { method: "DELETE", keepalive: true });
});

async function main() {
  try {
    state.config = await api("GET", "/api/config");
    layout();
    buildPalette();
    setupTools();
    setupPainting();
    await startSession();
    document.body.dataset.ready = "true";
  } catch (err) {
    setStatus(`could not start: ${err.message}`, true);
  }
}

main();
