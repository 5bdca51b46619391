// livestack page: server-sent events drive everything (no polling loop); plots are drawn on <canvas> here.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { frames: [], generation: null, previewId: null, status: null, es: null };

// ---------------------------------------------------------------- API helpers
const token = (() => {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) { localStorage.setItem("livestack-token", decodeURIComponent(m[1])); history.replaceState(null, "", location.pathname); }
  return () => localStorage.getItem("livestack-token");
})();

async function post(path, body) {
  for (let attempt = 0; attempt < 2; attempt++) {
    const headers = { "Content-Type": "application/json" };
    const t = token();
    if (t) headers["Authorization"] = "Bearer " + t;
    const r = await fetch(path, { method: "POST", headers, body: JSON.stringify(body || {}) });
    const data = await r.json().catch(() => ({}));
    if ((r.status === 401 || r.status === 403) && attempt === 0) {
      const entered = prompt("This livestack needs its token (from livestack.toml, [web] token):");
      if (!entered) { message(data.error || "token needed", true); return null; }
      localStorage.setItem("livestack-token", entered.trim());
      continue;
    }
    if (!r.ok) { message(data.error || `${path}: HTTP ${r.status}`, true); return null; }
    message(data.message || "");
    return data;
  }
  return null;
}

function message(text, error) {
  const el = $("s-message");
  el.textContent = text || "";
  el.classList.toggle("error", !!error);
}

// ---------------------------------------------------------------- formatting
const fmt = (v, d = 2) => (v === null || v === undefined || Number.isNaN(v)) ? "–" : Number(v).toFixed(d);
function duration(s) {
  if (!s) return "0 s";
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = Math.round(s % 60);
  return h ? `${h} h ${String(m).padStart(2, "0")} m` : m ? `${m} m ${String(sec).padStart(2, "0")} s` : `${sec} s`;
}
function clock(iso) {
  if (!iso) return "–";
  const t = iso.split("T")[1] || iso;
  return t.slice(0, 8);
}

// ---------------------------------------------------------------- status
function showStatus(s) {
  state.status = s;
  const pill = $("state");
  pill.textContent = s.restack ? `restacking ${s.restack.done}/${s.restack.total}` : s.state;
  pill.className = "pill " + s.state;
  $("pause").textContent = s.paused ? "Resume" : "Pause";
  $("s-stacked").textContent = s.stacked;
  $("s-rejected").textContent = s.rejected;
  $("s-failed").textContent = s.failed;
  $("s-integration").textContent = duration(s.integration_s);
  $("s-last").textContent = clock(s.last_frame_time);
  const c = s.current || {};
  $("s-fwhm").textContent = fmt(c.fwhm, 2);
  $("s-stars").textContent = c.stars ?? "–";
  $("s-bg").textContent = fmt(c.background, 0);
  const rj = s.last_rejected;
  $("s-rejection").textContent = rj ? `Last rejected: ${rj.file} — ${rj.reason}` : "";
  $("s-disk").textContent = s.disk ? `${s.disk.error} (since ${clock(s.disk.since)}); stacking goes on in memory` : "";
  $("caption").textContent = s.has_stack
    ? `${s.stacked} frames · ${duration(s.integration_s)}`
      + `${s.palette && s.palette.name ? ` · ${s.palette.name}` : ""}${s.queued ? ` · ${s.queued} queued` : ""}`
    : (s.queued ? `${s.queued} queued` : "");
  $("paths").textContent = `watching ${s.watch} → ${s.out}`;
  const st = s.stretch || {};
  if (!dragging) {
    for (const k of Object.keys(SLIDERS)) setSlider(k, st[k]);
  }
  showFilters(s);
  if (s.has_stack && s.preview_id !== state.previewId) loadPreview(s.preview_id);
  if (!s.has_stack) { $("preview").hidden = true; $("nopreview").hidden = false; state.previewId = null; }
  if (s.generation !== state.generation || s.frames !== state.frames.length) loadFrames(s.generation);
}

