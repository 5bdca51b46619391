// livestack page: server-sent events drive everything (no polling loop); plots are drawn on <canvas> here.
"use strict";

const $ = (id) => document.getElementById(id);
// view: null shows the live stack; an archived target's id shows that target's preview (live updates wait)
// refusedId: the status's `refused` last seen (undefined until the first status: one from before the page was
// opened is not said)
const state = { frames: [], generation: null, previewId: null, status: null, es: null, view: null,
                refusedId: undefined };

// ---------------------------------------------------------------- API helpers
// /#token=<token>: the token is the rest of the hash ('&' included), URL-decoded when it decodes; a '%' that is
// no escape ("50%sure") is kept as typed
const token = (() => {
  const m = location.hash.match(/token=(.+)/);
  if (m) {
    let t = m[1];
    try { t = decodeURIComponent(t); } catch (err) { /* not URL-encoded: as typed */ }
    localStorage.setItem("livestack-token", t);
    history.replaceState(null, "", location.pathname);
  }
  return () => localStorage.getItem("livestack-token");
})();

async function post(path, body) {
  for (let attempt = 0; attempt < 2; attempt++) {
    const headers = { "Content-Type": "application/json" };
    const t = token();
    if (t) headers["Authorization"] = "Bearer " + t;
    let r;
    try {
      r = await fetch(path, { method: "POST", headers, body: JSON.stringify(body || {}) });
    } catch (err) {                   // no answer at all: network down, daemon restarting
      message(`${path}: no answer from livestack (${err.message || err})`, true);
      return null;
    }
    const data = await r.json().catch(() => ({}));
    if ((r.status === 401 || r.status === 403) && attempt === 0) {
      const entered = await ask("This livestack needs its token (from livestack.toml, [web] token):",
                                { ok: "Send", input: true });
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

// The status a change was answered with; null for a 202 (the worker, busy, began it late: it takes effect when
// done): post() has said its message, and the status the events bring shows the change — or its refusal (refused)
const statusOf = (r) => (r && !r.accepted ? r : null);

// A question in the page's own colours (red at night), as confirm() / prompt() answer: true or the text typed
// when accepted, null when cancelled (Cancel, Escape).  One at a time: a second waits for the first's answer.
let asking = Promise.resolve();
function ask(text, options) {
  const answer = asking.then(() => askNow(text, options || {}));
  asking = answer.catch(() => null);
  return answer;
}
function askNow(text, { ok = "OK", input = false, danger = false }) {
  const dlg = $("ask"), field = $("ask-input"), okButton = $("ask-ok");
  $("ask-text").textContent = text;
  okButton.textContent = ok;
  okButton.classList.toggle("danger", danger);
  field.hidden = !input;
  field.value = "";
  dlg.returnValue = "";
  return new Promise((resolve) => {
    dlg.addEventListener("close", () => {
      resolve(dlg.returnValue === "ok" ? (input ? field.value : true) : null);
    }, { once: true });
    dlg.showModal();
    (input ? field : danger ? dlg.querySelector('button[value="cancel"]') : okButton).focus();
  });
}

// The answer to what the user just did (a refusal, "previous stack archived in …"): shown at the foot of the
// screen (style.css), where the user is — on a phone the status panel is far above the frames' exclude buttons
// and the targets — for a while (an error longer), or until tapped
let messageTimer = null;
function message(text, error) {
  const el = $("s-message");
  el.textContent = text || "";
  el.classList.toggle("error", !!error);
  clearTimeout(messageTimer);
  if (text) messageTimer = setTimeout(() => { el.textContent = ""; }, error ? 15000 : 6000);
}
$("s-message").addEventListener("click", () => message(""));

// ---------------------------------------------------------------- formatting
const fmt = (v, d = 2) => (v === null || v === undefined || Number.isNaN(v)) ? "–" : Number(v).toFixed(d);
function duration(s) {
  if (!s) return "0 s";
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = Math.round(s % 60);
  return h ? `${h} h ${String(m).padStart(2, "0")} m` : m ? `${m} m ${String(sec).padStart(2, "0")} s` : `${sec} s`;
}
function clock(iso, latest) {
  if (!iso) return "–";
  const t = iso.split("T")[1] || iso;
  // ``latest``: the session's latest frame time — a time of another day than it (a filter last shot the night
  // before: without its date, 21:11 read as later tonight than 20:39) is given its month and day
  const day = iso.includes("T") ? iso.split("T")[0] : "";
  const other = day && latest && latest.includes("T") && day !== latest.split("T")[0];
  return other ? `${day.slice(5)} ${t.slice(0, 8)}` : t.slice(0, 8);
}
const num = (v) => typeof v === "number" && Number.isFinite(v);
const pad2 = (n) => String(n).padStart(2, "0");
function hms(deg) {            // right ascension, degrees -> 16h 41m 42s
  const s = Math.round((((deg % 360) + 360) % 360) * 240) % 86400;
  return `${Math.floor(s / 3600)}h ${pad2(Math.floor((s % 3600) / 60))}m ${pad2(s % 60)}s`;
}
function dms(deg) {            // declination, degrees -> +36° 27′ 37″
  const s = Math.round(Math.abs(deg) * 3600);
  return `${deg < 0 ? "−" : "+"}${Math.floor(s / 3600)}° ${pad2(Math.floor((s % 3600) / 60))}′ ${pad2(s % 60)}″`;
}
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
// "RA 16h 41m 41s" and "Dec +36° 27′ 36″" each wrap as one word on a phone
const nowrap = (text) => text.replace(/ /g, "\u00a0");
const radec = (ra, dec) => `${nowrap(`RA ${ra}`)} ${nowrap(`Dec ${dec}`)}`;

// ---------------------------------------------------------------- status
function showStatus(s) {
  state.status = s;
  const pill = $("state");
  pill.textContent = s.restack ? `restacking ${s.restack.done}/${s.restack.total}` : s.state;
  pill.className = "pill " + s.state;
  pill.title = s.processing ? `processing ${s.processing}` : "";
  $("pause").textContent = s.paused ? "Resume" : "Pause";
  $("s-stacked").textContent = s.stacked;
  $("s-rejected").textContent = s.rejected;
  $("s-failed").textContent = s.failed;
  $("s-integration").textContent = num(s.integration_s) ? duration(s.integration_s) : "–";   // null: starting
  $("s-last").textContent = clock(s.last_frame_time);
  const c = s.current || {};
  $("s-fwhm").textContent = fmt(c.fwhm, 2);
  $("s-stars").textContent = c.stars ?? "–";
  $("s-bg").textContent = fmt(c.background, 0);
  const rj = s.last_rejected;
  $("s-rejection").textContent = rj ? `Last rejected: ${rj.file} — ${rj.reason}` : "";
  const lf = s.last_failed;       // a light no master fits fails: the count alone said nothing of why
  $("s-failure").textContent = lf ? `Last failed: ${lf.file} — ${lf.reason}` : "";
  $("s-calibration").textContent = calibrationText(c.calibration);
  $("s-disk").textContent = s.disk ? `${s.disk.error} (since ${clock(s.disk.since)}); stacking goes on in memory` : "";
  const we = s.watch_error;       // the capture folder gone (its USB disk unplugged)
  $("s-watch").textContent = we ? `${we.error} (since ${clock(we.since)})` : "";
  // an exclude answered 202 ("restacking") and refused after, by the worker: the answer to what the user did, as a
  // refusal answered at once is (post()) — each once —, and its button usable again (no new list redraws it)
  const rf = s.refused;
  if (rf && state.refusedId !== undefined && rf.id !== state.refusedId) {
    message(`${rf.request} refused: ${rf.error}`, true);
    renderTable();
  }
  state.refusedId = rf ? rf.id : null;
  $("paths").textContent = `watching ${s.watch} → ${s.out}`;
  const st = s.stretch || {};
  if (!dragging) {
    for (const k of Object.keys(SLIDERS)) setSlider(k, st[k]);
  }
  showFilters(s);
  showTargets(s);
  showCaption(s);
  showSky(s);
  if (s.has_stack && s.preview_id !== state.previewId) loadPreview(s.preview_id);
  if (!s.has_stack) {
    state.previewId = null;
    if (state.view === null) { $("preview").hidden = true; $("nopreview").hidden = false; }
  }
  // while the daemon starts: what it loads (the stack of the night so far: seconds from a Pi's SD card); the frames
  // are asked for once they are loaded (/api/frames answers 503 meanwhile)
  $("nopreview").textContent = s.starting ? `Starting: ${s.starting}…` : "Waiting for the first stacked frame…";
  if (!s.starting && (s.generation !== state.generation || s.frames !== state.frames.length)) loadFrames(s.generation);
}

// the masters the latest measured frame was calibrated with, and any left out (on_mismatch = "skip")
function calibrationText(cal) {
  if (!cal) return "";
  const used = ["bias", "dark", "flat"].filter((k) => typeof cal[k] === "string").map((k) => `${k} ${cal[k]}`);
  if (cal.dark_scaled) used.push(`dark scaled ×${cal.dark_scaled}`);
  const skipped = ["bias", "dark", "flat"].filter((k) => cal[`${k}_skipped`])
    .map((k) => `no ${k}: ${cal[`${k}_skipped`]}`);
  if (!used.length && !skipped.length) return "";
  return `Calibration: ${used.length ? used.join(", ") : "no master"}${skipped.length ? " — " + skipped.join("; ") : ""}`;
}

function loadPreview(id) {
  state.previewId = id;
  if (state.view !== null) return;          // an archived target is on screen: back to live loads the latest
  showImage(`/api/preview.jpg?id=${id}`, "live stack preview", () => state.previewId === id && state.view === null,
            (el) => { el.dataset.previewId = String(id); delete el.dataset.target; });
}

function showImage(src, alt, stillWanted, mark) {
  // loaded beside the page first: the image on screen changes only once the new one is complete
  const img = new Image();
  img.onload = () => {
    if (!stillWanted()) return;
    const el = $("preview");
    el.src = img.src;
    el.alt = alt;
    mark(el);
    el.hidden = false;
    $("nopreview").hidden = true;
  };
  img.src = src;
}

// a drizzled stack says so, with its grid: "drizzle ×2 (pixfrac 0.7) · 3840×2160"
const gridNote = (g) => (g && g.mode === "drizzle"
  ? ` · drizzle ×${g.scale} (pixfrac ${g.pixfrac}) · ${g.shape[1]}×${g.shape[0]}` : "");

function showCaption(s) {
  const t = viewed(s);
  if (t) {
    $("caption").textContent = `${t.name} · ${plural(t.frames, "frame")} stacked`
      + (t.updated ? ` · updated ${t.updated.slice(0, 16).replace("T", " ")}`
         + (/(Z|\+00:00)$/.test(t.updated) ? " UTC" : "") : "");
    return;
  }
  if (s.starting) { $("caption").textContent = `starting: ${s.starting}…`; return; }
  const name = s.target && ((s.targets || []).length > 1 || s.target.named !== "order") ? `${s.target.name} · ` : "";
  $("caption").textContent = s.has_stack
    ? `${name}${s.stacked} frames · ${duration(s.integration_s)}${gridNote(s.grid)}`
      + `${s.palette && s.palette.name ? ` · ${s.palette.name}` : ""}${s.queued ? ` · ${s.queued} queued` : ""}`
    : (s.queued ? `${s.queued} queued` : "");
}

// ---------------------------------------------------------------- sky: the plate solve of the current target
const SKY_STATES = { solving: "plate solving…", failed: "plate solve failed", off: "plate solving off" };
function showSky(s) {
  const el = $("sky");
  const k = s.sky;
  el.hidden = !k || typeof k !== "object" || state.view !== null;   // it describes the live stack
  if (el.hidden) return;
  const parts = [];
  const add = (text, cls) => {
    const span = document.createElement("span");
    span.textContent = text;
    if (cls) span.className = cls;
    parts.push(span);
  };
  if (k.object) add(k.object, "obj");
  const ra = k.ra_hms || (num(k.ra) ? hms(k.ra) : null), dec = k.dec_dms || (num(k.dec) ? dms(k.dec) : null);
  if (ra && dec) add(radec(ra, dec));
  if (num(k.width_deg) && num(k.height_deg)) {
    const arcmin = Math.max(k.width_deg, k.height_deg) < 1;
    const f = (v) => (arcmin ? `${(v * 60).toFixed(1)}′` : `${v.toFixed(2)}°`);
    add(`${f(k.width_deg)} × ${f(k.height_deg)}`);
  }
  if (num(k.scale_arcsec)) add(`${k.scale_arcsec.toFixed(2)}″/px`);
  // rotation_deg is the position angle of the grid's +y, up in a FITS viewer (row 0 at the bottom); the preview
  // beside this line draws row 0 at the top, its up is -y: 180° more.  (The Seestar's M94 preview, north up and
  // east left, read "rotation 181.3° E of N".)
  if (num(k.rotation_deg)) {
    const up = (((k.rotation_deg + 180) % 360 + 360) % 360).toFixed(1).replace(/^360\.0$/, "0.0");
    add(`rotation ${up}° E of N`);
  }
  // the notes are sentences of their own ("plate solving the reference frame"); a failure says it failed first
  if (k.state === "failed") add(k.note ? `plate solve failed: ${k.note}` : SKY_STATES.failed, "state failed");
  else if (k.state in SKY_STATES) add(k.note || SKY_STATES[k.state], `state ${k.state}`);
  else if (k.source === "header" || k.state === "header") {
    add(k.note ? `from the FITS header (${k.note})` : "from the FITS header", "dim");
  } else {
    if (num(k.seconds)) add(`solved in ${k.seconds.toFixed(1)} s`, "dim");
    // solved despite a hint (a mount not synced, a FOCALLEN the optics no longer have): worth fixing, so in sight
    if (k.note) add(k.note, "note");
  }
  if (!parts.length) add(k.note || String(k.state || "sky: no solution yet"), "dim");
  const label = document.createElement("b");
  label.textContent = "Sky";
  el.replaceChildren(label, ...parts);
}

// ---------------------------------------------------------------- targets: the panel, an archived one on screen
const viewed = (s) => (state.view === null ? null : (s.targets || []).find((t) => t.id === state.view) || null);
// the current target's count in the list lags (saved with stack.fits); the engine's count is the live one
const framesOf = (t, s) => (t.current && num(s.stacked) ? s.stacked : t.frames);
const hasImage = (t, s) => (t.current ? !!s.has_stack : t.frames > 0);
// the thumbnail's query changes with what the image shows: the live preview id, or frames and time of an archive
const targetImage = (t, s) => `/api/targets/${t.id}/preview.jpg?v=${encodeURIComponent(
  t.current ? `p${s.preview_id}` : `${t.frames}-${t.updated || ""}`)}`;
const targetItems = new Map();     // id -> <li>, kept: a thumbnail is fetched again only when its query changes

function showTargets(s) {
  const list = s.targets || [], held = s.held || [];
  if (state.view !== null) {
    const v = list.find((t) => t.id === state.view);
    if (!v || v.current || !hasImage(v, s)) setView(null);          // resumed or gone: live again
    else if ($("preview").dataset.target !== targetImage(v, s)) setView(v.id);
  }
  const panel = $("targets");
  panel.hidden = list.length < 2 && !held.length;
  if (panel.hidden) return;
  $("targets-count").textContent = `(${list.length})`;
  const h = $("held");
  h.hidden = !held.length;
  h.textContent = held.length ? `${plural(held.length, "frame")} held: ${held.length === 1 ? "it does" : "they do"}`
    + ` not register onto ${s.target ? s.target.name : "this target"} — a new target?` : "";
  h.title = held.join("\n");
  const items = list.map((t) => targetItem(t, s));
  const ul = $("targets-list");
  if (items.length !== ul.children.length || items.some((li, i) => ul.children[i] !== li)) ul.replaceChildren(...items);
  for (const id of [...targetItems.keys()]) if (!list.some((t) => t.id === id)) targetItems.delete(id);
}

function targetItem(t, s) {
  let li = targetItems.get(t.id);
  if (!li) {
    li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.className = "target";
    b.dataset.testid = "target";
    const img = document.createElement("img");
    img.alt = "";
    img.onerror = () => { img.removeAttribute("src"); };
    const name = document.createElement("span");
    name.className = "tname";
    const meta = document.createElement("span");
    meta.className = "tmeta";
    b.append(img, name, meta);
    b.onclick = () => {
      const cur = state.status && (state.status.targets || []).find((x) => x.id === t.id);
      if (cur) { setView(cur.current ? null : cur.id); previewInSight(); }
    };
    li.append(b);
    targetItems.set(t.id, li);
  }
  const b = li.firstChild;
  const [img, name, meta] = b.children;
  b.dataset.id = String(t.id);
  b.disabled = !t.current && !hasImage(t, s);
  b.setAttribute("aria-pressed", String(t.current ? state.view === null : state.view === t.id));
  const src = hasImage(t, s) ? targetImage(t, s) : null;
  if (src === null) img.removeAttribute("src");
  else if (img.getAttribute("src") !== src) img.src = src;
  const tags = t.current ? [["current", "current"]] : [["archived", "archived"]];
  if (t.closed) tags.push(["closed", "closed"]);
  name.replaceChildren(t.name, ...tags.map(([text, cls]) => {
    const tag = document.createElement("i");
    tag.className = `tag ${cls}`;
    tag.textContent = text;
    return tag;
  }));
  name.title = t.closed ? `${t.name}: archived by New stack, not resumed by its frames` : t.name;
  const p = Array.isArray(t.pointing) && num(t.pointing[0]) && num(t.pointing[1]) ? t.pointing : null;
  meta.textContent = `${plural(framesOf(t, s), "frame")} stacked` + (p ? ` · ${radec(hms(p[0]), dms(p[1]))}` : "");
  return li;
}

function setView(id) {
  const s = state.status || {};
  const t = id === null ? null : (s.targets || []).find((x) => x.id === id && !x.current) || null;
  state.view = t ? t.id : null;
  $("viewing").hidden = !t;
  $("viewer").classList.toggle("archived", !!t);
  for (const b of document.querySelectorAll("#targets-list .target")) {
    const cur = b.querySelector(".tag.current") !== null;
    b.setAttribute("aria-pressed", String(t ? b.dataset.id === String(t.id) : cur));
  }
  if (t) {
    $("viewing-name").textContent = t.name;
    $("viewing-fits").href = `/api/files/${t.folder.split("/").map(encodeURIComponent).join("/")}/stack.fits`;
    const src = targetImage(t, s);
    $("preview").dataset.target = src;
    showImage(src, `preview of ${t.name} (archived)`, () => state.view === t.id,
              (el) => { delete el.dataset.previewId; });
  } else {
    delete $("preview").dataset.target;
    if (s.has_stack) loadPreview(s.preview_id);
    else { state.previewId = null; $("preview").hidden = true; $("nopreview").hidden = false; }
  }
  showCaption(s);
  showSky(s);
}
$("back-live").onclick = () => setView(null);

// A tap on a target shows its preview: on a phone the preview is far above the list, and the tap seemed to do
// nothing but light the button — the page goes up to the preview (beside the list on a wide screen: stays)
function previewInSight() {
  const wrap = document.querySelector(".viewer-wrap"), bar = document.querySelector("header.bar");
  const top = wrap.getBoundingClientRect().top, under = bar.getBoundingClientRect().bottom;
  if (top >= under - 1 && top < window.innerHeight / 2) return;
  const smooth = !matchMedia("(prefers-reduced-motion: reduce)").matches;
  window.scrollTo({ top: window.scrollY + top - under - 8, behavior: smooth ? "smooth" : "auto" });
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
    if (data.since !== 0 && data.generation !== state.generation) {
      // the log was rewritten (restack, new stack) after the status that asked for records k onward: those
      // are the new log's, not the rest of ours; kept, the list would lack its first k for good
      state.generation = null;
      state.frames = [];
      framesAgain = true;             // read again from 0
      return;
    }
    state.frames = data.since === 0 ? data.frames : state.frames.concat(data.frames);
    state.generation = data.generation;
    renderTable();
    drawPlots();
  } finally {
    framesBusy = false;
    if (framesAgain) { framesAgain = false; loadFrames(state.status ? state.status.generation : null); }
  }
}

// ---------------------------------------------------------------- frames table
// a file name that wraps (a phone) breaks after its "_", "-" and ".", not in the middle of a word
const breakable = (name) => String(name).split(/(?<=[_.-])/)
  .flatMap((part, i) => (i ? [document.createElement("wbr"), part] : [part]));
// the first row the user sees in the Frames table once it is scrolled (null at its top: the newest row then
// appears there, where the user looks for it) and where it is on the screen
function rowInSight(tbody) {
  const wrap = $("frames").parentElement;
  if (wrap.scrollTop <= 0) return null;
  const head = $("frames").tHead.getBoundingClientRect();
  const top = Math.max(wrap.getBoundingClientRect().top, head.bottom);
  for (const tr of tbody.rows) {
    const r = tr.getBoundingClientRect();
    if (r.bottom > top + 1) return { file: tr.dataset.file, top: r.top };
  }
  return null;
}
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
    const classes = ["n", "file", "flt", "st", "fw", "sr", "w", "reason"];
    // the labels the cells wear on a phone, where the row becomes a card (style.css: no column heads there)
    const labels = [null, null, "filter", null, "FWHM", "stars", "weight", null];
    cells.forEach((v, k) => {
      const td = document.createElement("td");
      if (k === 1) td.append(...breakable(v)); else td.textContent = v;
      td.className = classes[k];
      if (labels[k]) td.dataset.label = labels[k];
      if (k === 1) td.title = f.path || f.file;
      tr.appendChild(td);
    });
    const td = document.createElement("td");
    td.className = "act";
    // a rejected or failed frame is not in the stack: nothing to exclude (the API would rebuild the whole stack
    // to the same result — minutes of a night on a Pi, the frames arriving meanwhile waiting)
    if (f.status !== "failed" && f.status !== "rejected") {
      const b = document.createElement("button");
      b.type = "button";
      const excluded = f.status === "excluded";
      b.textContent = excluded ? "include" : "exclude";
      b.dataset.testid = excluded ? "include" : "exclude";
      b.onclick = async () => {
        b.disabled = true;
        // refused (409 during a new stack, 503 stopping) or no answer: the reason is shown, the button usable again
        // (accepted, the table is redrawn when the restack's new list comes)
        if (!await post(excluded ? "/api/include" : "/api/exclude", { file: f.path || f.file })) b.disabled = false;
      };
      td.appendChild(b);
    }
    tr.appendChild(td);
    rows.push(tr);
  }
  const keep = rowInSight(tbody);
  tbody.replaceChildren(...rows);
  if (keep) {
    // the rows the user reads stay where they were: a frame landing added a row above them, and they had moved
    // down one row (a phone's card: 88 px) under the finger about to tap *exclude* — on another frame's button
    const tr = rows.find((r) => r.dataset.file === keep.file);
    if (tr) $("frames").parentElement.scrollTop += tr.getBoundingClientRect().top - keep.top;
  }
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
  const colors = names.length > 1 ? f.map((x) => css(filterColor(names, filterOf(x)))) : null;
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
    { values: unwrapDegrees(col("rotation")), color: css("--c-r") },
  ]);
}

