// The operator review page: plain JavaScript, no framework, no build step (served by edge_runtime/review/server.py).
// Text from the database is only ever set as textContent, never parsed as HTML.
"use strict";

const PAGE = 100;
// Reviews are queued: each key (or click) is taken for the image shown when it was pressed, the page moves on at
// once, and the queue sends them to the server one at a time, in order. Nothing pressed is dropped: a review the
// server refuses (409: reviewed meanwhile, or an error) is said in the status line and its image shown again.
const page = {meta: null, items: [], total: 0, index: 0, pending: [], sending: false};
const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function fmt(x, digits = 3) {
  return x === null || x === undefined ? "n/a" : Number(x).toFixed(digits);
}

function status(text, kind = "") {
  const s = $("status");
  s.textContent = text;
  s.className = kind;
}

async function api(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    return {status: 0, ok: false, body: {error: "the review server cannot be reached"}};
  }
  let body = null;
  try { body = await response.json(); } catch (e) { body = {error: `HTTP ${response.status}`}; }
  return {status: response.status, ok: response.ok, body};
}

function filters() {
  const q = new URLSearchParams();
  q.set("state", $("f-state").value);
  for (const [key, id] of [["label", "f-label"], ["from", "f-from"], ["to", "f-to"]]) {
    if ($(id).value) q.set(key, $(id).value);
  }
  return q;
}

// -- the queue ---------------------------------------------------------------------------------------------
async function loadQueue(append = false) {
  const q = filters();
  q.set("limit", PAGE);
  q.set("offset", append ? page.items.length : 0);
  const r = await api(`/api/queue?${q}`);
  if (!r.ok) { status(r.body.error, "error"); return; }
  page.items = append ? page.items.concat(r.body.items) : r.body.items;
  page.total = r.body.total;
  if (!append) page.index = 0;
  renderQueue();
  select(Math.min(page.index, Math.max(page.items.length - 1, 0)));
}

function queueLine(item) {
  const li = el("li", null, `state-${item.state}${item.flagged ? " flagged" : ""}${item.queued ? " queued" : ""}`);
  li.dataset.id = item.id;
  li.append(el("span", `#${item.id}`, "id"), el("span", item.name, "name"), el("span", item.label, "label"),
            el("span", `P ${fmt(item.stage1_score, 2)}`, "score"));
  const flag = el("span", item.flagged ? "\u2691" : "", "flag");
  if (item.flagged) flag.title = "flagged for review (Stage 2 unsure)";
  li.append(flag);
  li.addEventListener("click", () => select(page.items.findIndex((i) => i.id === item.id)));
  return li;
}

function renderQueue() {
  const ol = $("queue");
  ol.replaceChildren(...page.items.map(queueLine));
  $("queue-count").textContent = `${page.total.toLocaleString("en")} in this view`;
  $("more").hidden = page.items.length >= page.total;
}

function select(i) {
  page.index = i;
  document.querySelectorAll("#queue li").forEach((li, k) => li.classList.toggle("current", k === i));
  const current = document.querySelector("#queue li.current");
  if (current) current.scrollIntoView({block: "nearest"});
  renderDetail(page.items[i]);
}

