// The attention viewer: uses only the service's public API (/v1/model, /v1/predict, /v1/predictions/...).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { prediction: null, layer: "combined", head: null, heads: {}, pointing: { layers: [] } };
const pct = (p) => (100 * p).toFixed(1) + "%";

function apiKey() {
  return $("key").value.trim();
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: "Bearer " + key } : {};
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try {
      const body = await response.json();
      if (body.error) message = body.error + " (" + response.status + ")";
    } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function bars(list, rows) {
  list.replaceChildren(...rows.map(([name, value]) => {
    const li = document.createElement("li");
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = name;
    label.title = name;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = pct(Math.max(0, Math.min(1, value)));
    fill.style.display = "block";
    track.append(fill);
    const number = document.createElement("span");
    number.className = "value";
    number.textContent = pct(value);
    li.append(label, track, number);
    return li;
  }));
}

// "combined" first, then the attended layers in order (object keys would put "0", "1", ... first)
function mapNames() {
  const names = Object.keys(state.prediction.attention_urls).filter((n) => n !== "combined");
  return ["combined", ...names.sort((a, b) => Number(a) - Number(b))];
}

// The overlay URL for a map: the prediction's own URL plus the viewer's controls as query parameters.
function overlayUrl(layer, head, maxSize) {
  const base = state.prediction.attention_urls[layer];
  const url = new URL(base, location.href);
  url.searchParams.set("colormap", $("colormap").value);
  url.searchParams.set("alpha", $("alpha").value);
  if ($("heatmap").checked) url.searchParams.set("mode", "heatmap");
  if (head !== null) url.searchParams.set("head", head);
  if (maxSize) url.searchParams.set("max_size", maxSize);
  return url.href;
}

// <img> cannot send a bearer token: with a key, the image is fetched and shown from a blob, unless the
// service signed the prediction's URLs (WARN_SIGNED_URLS), which open it without the key.
async function show(img, url) {
  img.dataset.src = url;
  if (!apiKey() || new URL(url).searchParams.has("signature")) {
    img.src = url;
    return;
  }
  const blob = await (await api(url)).blob();
  if (img.dataset.src !== url) return; // a newer choice replaced this one
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(blob);
}

// Tab text: a layer's Pointing Game, where the model's metadata has it, says whether its map can be trusted
function mapLabel(name) {
  const pg = name === "combined" ? state.pointing.combined : state.pointing.layers[Number(name)];
  const text = name === "combined" ? "combined" : "layer " + name;
  return pg === null || pg === undefined ? text : text + " · " + Math.round(100 * pg) + "% on target";
}

function mapName(layer, head) {
  const where = layer === "combined" ? "combined (layers mixed by the global gates)" : "attention layer " + layer;
  return head === null ? where : where + ", head " + head;
}

function tabs(container, items, selected, onPick) {
  container.replaceChildren(...items.map(([value, text]) => {
    const b = document.createElement("button");
    b.type = "button";
    b.role = "tab";
    b.textContent = text;
    b.dataset.value = value;
    b.setAttribute("aria-selected", String(value === selected));
    b.addEventListener("click", () => onPick(value));
    return b;
  }));
}

function renderMap() {
  const { layer, head } = state;
  const layerItems = mapNames().map((name) => [name, mapLabel(name)]);
  tabs($("layers"), layerItems, layer, (v) => { state.layer = v; state.head = null; renderMap(); });
  const headCount = layer === "combined" ? 0 : state.heads[layer] || 0;
  const headItems = headCount ? [["all", "all heads"], ...[...Array(headCount).keys()].map((k) => [String(k), "head " + k])] : [];
  tabs($("heads"), headItems, head === null ? "all" : String(head), (v) => { state.head = v === "all" ? null : Number(v); renderMap(); });
  $("caption").textContent = mapName(layer, head);
  show($("overlay"), overlayUrl(layer, head, 768)).catch((e) => setStatus("overlay: " + e.message, true));
  for (const b of $("grid").children) b.classList.toggle("current", b.dataset.layer === layer && b.dataset.head === String(head));
}