// Rotations as frames.jsonl has them, in (-180°, 180°]: after a meridian flip they sit near ±180° and, drawn
// as they are, zig-zagged a full turn between +179.998° and -179.996° from one frame to the next — a drift plot
// of wild spins for a steady field.  One that is more than 270° from the one before is drawn a whole turn
// nearer it (a flip back, 180° either way, stays as it is).
function unwrapDegrees(values) {
  let last = null;
  return values.map((v) => {
    if (!num(v)) return v;
    const u = last !== null && Math.abs(v - last) > 270 ? v + 360 * Math.round((last - v) / 360) : v;
    last = u;
    return u;
  });
}

// ---------------------------------------------------------------- filters and the colour composite
const FILTER_COLORS = 7;   // --f0 … --f6 in style.css, by order of first appearance (red shades at night)
function filterNames(frames) {
  const seen = (state.status && state.status.filters || []).map((x) => x.filter);
  for (const x of frames) if (x.status !== "failed" && !seen.includes(filterOf(x))) seen.push(filterOf(x));
  return seen;
}
// a frame's filter as its stack is named: "Ha" for a frame of "H-alpha" when both spellings make one stack
function filterOf(frame) {
  const v = frame.filter ?? null;
  const f = (state.status && state.status.filters || []).find((x) => x.filter === v || (x.names || []).includes(v));
  return f ? f.filter : v;
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
      ["last frame", clock(f.last_frame_time, s.last_frame_time), "n"],
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
    if (f.frames > 0 && f.file) {
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

// The palettes as buttons, not a <select>: its list opens in the browser's own colours — white at night, at the
// telescope — and takes two taps.
function showPalette(pal) {
  const box = $("palette");
  const choices = pal.choices || [];
  const auto = `Auto (${pal.requested === "auto" && pal.name ? pal.name : "by filters"})`;
  const sig = JSON.stringify([choices, auto]);
  if (box.dataset.sig !== sig) {
    box.replaceChildren(...choices.map((c) => {
      const b = document.createElement("button");
      b.type = "button";
      b.setAttribute("role", "radio");
      b.dataset.value = c;
      b.textContent = c === "auto" ? auto : c;
      b.addEventListener("click", () => choosePalette(c));
      return b;
    }));
    box.dataset.sig = sig;
  }
  if (!paletteBusy) checkPalette(pal.requested);
}
function checkPalette(value) {
  const box = $("palette");
  box.dataset.value = value;
  for (const b of box.children) b.setAttribute("aria-checked", String(b.dataset.value === value));
}
let paletteBusy = false;
async function choosePalette(value) {
  if (paletteBusy || $("palette").dataset.value === value) return;
  paletteBusy = true;
  checkPalette(value);
  try {
    const r = statusOf(await post("/api/palette", { palette: value }));
    if (r) showStatus(r);
  } finally {
    paletteBusy = false;
    if (state.status) showFilters(state.status);   // a refusal puts the choice back to what the daemon uses
  }
}

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
      const name = document.createElement("span");
      name.className = "wname";
      name.textContent = name.title = filterLabel(f);
      label.append(name, input, out);
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
    const r = statusOf(await post("/api/palette", { weights: cur }));
    for (const [name, v] of sent) if (touchedWeights.get(name) === v) touchedWeights.delete(name);
    if (r) showStatus(r); else if (state.status) showFilters(state.status);
  }, 300);
}
$("weights-reset").onclick = async () => {
  clearTimeout(weightTimer);
  touchedWeights.clear();
  const r = statusOf(await post("/api/palette", { weights: {} }));
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
    let r = null;
    try {
      r = statusOf(await post("/api/stretch", body));
    } finally {
      dragging = false;               // else the sliders would never follow the daemon's stretch again
    }
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
  const r = statusOf(await post("/api/stretch", { auto: true }));
  if (r) showStatus(r);
};