// -- one image ---------------------------------------------------------------------------------------------
function renderDetail(item) {
  $("empty").hidden = Boolean(item);
  $("figure").hidden = !item;
  $("actions").hidden = !item;
  const facts = $("facts");
  facts.replaceChildren();
  if (!item) { document.body.dataset.current = ""; markReady(); return; }
  document.body.dataset.current = item.id;
  const img = $("image");
  img.onload = img.onerror = markReady;
  img.alt = item.name;
  img.src = `/api/results/${item.id}/image`;
  $("caption").textContent = `#${item.id} ${item.name} · recorded ${item.recorded_at.slice(0, 19).replace("T", " ")} UTC`;

  const add = (term, ...values) => {
    facts.append(el("dt", term));
    const dd = el("dd");
    dd.append(...values.map((v) => (v instanceof Node ? v : el("span", v))));
    facts.append(dd);
  };
  add("label", el("strong", item.label, "label"),
      item.label !== item.model_label ? ` (model: ${item.model_label})` : " (model's)");
  add("Stage 1", `P(defective) ${fmt(item.stage1_score)}`,
      item.threshold === null ? " · threshold unknown (recorded before provenance)"
                              : ` · threshold ${fmt(item.threshold)} · margin ${fmt(item.margin)}`);
  const top = el("ol", null, "top3");
  for (const [cls, p] of item.top3) {
    const li = el("li");
    const track = el("span", null, "track");
    const bar = el("span", null, "bar");
    bar.style.width = `${Math.round(p * 100)}%`;
    track.append(bar);
    li.append(el("span", cls, "cls"), track, el("span", fmt(p), "p"));
    top.append(li);
  }
  add("Stage 2", item.top3.length ? top : "not run (Stage 1 called it clean)",
      item.top3_complete ? "" : " (top-1 only: recorded before Stage-2 probabilities were kept)",
      item.flagged ? el("span", " flagged for review", "flag") : "");
  add("review", item.review
    ? `${item.state}: ${item.review.old_label} → ${item.review.new_label} by ${item.review.reviewer} at ` +
      `${item.review.reviewed_at.slice(0, 19).replace("T", " ")} UTC`
    : "not reviewed yet");
  add("model", item.bundle_id ? `bundle ${item.bundle_id.slice(0, 12)} (${item.variant})` : "unknown (before provenance)");
  for (const s of item.shadow || []) {
    add("candidate", `bundle ${s.candidate_id.slice(0, 12)}: `,
        s.error ? el("span", `failed: ${s.error}`, "flag")
                : el("strong", `${s.label} (P(defective) ${fmt(s.stage1_score)}, confidence ${fmt(s.confidence)})`,
                     s.agree ? "agree" : "disagree"),
        s.error ? "" : (s.agree ? " · agrees" : " · differs from the model"), " (shadow run: not the result)");
  }
  if (item.queued) add("queued", `${item.queued} review(s) of this image waiting to be sent`);
  document.querySelectorAll("#actions button").forEach((b) => {
    b.classList.toggle("is-current", b.dataset.label === item.label);
  });
}

function markReady() {
  if (!document.body.dataset.ready) {
    window.reviewReadyMs = performance.now();
    document.body.dataset.ready = "1";
  }
}

// -- reviewing ---------------------------------------------------------------------------------------------
function operator() {
  const name = $("operator").value.trim();
  return name || page.meta.operator || "";
}

function review(label) {
  const item = page.items[page.index];
  if (!item) return;
  if (!operator()) {
    status("Enter your name in Operator first.", "error");
    $("operator").focus();
    return;
  }
  // The image shown now, and the review its page showed (a second key on it follows the first one's review).
  const queuedBefore = page.pending.some((job) => job.id === item.id);
  page.pending.push({id: item.id, label, reviewer: operator(), expected: item.review ? item.review.id : 0,
                     follows: queuedBefore});
  item.queued = (item.queued || 0) + 1;   // marked on its queue line until stored; the status line says what the server answered
  renderQueue();
  select(Math.min(page.index + 1, page.items.length - 1));
  send();
}

function indexOf(id) { return page.items.findIndex((i) => i.id === id); }

async function send() {
  if (page.sending) return;
  page.sending = true;
  try {
    while (page.pending.length) {
      const job = page.pending[0];
      const at = indexOf(job.id);
      if (job.follows && at >= 0 && page.items[at].review) job.expected = page.items[at].review.id;
      const r = await api(`/api/results/${job.id}/reviews`, {
        method: "POST",
        headers: {"Content-Type": "application/json"},
        body: JSON.stringify({label: job.label, reviewer: job.reviewer, expected_review_id: job.expected}),
      });
      page.pending.shift();
      saved(job, r);
    }
  } finally {
    page.sending = false;
  }
}

