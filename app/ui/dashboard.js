// The tvforge dashboard: a page of plain JavaScript over the JSON API, with the caller's API key.
// The key lives in this tab's sessionStorage only; a link may carry it once as #...?key=... (then removed).
"use strict";

const KEY_STORAGE = "tvforge-key";
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
const main = document.getElementById("main");
let refreshTimer = null;

function takeKeyFromLink() {
  const [route, query] = location.hash.split("?");
  const key = new URLSearchParams(query || "").get("key");
  if (key) {
    sessionStorage.setItem(KEY_STORAGE, key);
    history.replaceState(null, "", location.pathname + (route || "#/jobs"));
  }
}

class ApiError extends Error {
  constructor(status, problem) {
    super(`${status} ${problem.title || ""}: ${problem.detail || ""}`);
    this.status = status;
  }
}

async function api(path) {
  const response = await fetch(path, { headers: { Authorization: `Bearer ${sessionStorage.getItem(KEY_STORAGE)}` } });
  if (!response.ok) {
    const problem = await response.json().catch(() => ({ title: response.statusText }));
    throw new ApiError(response.status, problem);
  }
  return response.json();
}

async function all(path) {
  let items = [], cursor = null;
  do {
    const page = await api(path + (path.includes("?") ? "&" : "?") + "limit=200" + (cursor ? `&cursor=${cursor}` : ""));
    items = items.concat(page.items);
    cursor = page.next_cursor;
  } while (cursor);
  return items;
}

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined) continue;
    if (name === "onclick") node.addEventListener("click", value);
    else node.setAttribute(name, value);
  }
  for (const child of children.flat()) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  for (const child of children.flat()) node.append(child instanceof Node ? child : String(child));
  return node;
}

const fmt = (v, digits = 3) => (v === null || v === undefined ? "–" : typeof v === "number" ? +v.toFixed(digits) : v);
const pct = (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(1));
const when = (t) => (t ? new Date(t).toLocaleString() : "–");
const status = (s) => h("span", { class: `status ${s}` }, s);
const bar = (fraction) => h("span", { class: "bar" }, h("span", { style: `width:${Math.round(100 * (fraction || 0))}%` }));

function table(id, columns, rows) {
  return h("table", { id },
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", {}, c)))),
    h("tbody", {}, rows));
}

function show(...nodes) {
  main.replaceChildren(...nodes);
}

// -- pages ------------------------------------------------------------------------------------------------

async function jobsPage() {
  const jobs = (await all("/v1/jobs")).reverse();
  const rows = jobs.map((job) => h("tr", { "data-job-id": job.id },
    h("td", {}, h("a", { href: `#/jobs/${job.id}` }, job.id)),
    h("td", {}, job.kind), h("td", {}, job.method || "evaluation"), h("td", {}, status(job.status)),
    h("td", {}, bar(job.progress.fraction), " ", h("span", { class: "muted" }, job.progress.stage || "")),
    h("td", {}, when(job.created_at)), h("td", {}, when(job.finished_at))));
  show(h("h1", {}, "Jobs"),
    jobs.length ? table("jobs-table", ["job", "kind", "method", "status", "progress", "created", "finished"], rows)
      : h("p", { class: "muted" }, "No jobs yet: tvforge merge RECIPE.yaml submits one."));
  if (jobs.some((job) => !FINISHED.has(job.status))) refreshTimer = setTimeout(route, 2000);
}

function shortBlock(name) {
  return name.replace(/^visual\./, "").replace(/^transformer\.resblocks\./, "rb").replace(/in_proj_/, "qkv.")
    .replace(/out_proj/, "out").replace(/\.weight$/, ".w").replace(/\.bias$/, ".b");
}

function colour(value, limit) {
  // Diverging: blue below 0, red above, white at 0; |value| = limit is the full colour.
  const t = Math.max(-1, Math.min(1, value / (limit || 1)));
  const mix = (a, b) => Math.round(255 + (a - 255) * Math.abs(t));
  return t >= 0 ? `rgb(${mix(200)},${mix(60)},${mix(50)})` : `rgb(${mix(40)},${mix(90)},${mix(200)})`;
}