function loadPreview(id) {
  state.previewId = id;
  const img = new Image();
  img.onload = () => {
    if (state.previewId !== id) return;
    const el = $("preview");
    el.src = img.src;
    el.dataset.previewId = String(id);
    el.hidden = false;
    $("nopreview").hidden = true;
  };
  img.src = `/api/preview.jpg?id=${id}`;
}

let framesBusy = false, framesAgain = false;
async function loadFrames(generation) {
  if (framesBusy) { framesAgain = true; return; }
  framesBusy = true;
  try {
    const since = generation === state.generation ? state.frames.length : 0;
    const r = await fetch(`/api/frames?since=${since}`);
    if (!r.ok) return;
    const data = await r.json();
    state.frames = (data.since === 0 || data.generation !== state.generation)
      ? data.frames : state.frames.concat(data.frames);
    state.generation = data.generation;
    if (data.since !== 0 && data.generation !== generation) { framesAgain = true; }
    renderTable();
    drawPlots();
  } finally {
    framesBusy = false;
    if (framesAgain) { framesAgain = false; loadFrames(state.status ? state.status.generation : null); }
  }
}

// ---------------------------------------------------------------- frames table
function renderTable() {
  const tbody = $("frames").tBodies[0];
  const rows = [];
  for (let i = state.frames.length - 1; i >= 0; i--) {
    const f = state.frames[i];
    const tr = document.createElement("tr");
    tr.className = f.status;
    tr.dataset.file = f.path || f.file;
    const cells = [i + 1, f.file, f.filter ?? "–", f.status, fmt(f.fwhm, 2), f.stars ?? "–", fmt(f.weight, 2),
                   f.reason || ""];
    const classes = [null, "file", "flt", "st", null, null, null, "reason"];
    cells.forEach((v, k) => {
      const td = document.createElement("td");
      td.textContent = v;
      if (classes[k]) td.className = classes[k];
      if (k === 1) td.title = f.path || f.file;
      tr.appendChild(td);
    });
    const td = document.createElement("td");
    if (f.status !== "failed") {
      const b = document.createElement("button");
      b.type = "button";
      const excluded = f.status === "excluded";
      b.textContent = excluded ? "include" : "exclude";
      b.dataset.testid = excluded ? "include" : "exclude";
      b.onclick = async () => {
        b.disabled = true;
        await post(excluded ? "/api/include" : "/api/exclude", { file: f.path || f.file });
      };
      td.appendChild(b);
    }
    tr.appendChild(td);
    rows.push(tr);
  }
  tbody.replaceChildren(...rows);
  // a colour camera without a filter wheel: no column of dashes
  $("frames").classList.toggle("nofilter", !state.frames.some((f) => f.filter));
  $("frames-count").textContent = `(${state.frames.length})`;
}

// ---------------------------------------------------------------- plots on canvas
function css(name) { return getComputedStyle(document.body).getPropertyValue(name).trim(); }

function plot(canvas, series) {
  // series: [{values: [number|null], color, points: [status]}]; x = frame number
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (!w || !h) return;
  canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const all = series.flatMap((s) => s.values).filter((v) => v !== null && Number.isFinite(v));
  const n = Math.max(...series.map((s) => s.values.length), 0);
  g.font = "10px system-ui, sans-serif";
  g.fillStyle = css("--dim");
  if (!all.length) { g.fillText("no data yet", 8, h / 2); return; }
  let lo = Math.min(...all), hi = Math.max(...all);
  if (hi - lo < 1e-9) { const d = Math.abs(hi) * 0.05 || 1; lo -= d; hi += d; }
  const pad = (hi - lo) * 0.08; lo -= pad; hi += pad;
  const L = 40, R = 6, T = 6, B = 14;
  const X = (i) => L + (n <= 1 ? (w - L - R) / 2 : (i * (w - L - R)) / (n - 1));
  const Y = (v) => T + (1 - (v - lo) / (hi - lo)) * (h - T - B);
  g.strokeStyle = css("--line"); g.lineWidth = 1;
  for (const v of [lo + pad, (lo + hi) / 2, hi - pad]) {
    g.beginPath(); g.moveTo(L, Y(v)); g.lineTo(w - R, Y(v)); g.stroke();
    g.fillText(Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3), 2, Y(v) + 3);
  }
  g.fillText("1", L, h - 2);
  if (n > 1) { const t = String(n); g.fillText(t, w - R - g.measureText(t).width, h - 2); }
  for (const s of series) {
    g.strokeStyle = s.color; g.lineWidth = 1.5; g.beginPath();
    let pen = false;
    s.values.forEach((v, i) => {
      if (v === null || !Number.isFinite(v)) { pen = false; return; }
      if (pen) g.lineTo(X(i), Y(v)); else g.moveTo(X(i), Y(v));
      pen = true;
    });
    g.stroke();
    s.values.forEach((v, i) => {
      if (v === null || !Number.isFinite(v)) return;
      const st = s.points ? s.points[i] : "stacked";
      g.fillStyle = st === "rejected" ? css("--warn") : st === "excluded" ? css("--excl")
        : s.colors ? s.colors[i] : s.color;
      const r = st === "rejected" || st === "excluded" ? 3 : (n > 120 ? 1 : 2);
      g.beginPath(); g.arc(X(i), Y(v), r, 0, 2 * Math.PI); g.fill();
    });
  }
}