// ---------------------------------------------------------------- other controls
$("pause").onclick = async () => {
  const paused = state.status && state.status.paused;
  const r = await post(paused ? "/api/resume" : "/api/pause");
  if (r) showStatus(r);
};
$("newstack").onclick = async () => {
  if (!await ask("Archive this stack and start a new one? Files already in the capture folder are not used.",
                 { ok: "New stack", danger: true })) return;
  const r = statusOf(await post("/api/new-session"));
  if (r) { message(r.archived ? `previous stack archived in ${r.archived}` : "new stack started"); showStatus(r); }
};
function setNight(on) {
  document.body.classList.toggle("night", on);
  // the browser's toolbar too (Android Chrome, Safari): the page's --bg
  document.querySelector('meta[name="theme-color"]').content = on ? "#000" : "#0b0e13";
}
$("night").onclick = () => {
  setNight(!document.body.classList.contains("night"));
  localStorage.setItem("livestack-night", document.body.classList.contains("night") ? "1" : "");
  drawPlots();
};
if (localStorage.getItem("livestack-night")) setNight(true);
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
    // offline whether the browser connects again by itself (a network error: the daemon restarting) or not
    pill.textContent = "offline"; pill.className = "pill offline";
    if (es.readyState === EventSource.CLOSED) {
      // the browser retries network errors only: an HTTP error (a reverse proxy's 502 while the daemon restarts,
      // the 503 of too many connections) closed the stream for good, the page "offline" until reloaded
      if (state.es === es) setTimeout(() => { if (state.es === es) connect(); }, 3000);
    }
  };
}
connect();