function heatmap(coefficients, vectorNames) {
  const cell = 14, left = 150, top = 130;
  const rows = coefficients.values.length, cols = coefficients.blocks.length;
  const limit = Math.max(1e-9, ...coefficients.values.flat().map(Math.abs));
  const chart = svg("svg", { id: "heatmap", width: left + cols * cell + 10, height: top + rows * cell + 10 });
  coefficients.blocks.forEach((block, j) => {
    const x = left + j * cell + cell / 2;
    chart.append(svg("text", { class: "block-label", transform: `translate(${x},${top - 6}) rotate(-60)` },
      shortBlock(block)));
  });
  coefficients.values.forEach((row, i) => {
    chart.append(svg("text", { class: "vector-label", x: left - 8, y: top + i * cell + cell - 3, "text-anchor": "end" },
      vectorNames[i] || coefficients.task_vectors[i]));
    row.forEach((value, j) => chart.append(svg("rect", {
      class: "cell", x: left + j * cell, y: top + i * cell, width: cell - 1, height: cell - 1, fill: colour(value, limit),
      stroke: "#e3e6ec",
      "data-value": value,
    }, svg("title", {}, `${vectorNames[i]} × ${coefficients.blocks[j]}: ${value.toFixed(4)}`))));
  });
  return h("div", { class: "card", style: "overflow-x:auto" }, chart,
    h("p", { class: "heatmap-legend" }, `${rows} task vectors × ${cols} blocks (${coefficients.granularity}); `,
      `blue < 0 < red, full colour at |λ| = ${limit.toFixed(3)}. Hover a cell for its value.`));
}

function lineChart(id, title, series, epochs) {
  const width = 500, height = 200, pad = 36, legend = 90;
  const values = series.flatMap((s) => s.values).filter((v) => v !== null && v !== undefined);
  const lo = Math.min(...values), hi = Math.max(...values);
  const x = (e) => pad + (e / Math.max(1, epochs[epochs.length - 1])) * (width - 2 * pad - legend);
  const y = (v) => height - pad - ((v - lo) / (hi - lo || 1)) * (height - 2 * pad);
  const chart = svg("svg", { id, width, height },
    svg("text", { x: pad, y: 14 }, title),
    svg("line", { x1: pad, y1: height - pad, x2: width - pad - legend, y2: height - pad, stroke: "#ccc" }),
    svg("text", { x: pad, y: height - 12 }, `epoch 0…${epochs[epochs.length - 1]}`),
    svg("text", { x: 2, y: y(hi) + 4 }, fmt(hi)), svg("text", { x: 2, y: y(lo) + 4 }, fmt(lo)));
  const palette = ["#3559d6", "#c0392b", "#1f8a4c", "#8e44ad", "#d68910", "#16a085", "#7f8c8d", "#2c3e50"];
  series.forEach((s, k) => {
    const points = s.values.map((v, i) => (v === null || v === undefined ? null : `${x(epochs[i])},${y(v)}`))
      .filter(Boolean);
    if (points.length) chart.append(svg("path", { class: "series", d: "M" + points.join("L"), fill: "none",
      stroke: palette[k % palette.length], "stroke-width": 2 }, svg("title", {}, s.name)));
    chart.append(svg("text", { x: width - legend - pad + 8, y: 30 + 14 * k, fill: palette[k % palette.length] }, s.name));
  });
  return chart;
}

function curves(curve, datasetNames) {
  const epochs = curve.epochs.map((e) => e.epoch);
  const names = Object.keys(curve.epochs[0].accuracy || {});
  return h("div", { class: "card", id: "curves" },
    lineChart("loss-curve", "training loss", [{ name: "loss", values: curve.epochs.map((e) => e.loss) }], epochs),
    lineChart("accuracy-curve", "selection accuracy", names.map((n) => ({
      name: datasetNames[n] || n, values: curve.epochs.map((e) => e.accuracy[n]),
    })), epochs));
}