function drawPlots() {
  const f = state.frames.filter((x) => x.status !== "failed");
  const st = f.map((x) => x.status);
  const col = (k) => f.map((x) => (x[k] === undefined ? null : x[k]));
  const accent = css("--accent");
  // with several filters each point takes its filter's colour (the legend above the plots names them)
  const names = filterNames(f);
  const colors = names.length > 1 ? f.map((x) => css(filterColor(names, x.filter))) : null;
  const legend = $("plot-legend");
  legend.hidden = names.length < 2;
  legend.replaceChildren(...(names.length < 2 ? [] : names.map((n) => {
    const i = document.createElement("i");
    i.className = "k dot-k";
    i.style.color = `var(${filterColor(names, n)})`;
    i.textContent = n ?? "no filter";
    return i;
  })));
  for (const k of ["fwhm", "stars", "background", "weight"]) {
    plot($(`plot-${k}`), [{ values: col(k), color: accent, points: st, colors }]);
  }
  plot($("plot-drift"), [
    { values: col("shift_x"), color: css("--c-x") },
    { values: col("shift_y"), color: css("--c-y") },
    { values: col("rotation"), color: css("--c-r") },
  ]);
}

// ---------------------------------------------------------------- filters and the colour composite
const FILTER_COLORS = 7;   // --f0 … --f6 in style.css, by order of first appearance (red shades at night)
function filterNames(frames) {
  const seen = (state.status && state.status.filters || []).map((x) => x.filter);
  for (const x of frames) if (x.status !== "failed" && !seen.includes(x.filter ?? null)) seen.push(x.filter ?? null);
  return seen;
}
const filterColor = (names, name) => `--f${Math.max(0, names.indexOf(name ?? null)) % FILTER_COLORS}`;
// the name the composite knows a filter by (compose weights and hues): the FITS value, "none" without one
const filterLabel = (f) => (f.filter ?? "").trim() || "none";
const folded = (name) => name.trim().toLowerCase();
function weightOf(weights, name) {
  if (name in weights) return weights[name];
  const k = Object.keys(weights).find((w) => folded(w) === folded(name));
  return k === undefined ? 1 : weights[k];
}