function saved(job, r) {
  const shownId = page.items[page.index] ? page.items[page.index].id : null;
  const at = indexOf(job.id);
  if (at >= 0) page.items[at].queued = Math.max((page.items[at].queued || 1) - 1, 0);
  if (r.status === 201) {
    const saved = r.body.review;
    const item = Object.assign(r.body.item, {queued: at >= 0 ? page.items[at].queued : 0});
    status(`#${job.id}: ${saved.old_label} → ${saved.new_label} saved (${item.state})`, "ok");
    const stays = $("f-state").value === "all" || $("f-state").value === item.state ||
                  ($("f-state").value === "reviewed");
    const labelOk = !$("f-label").value || $("f-label").value === item.label;
    if (at >= 0) {
      if ((stays && labelOk) || item.queued) page.items[at] = item;
      else { page.items.splice(at, 1); page.total -= 1; }
    }
    renderQueue();
    if (page.items.length === 0 && page.total > 0) { loadQueue(); return; }
    const keep = shownId === null ? -1 : indexOf(shownId);
    select(keep >= 0 ? keep : Math.min(page.index, page.items.length - 1));
    loadSummary();
    return;
  }
  // Refused: the keys queued after it for the same image are not sent either (they followed this review).
  const later = page.pending.filter((j) => j.id === job.id).length;
  page.pending = page.pending.filter((j) => j.id !== job.id);
  if (at >= 0) page.items[at].queued = 0;
  const notSent = later ? ` (${later} later key(s) for it not sent)` : "";
  if (r.status === 409) {
    if (at >= 0) page.items[at] = Object.assign(r.body.item, {queued: 0});
    renderQueue();
    if (at >= 0) select(at);             // refused: its image again, for the operator to decide
    const c = r.body.current;
    status(`#${job.id} was reviewed meanwhile${c ? ` by ${c.reviewer} (now ${c.new_label})` : ""}; ` +
           `nothing saved${notSent}. Press again to override.`, "error");
  } else {
    renderQueue();
    if (at >= 0) select(at);
    status(`#${job.id}: ${job.label} not saved: ${r.body.error}${notSent}`, "error");
  }
}

function buildActions() {
  const box = $("actions");
  page.meta.taxonomy.forEach((label, k) => {
    const b = el("button", null);
    b.type = "button";
    b.dataset.label = label;
    b.append(el("kbd", String(k + 1)), ` ${label}`);
    b.addEventListener("click", () => review(label));
    box.append(b);
  });
  const confirm = el("button", null, "confirm");
  confirm.type = "button";
  confirm.append(el("kbd", "Enter"), " confirm");
  confirm.addEventListener("click", () => { const i = page.items[page.index]; if (i) review(i.label); });
  const unusable = el("button", null, "unusable");
  unusable.type = "button";
  unusable.dataset.label = "unusable";
  unusable.append(el("kbd", "0"), " unusable");
  unusable.addEventListener("click", () => review("unusable"));
  box.append(confirm, unusable);
}

function onKey(e) {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (["INPUT", "SELECT", "TEXTAREA"].includes(e.target.tagName)) {
    if (e.key === "Escape") e.target.blur();
    return;
  }
  const taxonomy = page.meta.taxonomy;
  const n = Number(e.key);
  let handled = true;
  if (/^[1-9]$/.test(e.key) && n <= taxonomy.length) review(taxonomy[n - 1]);
  else if (e.key === "0" || e.key === "u") review("unusable");
  else if (e.key === "Enter" || e.key === "y") { const i = page.items[page.index]; if (i) review(i.label); }
  else if (e.key === "j" || e.key === "ArrowDown" || e.key === "ArrowRight") select(Math.min(page.index + 1, page.items.length - 1));
  else if (e.key === "k" || e.key === "ArrowUp" || e.key === "ArrowLeft") select(Math.max(page.index - 1, 0));
  else handled = false;
  if (handled) e.preventDefault();
}