function evaluationTable(evaluation, datasetNames) {
  const rows = Object.entries(evaluation.datasets || {}).map(([id, row]) => h("tr", { "data-dataset-id": id },
    h("td", {}, datasetNames[id] || id), h("td", {}, row.split), h("td", { class: "num" }, row.images),
    h("td", { class: "num" }, pct(row.accuracy)), h("td", { class: "num" }, pct(row.reference_accuracy)),
    h("td", { class: "num" }, pct(row.normalised_accuracy))));
  rows.push(h("tr", {}, h("th", {}, "mean"), h("td"), h("td"), h("td", { class: "num" }, pct(evaluation.mean_accuracy)),
    h("td"), h("td", { class: "num" }, pct(evaluation.mean_normalised_accuracy))));
  return table("evaluation-table", ["dataset", "split", "images", "accuracy %", "reference %", "normalised %"], rows);
}

async function download(path, filename) {
  const response = await fetch(path, { headers: { Authorization: `Bearer ${sessionStorage.getItem(KEY_STORAGE)}` } });
  if (!response.ok) throw new ApiError(response.status, await response.json());
  const link = h("a", { href: URL.createObjectURL(await response.blob()), download: filename });
  link.click();
  URL.revokeObjectURL(link.href);
}

async function jobPage(jobId) {
  const job = await api(`/v1/jobs/${jobId}`);
  const vectors = await Promise.all(job.task_vectors.map((id) => api(`/v1/task-vectors/${id}`).catch(() => ({ id, name: id }))));
  const datasets = Object.fromEntries((await all("/v1/datasets")).map((d) => [d.id, d.name]));
  const vectorNames = vectors.map((v) => v.name);
  const metrics = (job.result && job.result.metrics) || {};
  // An evaluation's request is its params (POST /v1/evaluations' body); a merge's is spread over the job.
  const evaluation = job.kind === "evaluation";
  const recipe = evaluation ? job.params : { method: job.method, base_model_id: job.base_model_id,
    task_vectors: job.task_vectors, params: job.params, seed: job.seed,
    ...(job.start_checkpoint_id ? { start_checkpoint_id: job.start_checkpoint_id } : {}) };
  const parts = [
    h("h1", {}, `Job ${job.id} `, status(job.status)),
    h("div", { class: "card grid", id: "job-summary" },
      h("span", { class: "muted" }, "method"), h("span", {}, job.method || "evaluation"),
      h("span", { class: "muted" }, "progress"), h("span", {}, bar(job.progress.fraction), " ",
        `${Math.round(100 * job.progress.fraction)}% ${job.progress.stage || ""}`,
        job.progress.total ? ` (${job.progress.step}/${job.progress.total})` : ""),
      h("span", { class: "muted" }, evaluation ? "reference task vectors" : "task vectors"),
      h("span", {}, vectorNames.join(", ") || "-"),
      ...(job.start_checkpoint_id ? [h("span", { class: "muted" }, "merged onto"),
        h("span", { id: "job-start" }, job.start_checkpoint_id)] : []),
      h("span", { class: "muted" }, "created / started / finished"),
      h("span", {}, `${when(job.created_at)} / ${when(job.started_at)} / ${when(job.finished_at)}`),
      h("span", { class: "muted" }, "attempts"), h("span", {}, job.attempts)),
  ];
  if (job.error) parts.push(h("p", { class: "error", id: "job-error" }, `${job.error.title}: ${job.error.detail}`));
  if (job.result && job.result.checkpoint_id) {
    const checkpointId = job.result.checkpoint_id;
    // The job keeps naming a checkpoint its owner deleted: say so instead of offering a download that 404s.
    const checkpoint = await api(`/v1/checkpoints/${checkpointId}`).catch((error) => {
      if (error.status === 404) return null;
      throw error;
    });
    const note = h("span", { class: "error", id: "download-error" });
    const fetchIt = () => download(`/v1/checkpoints/${checkpointId}/download`, `${job.id}.safetensors`)
      .then(() => { note.textContent = ""; })
      .catch((error) => { note.textContent = ` Download failed: ${error.message}`; });
    parts.push(checkpoint
      ? h("p", {}, h("button", { class: "primary", id: "download", onclick: fetchIt },
        `Download checkpoint ${checkpointId}`), note)
      : h("p", { class: "muted", id: "checkpoint-deleted" }, `Checkpoint ${checkpointId} was deleted.`));
  }
  // Results first (accuracy, coefficients, curves), then how they were chosen, then the request itself.
  if (metrics.evaluation) parts.push(h("h2", {}, "Accuracy per task"), evaluationTable(metrics.evaluation, datasets));
  if (job.method === "atlas" && job.status === "succeeded") {
    const [coefficients, curve] = await Promise.all([api(`/v1/jobs/${job.id}/coefficients`),
      api(`/v1/jobs/${job.id}/learning-curve`)]);
    parts.push(h("h2", {}, "Learned coefficients"), heatmap(coefficients, vectorNames),
      h("h2", {}, "Training"), curves(curve, datasets));
  }
  const names = { ...datasets, ...Object.fromEntries(vectors.map((v) => [v.id, v.name])) };
  const readable = (value) => JSON.stringify(value, (_k, v) => (typeof v === "string" && names[v] ? names[v] : v))
    .replace(/"([^"]+)":/g, (_m, k) => `"${names[k] || k}":`);
  if (metrics.chosen) {
    parts.push(h("h2", {}, "Chosen values"), table("chosen-table", ["name", "value", "source"],
      Object.entries(metrics.chosen).map(([name, c]) => h("tr", {}, h("td", {}, name),
        h("td", { class: "value" }, readable(c.value)), h("td", { class: "muted" }, c.source)))));
  }
  parts.push(h("h2", {}, "Recipe"), h("pre", { id: "recipe" }, JSON.stringify(recipe, null, 2)));
  const other = Object.fromEntries(Object.entries(metrics).filter(([k]) => !["chosen", "evaluation"].includes(k)));
  if (Object.keys(other).length) parts.push(h("h2", {}, "Other metrics"), h("pre", {}, JSON.stringify(other, null, 2)));
  show(...parts);
  if (!FINISHED.has(job.status)) refreshTimer = setTimeout(route, 1000);
}