function showFilters(s) {
  const list = s.filters || [];
  const pal = s.palette || null;
  const panel = $("filters");
  panel.hidden = !(list.some((f) => f.filter !== null) || list.length > 1);
  if (panel.hidden) return;
  $("filters-count").textContent = `(${list.length})`;
  const rows = list.map((f) => {
    const tr = document.createElement("tr");
    tr.dataset.testid = "filter-row";
    tr.dataset.key = f.key;
    const cells = [
      ["filter", filterLabel(f), "fname"], ["frames", f.frames, "n"], ["rejected", f.rejected, "n rej"],
      ["integration", duration(f.integration_s), "n"], ["FWHM", fmt(f.fwhm, 2), "n"],
      ["last frame", clock(f.last_frame_time), "n"],
    ];
    for (const [label, v, cls] of cells) {
      const td = document.createElement("td");
      td.dataset.label = label;
      td.className = cls;
      td.textContent = v;
      tr.appendChild(td);
    }
    tr.cells[0].style.setProperty("--fc", `var(${filterColor(list.map((x) => x.filter), f.filter)})`);
    const td = document.createElement("td");
    td.className = "dl";
    if (f.frames > 0) {
      const a = document.createElement("a");
      a.href = `/api/files/${encodeURIComponent(f.file)}`;
      a.download = f.file;
      a.textContent = f.file;
      a.dataset.testid = `dl-${f.key || "none"}`;
      td.appendChild(a);
    } else {
      td.textContent = "nothing stacked";
    }
    tr.appendChild(td);
    return tr;
  });
  $("filters-table").tBodies[0].replaceChildren(...rows);

  const composite = list.length > 1 || !!(pal && pal.name);
  $("composite").hidden = !composite || !pal;
  $("dl-fits-kind").textContent = pal && pal.name ? ` (${pal.name} composite)` : "";
  if (!composite || !pal) return;
  showPalette(pal);
  showWeights(list, pal.weights || {});
  $("palette-mapping").textContent = pal.mapping
    || (s.has_stack ? "" : "the composite appears with the first stacked frames");
}

function showPalette(pal) {
  const sel = $("palette");
  const choices = pal.choices || [];
  const auto = `Auto (${pal.requested === "auto" && pal.name ? pal.name : "by filters"})`;
  const sig = JSON.stringify([choices, auto]);
  if (sel.dataset.sig !== sig) {
    // rebuilt only when the choices change: a rebuild closes a select the user has open
    sel.replaceChildren(...choices.map((c) => new Option(c === "auto" ? auto : c, c)));
    sel.dataset.sig = sig;
  }
  if (!paletteBusy) sel.value = pal.requested;
}
let paletteBusy = false;
$("palette").addEventListener("change", async () => {
  paletteBusy = true;
  try {
    const r = await post("/api/palette", { palette: $("palette").value });
    if (r) showStatus(r);
  } finally {
    paletteBusy = false;
    if (state.status) showFilters(state.status);   // a refusal puts the select back to what the daemon uses
  }
});

// weight sliders: built when the set of filters changes, moved by the daemon's weights unless the user is on them
const touchedWeights = new Map();   // filter label -> value not yet acknowledged by the daemon
let weightTimer = null;
function showWeights(list, weights) {
  const box = $("weights");
  const sig = JSON.stringify(list.map((f) => [f.key, f.filter]));
  if (box.dataset.sig !== sig) {
    box.replaceChildren(...list.map((f) => {
      const label = document.createElement("label");
      const input = document.createElement("input");
      const out = document.createElement("output");
      Object.assign(input, { type: "range", min: "0", max: "3", step: "0.05", value: "1" });
      input.dataset.testid = `weight-${f.key || "none"}`;
      input.dataset.filter = filterLabel(f);
      input.setAttribute("aria-label", `${filterLabel(f)} weight`);
      input.addEventListener("input", () => {
        touchedWeights.set(input.dataset.filter, Number(input.value));
        out.textContent = Number(input.value).toFixed(2);
        sendWeights();
      });
      label.append(filterLabel(f), input, out);
      return label;
    }));
    box.dataset.sig = sig;
  }
  for (const input of box.querySelectorAll("input")) {
    const name = input.dataset.filter;
    if (touchedWeights.has(name)) continue;
    const w = weightOf(weights, name);
    input.value = String(Math.min(3, w));
    input.nextElementSibling.textContent = w.toFixed(2);
  }
}
function sendWeights() {
  clearTimeout(weightTimer);
  weightTimer = setTimeout(async () => {
    // the daemon replaces its weights with what is sent: start from its own, change the touched ones
    const cur = { ...((state.status && state.status.palette && state.status.palette.weights) || {}) };
    const sent = new Map(touchedWeights);
    for (const [name, v] of sent) {
      for (const k of Object.keys(cur)) if (folded(k) === folded(name)) delete cur[k];
      if (Math.abs(v - 1) > 1e-9) cur[name] = v;   // 1 is the default: left out
    }
    const r = await post("/api/palette", { weights: cur });
    for (const [name, v] of sent) if (touchedWeights.get(name) === v) touchedWeights.delete(name);
    if (r) showStatus(r); else if (state.status) showFilters(state.status);
  }, 300);
}
$("weights-reset").onclick = async () => {
  clearTimeout(weightTimer);
  touchedWeights.clear();
  const r = await post("/api/palette", { weights: {} });
  if (r) showStatus(r);
};