// -- the summary -------------------------------------------------------------------------------------------
async function loadSummary() {
  const conflicts = loadConflicts();
  const r = await api("/api/summary");
  if (!r.ok) { status(r.body.error, "error"); return; }
  const s = r.body;
  $("states").textContent = `${s.results.toLocaleString("en")} results, ${s.flagged.toLocaleString("en")} flagged · ` +
    Object.entries(s.states).map(([k, v]) => `${k} ${v.toLocaleString("en")}`).join(" · ");
  const body = document.querySelector("#per-label tbody");
  body.replaceChildren(...Object.entries(s.per_label).map(([label, c]) => {
    const tr = el("tr");
    tr.append(el("th", label), ...["model", "current", "reviewed", "confirmed", "corrected_from", "corrected_to"]
      .map((k) => el("td", c[k].toLocaleString("en"))));
    return tr;
  }));
  $("corrections").replaceChildren(...(s.corrections.length
    ? s.corrections.map((c) => el("li", `${c.from} → ${c.to}: ${c.count}`))
    : [el("li", "none yet")]));
  document.querySelector("#bundles tbody").replaceChildren(...Object.entries(s.bundles).map(([id, b]) => {
    const tr = el("tr");
    tr.append(el("td", id === "unknown" ? "unknown" : id.slice(0, 12)), el("td", b.results.toLocaleString("en")),
              el("td", b.reviewed.toLocaleString("en")),
              el("td", b.model_accuracy === null ? "–" : `${(b.model_accuracy * 100).toFixed(1)} %`));
    return tr;
  }));
  await conflicts;
}

// -- reviews that disagree: the same image under two classes, left out of export and adaptation -----------
function when(ts) { return `${ts.slice(0, 19).replace("T", " ")} UTC`; }

async function loadConflicts() {
  const r = await api("/api/conflicts");
  if (!r.ok) { status(r.body.error, "error"); return; }
  const list = r.body.conflicts;
  $("conflicts-pane").hidden = list.length === 0;
  $("conflicts").replaceChildren(...list.map((c) => {
    const li = el("li");
    li.append(el("span", `sha256 ${c.sha256.slice(0, 16)}`, "sha"));
    const copies = el("ul");
    for (const item of c.items) {
      const link = el("a", `#${item.id} ${item.label}`, "label");
      link.href = `#result-${item.id}`;
      link.dataset.id = item.id;
      link.addEventListener("click", (e) => { e.preventDefault(); showResult(item.id); });
      const line = el("li");
      line.append(link, ` ${item.name} · ${item.reviewer}, ${when(item.reviewed_at)}`);
      copies.append(line);
    }
    li.append(copies);
    return li;
  }));
  document.body.dataset.conflicts = String(list.length);
}

// One result shown for review, even when the filters leave it out of the queue (a conflict's link): it is put
// in the queue where the operator is, and leaves it again once reviewed, as any item that no longer matches.
async function showResult(id) {
  if (indexOf(id) < 0) {
    const r = await api(`/api/results/${id}`);
    if (!r.ok) { status(r.body.error, "error"); return; }
    if (indexOf(id) < 0) {
      page.items.splice(Math.max(page.index, 0), 0, r.body);
      page.total += 1;
      renderQueue();
    }
  }
  select(indexOf(id));
}

// -- start -------------------------------------------------------------------------------------------------
async function start() {
  const r = await api("/api/meta");
  if (!r.ok) { status(r.body.error, "error"); return; }
  page.meta = r.body;
  for (const s of page.meta.states) $("f-state").append(new Option(s, s, s === "unreviewed", s === "unreviewed"));
  for (const l of page.meta.labels) $("f-label").append(new Option(l, l));
  const name = $("operator");
  name.value = localStorage.getItem("sem-inspect.operator") || page.meta.operator || "";
  name.addEventListener("input", () => localStorage.setItem("sem-inspect.operator", name.value.trim()));
  for (const id of ["f-state", "f-label", "f-from", "f-to"]) $(id).addEventListener("change", () => loadQueue());
  $("more").addEventListener("click", () => loadQueue(true));
  buildActions();
  document.addEventListener("keydown", onKey);
  await Promise.all([loadQueue(), loadSummary()]);
  const linked = /^#result-([1-9][0-9]*)$/.exec(location.hash);
  if (linked) await showResult(Number(linked[1]));
}

start();