async function listPage(title, path, columns) {
  const rows = (await all(path)).reverse().map((row) => h("tr", { "data-id": row.id },
    columns.map(([key, render]) => h("td", {}, render ? render(row[key], row) : fmt(row[key])))));
  show(h("h1", {}, title), table(`${path.split("/").pop()}-table`, columns.map(([key]) => key), rows));
}

const mib = (bytes) => `${(bytes / 2 ** 20).toFixed(1)} MiB`;
const PAGES = {
  models: () => listPage("Base models", "/v1/base-models", [["id"], ["name"], ["architecture", (v, r) => v || "config"],
    ["parameter_count"], ["size_bytes", mib], ["created_at", when]]),
  vectors: () => listPage("Task vectors", "/v1/task-vectors", [["id"], ["name"], ["base_model_id"], ["source_kind"],
    ["l2_norm"], ["lora_rank", (v) => (v == null ? "dense" : `LoRA r ${v}`)], ["size_bytes", mib],
    ["created_at", when]]),
  datasets: () => listPage("Datasets", "/v1/datasets", [["id"], ["name"], ["labeled"],
    ["class_names", (v) => (v ? `${v.length} classes` : "–")], ["splits", (v) => Object.entries(v || {})
      .map(([name, split]) => `${name} ${split.count}`).join(", ")], ["created_at", when]]),
};

function login(message) {
  document.getElementById("signout").hidden = true;
  show(document.getElementById("login").content.cloneNode(true));
  document.getElementById("login-error").textContent = message || "";
  document.getElementById("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, document.getElementById("key").value.trim());
    route();
  });
}

async function route() {
  clearTimeout(refreshTimer);
  if (!sessionStorage.getItem(KEY_STORAGE)) return login();
  document.getElementById("signout").hidden = false;
  const [, page = "jobs", id] = location.hash.split("?")[0].split("/");
  try {
    if (page === "jobs" && id) await jobPage(id);
    else if (PAGES[page]) await PAGES[page]();
    else await jobsPage();
  } catch (error) {
    if (error.status === 401) {
      sessionStorage.removeItem(KEY_STORAGE);
      return login("That key was refused (unknown, revoked or expired).");
    }
    show(h("p", { class: "error", id: "page-error" }, error.message));
  }
}

document.getElementById("signout").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORAGE);
  route();
});
window.addEventListener("hashchange", () => { takeKeyFromLink(); route(); });
takeKeyFromLink();
route();