// ---------------------------------------------------------------- stretch controls
let dragging = false, stretchTimer = null;
// Slider positions <-> StretchParams overrides (fractions of the auto-normalised range).  The sky sits at a
// few % of that range, so midtones and white move on a log scale and black on its first 5 %.
const SLIDERS = {
  black: { id: "st-black", out: "o-black", auto: 0, toValue: (x) => x, toSlider: (v) => v },
  midtones: { id: "st-mid", out: "o-mid", auto: -1.4, toValue: (x) => 10 ** x, toSlider: (v) => Math.log10(v) },
  white: { id: "st-white", out: "o-white", auto: 0, toValue: (x) => 10 ** x, toSlider: (v) => Math.log10(v) },
};
const show = (v) => (v < 0.01 ? v.toFixed(4) : v.toFixed(2));
function setSlider(key, v) {
  const s = SLIDERS[key], el = $(s.id);
  if (v === null || v === undefined) { el.value = s.auto; $(s.out).textContent = "auto"; delete el.dataset.touched; }
  else { el.value = s.toSlider(v); $(s.out).textContent = show(v); }
}
function sendStretch() {
  clearTimeout(stretchTimer);
  stretchTimer = setTimeout(async () => {
    const cur = (state.status && state.status.stretch) || {};
    const body = {};
    for (const [k, s] of Object.entries(SLIDERS)) {
      const el = $(s.id);
      body[k] = el.dataset.touched ? Number(s.toValue(Number(el.value)).toFixed(5)) : cur[k];
    }
    const r = await post("/api/stretch", body);
    dragging = false;
    if (r) showStatus(r);
  }, 250);
}
for (const [k, s] of Object.entries(SLIDERS)) {
  $(s.id).addEventListener("input", () => {
    dragging = true;
    $(s.id).dataset.touched = "1";
    $(s.out).textContent = show(s.toValue(Number($(s.id).value)));
    sendStretch();
  });
}
$("st-auto").onclick = async () => {
  const r = await post("/api/stretch", { auto: true });
  if (r) showStatus(r);
};

// ---------------------------------------------------------------- other controls
$("pause").onclick = async () => {
  const paused = state.status && state.status.paused;
  const r = await post(paused ? "/api/resume" : "/api/pause");
  if (r) showStatus(r);
};
$("newstack").onclick = async () => {
  if (!confirm("Archive this stack and start a new one? Files already in the capture folder are not used.")) return;
  const r = await post("/api/new-session");
  if (r) { message(r.archived ? `previous stack archived in ${r.archived}` : "new stack started"); showStatus(r); }
};
$("night").onclick = () => {
  document.body.classList.toggle("night");
  localStorage.setItem("livestack-night", document.body.classList.contains("night") ? "1" : "");
  drawPlots();
};
if (localStorage.getItem("livestack-night")) document.body.classList.add("night");
$("zoom").onclick = () => {
  const v = $("viewer");
  const full = v.classList.toggle("full");
  v.classList.toggle("fit", !full);
  $("zoom").textContent = full ? "fit" : "1:1";
};
$("preview").addEventListener("dblclick", () => $("zoom").click());
window.addEventListener("resize", () => drawPlots());

// ---------------------------------------------------------------- live connection
function connect() {
  const es = new EventSource("/api/events");
  state.es = es;
  es.addEventListener("status", (ev) => { $("conn").classList.add("on"); showStatus(JSON.parse(ev.data)); });
  es.onerror = () => {
    $("conn").classList.remove("on");
    const pill = $("state");
    if (es.readyState === EventSource.CLOSED) { pill.textContent = "offline"; pill.className = "pill offline"; }
  };
}
connect();