function renderGrid() {
  const cells = [];
  for (const layer of mapNames()) {
    const heads = layer === "combined" ? [null] : [null, ...Array(state.heads[layer] || 0).keys()];
    for (const head of heads) cells.push([layer, head]);
  }
  $("grid").replaceChildren(...cells.map(([layer, head]) => {
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.layer = layer;
    b.dataset.head = String(head);
    b.title = mapName(layer, head);
    const img = document.createElement("img");
    img.alt = b.title;
    img.loading = "lazy";
    const label = document.createElement("span");
    label.textContent = layer === "combined" ? "combined" : "L" + layer + (head === null ? "" : " h" + head);
    b.append(img, label);
    b.addEventListener("click", () => { state.layer = layer; state.head = head; renderMap(); });
    show(img, overlayUrl(layer, head, 160)).catch(() => {});
    return b;
  }));
}

function render(p) {
  state.prediction = p;
  state.layer = "combined";
  state.head = null;
  state.heads = {};
  for (const l of p.layers) if (l.gates) state.heads[String(l.index)] = l.gates.length;
  $("result").hidden = false;
  const top = p.top_k[0];
  $("top").dataset.label = top.label;
  bars($("top"), p.top_k.map((c) => [c.label, c.probability]));
  bars($("global"), p.layers.map((l) => [l.name, l.global_gate]));
  $("gates").replaceChildren(...p.layers.filter((l) => l.gates).map((l) => {
    const div = document.createElement("div");
    div.className = "layer-gates";
    const h = document.createElement("h3");
    h.textContent = l.name + " (stride " + l.stride + "): says " + l.top_class.label + " at " + pct(l.top_class.probability);
    const ol = document.createElement("ol");
    ol.className = "bars";
    bars(ol, l.gates.map((g, k) => ["head " + k, g]));
    div.append(h, ol);
    return div;
  }));
  $("timing").textContent = p.timings_ms ? "server time " + p.timings_ms.total_ms.toFixed(1) + " ms · id " + p.id : "id " + p.id;
  $("maps").hidden = !p.attention_urls; // none where the service could not keep the prediction
  if (!p.attention_urls) {
    setStatus("Prediction: " + top.label + " (" + pct(top.probability) + "). " + (p.warnings || []).join(" "), true);
    return;
  }
  setStatus("Prediction: " + top.label + " (" + pct(top.probability) + ")");
  renderGrid();
  renderMap();
}

async function predictFile(file) {
  if (!file) return;
  setStatus("Classifying " + file.name + "…");
  try {
    const body = new FormData();
    body.append("file", file);
    render(await (await api("v1/predict", { method: "POST", body })).json());
  } catch (e) {
    setStatus(e.message, true);
  }
}

// A signed URL's expires and signature (WARN_SIGNED_URLS) open its prediction without the key.
function signedQuery(text) {
  try {
    const pasted = new URL(text.trim(), location.href).searchParams;
    if (!pasted.has("signature")) return "";
    return "?" + new URLSearchParams({ expires: pasted.get("expires") || "", signature: pasted.get("signature") });
  } catch (_) {
    return "";
  }
}

async function openUrl(text) {
  const match = /\/v1\/predictions\/([0-9a-f]{8,64})/i.exec(text) || /^([0-9a-f]{32})$/i.exec(text.trim());
  if (!match) {
    setStatus("That is not a prediction URL (…/v1/predictions/<id>…) or id.", true);
    return;
  }
  setStatus("Opening prediction " + match[1] + "…");
  try {
    render(await (await api("v1/predictions/" + match[1] + signedQuery(text))).json());
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function loadModel() {
  try {
    const m = await (await api("v1/model")).json();
    state.pointing = m.pointing_game;
    $("model").textContent = m.name + " v" + m.version + " · " + m.classes.length + " classes · " +
      m.input_size.width + "x" + m.input_size.height + " · " + m.providers[0];
  } catch (e) {
    $("model").textContent = "model: " + e.message;
    if (/401/.test(e.message)) $("auth").open = true;
  }
}

$("key").value = sessionStorage.getItem("warn-api-key") || "";
function keyChanged() {
  sessionStorage.setItem("warn-api-key", apiKey());
  loadModel();
}
$("key").addEventListener("change", keyChanged);
$("key-form").addEventListener("submit", (e) => { e.preventDefault(); keyChanged(); });
$("file").addEventListener("change", (e) => predictFile(e.target.files[0]));
$("by-url").addEventListener("submit", (e) => { e.preventDefault(); openUrl($("url").value); });
for (const id of ["colormap", "alpha", "heatmap"]) {
  $(id).addEventListener("change", () => { if (state.prediction) { renderGrid(); renderMap(); } });
}
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); predictFile(e.dataTransfer.files[0]); });
loadModel();
