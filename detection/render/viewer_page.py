"""The viewer's page: HTML, CSS and the JavaScript that upsamples grid-resolution maps with the
geometry of `detection.attention.maps.cells_to_image` (cell centres, crop, resize) on a canvas.
"""
from __future__ import annotations

import html
import json
from typing import Any

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 8px}.bar{display:flex;flex-wrap:wrap;gap:12px;align-items:center;margin:8px 0}
.bar label{font-size:14px}.main{display:flex;gap:16px;align-items:flex-start;flex-wrap:wrap}
.stage{position:relative;display:inline-block;line-height:0;border:1px solid #ccc;background:#fff}
.stage svg{position:absolute;left:0;top:0}.stage canvas{display:block}
svg rect.box{fill:transparent;stroke-width:2;cursor:pointer;pointer-events:all}
svg rect.box.selected{stroke-width:4}.pointmode svg rect.box{pointer-events:none}.pointmode{cursor:crosshair}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:2px 6px;text-align:left}
tr.det{cursor:pointer}tr.det.selected{background:#ffe9a8}tr.det.nomap{color:#999}
.enc{display:flex;gap:16px;flex-wrap:wrap}figure{margin:0}
figcaption{font-size:13px;line-height:1.4;max-width:480px}.help{font-size:12px;color:#666;margin-bottom:8px}.note{color:#a04000;font-size:13px}
.swatch{display:inline-block;width:10px;height:10px;margin-right:4px;border:1px solid #888}
"""

_BODY = """
<h1 id="title"></h1>
<div class="bar">
 <button id="prev-image" title="previous image (up arrow)">&#9650;</button>
 <label>image <select id="image-select"></select></label>
 <button id="next-image" title="next image (down arrow)">&#9660;</button>
 <label id="method-label">method <select id="method-select"></select></label>
 <label id="layer-label">layer <select id="layer-select"></select></label>
 <label id="head-label">head <select id="head-select"></select></label>
 <label>opacity <input id="opacity" type="range" min="0" max="1" step="0.05"></label>
 <label id="mode-label"><input id="point-mode" type="checkbox"> click a point: encoder self-attention</label>
</div>
<div class="help">Keys: &larr;/&rarr; detection, &uarr;/&darr; image, l/L layer, h/H head, m method,
 +/&minus; opacity, p point mode, Esc clear point. Hover a box or row to preview its map, click to select.
 The view is in the address (#image=&hellip;&amp;det=&hellip;): copy the link to share it.</div>
<div class="main">
 <figure><div class="stage" id="stage"><canvas id="map-canvas"></canvas><svg id="boxes"></svg></div>
 <figcaption id="caption"></figcaption></figure>
 <div class="enc" id="encoder">
  <figure><div class="stage"><canvas id="enc-out"></canvas><svg id="enc-out-svg"></svg></div>
  <figcaption>encoder, outgoing: where the clicked cell looks (its row)</figcaption></figure>
  <figure><div class="stage"><canvas id="enc-in"></canvas><svg id="enc-in-svg"></svg></div>
  <figcaption>encoder, incoming: which cells look at it (its column)</figcaption></figure>
 </div>
 <div><table id="det-table"><thead><tr><th>#</th><th>class</th><th>score</th><th>query</th></tr></thead>
 <tbody></tbody></table><p class="note" id="notes"></p></div>
</div>
"""

_JS = r"""
(function () {
"use strict";
const DATA = JSON.parse(document.getElementById("viewer-data").textContent);
const $ = (id) => document.getElementById(id);
const SVGNS = "http://www.w3.org/2000/svg";
let state = {image: 0, det: 0, method: null, layer: null, head: "mean", opacity: 0.6, point: null};
let hoverDet = null, pointMode = false, shownEncoder = null;
const cache = new Map();

function half(bits) {
  const sign = bits & 0x8000 ? -1 : 1, exponent = (bits >> 10) & 0x1f, fraction = bits & 0x3ff;
  if (exponent === 0) return sign * Math.pow(2, -14) * (fraction / 1024);
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * Math.pow(2, exponent - 15) * (1 + fraction / 1024);
}
function float16(b64) {
  const bin = atob(b64), out = new Float32Array(bin.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = half(bin.charCodeAt(2 * i) | (bin.charCodeAt(2 * i + 1) << 8));
  return out;
}
// cells_to_image's axis weights: output pixel centre (p+0.5)*in/out in input pixels, cell c's
// centre at (c+0.5)*stride, linear between centres, border value held beyond the outer centres
function axisWeights(outLen, inLen, cells, stride) {
  const lo = new Int32Array(outLen), hi = new Int32Array(outLen), wlo = new Float64Array(outLen), whi = new Float64Array(outLen);
  const clip = (v) => Math.min(Math.max(v, 0), cells - 1);
  for (let p = 0; p < outLen; p++) {
    const position = (p + 0.5) * (inLen / outLen) / stride - 0.5, lower = Math.floor(position);
    const fraction = position - lower;
    lo[p] = clip(lower); hi[p] = clip(lower + 1); wlo[p] = 1 - fraction; whi[p] = fraction;
  }
  return {lo, hi, wlo, whi};
}
function upsample(cells, validH, validW, stride, inH, inW, outH, outW) {
  const rows = axisWeights(outH, inH, validH, stride), cols = axisWeights(outW, inW, validW, stride);
  const tmp = new Float64Array(outH * validW), out = new Float32Array(outH * outW);
  for (let y = 0; y < outH; y++)
    for (let x = 0; x < validW; x++)
      tmp[y * validW + x] = rows.wlo[y] * cells[rows.lo[y] * validW + x] + rows.whi[y] * cells[rows.hi[y] * validW + x];
  for (let y = 0; y < outH; y++)
    for (let x = 0; x < outW; x++)
      out[y * outW + x] = cols.wlo[x] * tmp[y * validW + cols.lo[x]] + cols.whi[x] * tmp[y * validW + cols.hi[x]];
  return out;
}
function normalize(map) {  // normalize_maps "minmax": a constant map becomes all 0
  let low = Infinity, high = -Infinity;
  for (const v of map) { if (v < low) low = v; if (v > high) high = v; }
  const span = high - low, out = new Float32Array(map.length);
  if (span > 0) for (let i = 0; i < map.length; i++) out[i] = (map[i] - low) / span;
  return out;
}
const LUT = Uint8Array.from(DATA.colormap.flat());
function blend(base, saliency, opacity) {  // render_saliency: opacity alpha*saliency per pixel
  const out = new Uint8ClampedArray(base.length);
  for (let i = 0; i < saliency.length; i++) {
    const s = Math.min(Math.max(saliency[i], 0), 1), level = 3 * Math.round(s * 255), weight = opacity * s;
    for (let c = 0; c < 3; c++) out[4 * i + c] = Math.round(base[4 * i + c] * (1 - weight) + LUT[level + c] * weight);
    out[4 * i + 3] = 255;
  }
  return out;
}
function entry(index) {
  const image = DATA.images[index];
  if (!cache.has(index)) {
    const methods = {};
    for (const [name, m] of Object.entries(image.methods))
      methods[name] = {slices: m.slices, detections: m.detections, grids: float16(m.grids)};
    cache.set(index, {methods, encoder: image.encoder ? float16(image.encoder) : null, base: null, img: null});
  }
  return cache.get(index);
}
// a recipe for the (layer, head) view from the saved slices, or null when it cannot be made
function recipe(method, layer, head, layers, heads) {
  const i = method.slices.findIndex((s) => s[0] === layer && s[1] === head);
  if (i >= 0) return {slice: i};
  if (typeof layer === "number" && (head === "mean" || head === "max")) {
    const parts = [];
    for (let h = 0; h < heads; h++) { const r = recipe(method, layer, h, layers, heads); if (!r) return null; parts.push(r); }
    return {op: head, parts};
  }
  if (layer === "mean") {
    const parts = [];
    for (let l = 0; l < layers; l++) { const r = recipe(method, l, head, layers, heads); if (!r) return null; parts.push(r); }
    return {op: "mean", parts};
  }
  return null;
}
function evaluate(method, row, r, cellCount) {
  if (r.slice !== undefined) {
    const start = (row * method.slices.length + r.slice) * cellCount;
    return method.grids.subarray(start, start + cellCount);
  }
  const parts = r.parts.map((p) => evaluate(method, row, p, cellCount)), out = new Float32Array(cellCount);
  for (let k = 0; k < cellCount; k++) {
    let v = r.op === "max" ? -Infinity : 0;
    for (const part of parts) v = r.op === "max" ? Math.max(v, part[k]) : v + part[k];
    out[k] = r.op === "max" ? v : v / parts.length;
  }
  return out;
}
function cellGrid(imageIndex, det, methodName, layer, head) {
  const image = DATA.images[imageIndex], method = entry(imageIndex).methods[methodName];
  if (!method) return null;
  const row = method.detections.indexOf(det), r = recipe(method, layer, head, image.layers, image.heads);
  if (row < 0 || !r) return null;
  return evaluate(method, row, r, image.valid[0] * image.valid[1]);
}
function layerOptions(imageIndex, methodName) {
  const image = DATA.images[imageIndex], method = entry(imageIndex).methods[methodName], options = [];
  const candidates = [...Array(image.layers).keys(), "mean", "rollout", "all"];
  for (const layer of candidates)
    if (["mean", "max", "all", ...Array(image.heads).keys()].some((h) => recipe(method, layer, h, image.layers, image.heads)))
      options.push(layer);
  return options;
}
function headOptions(imageIndex, methodName, layer) {
  const image = DATA.images[imageIndex], method = entry(imageIndex).methods[methodName];
  return ["mean", "max", ...Array(image.heads).keys(), "all"].filter((h) => recipe(method, layer, h, image.layers, image.heads));
}
function label(value, count, what) {
  if (typeof value !== "number") return value;
  return value === count - 1 ? value + " (last)" : String(value);
}
function fillSelect(select, options, current, count, what) {
  select.innerHTML = "";
  for (const value of options) {
    const option = document.createElement("option");
    option.value = String(value); option.textContent = label(value, count, what);
    select.appendChild(option);
  }
  select.value = String(current);
}
const parseLabel = (text) => (/^-?\d+$/.test(text) ? parseInt(text, 10) : text);

function validState(s) {
  const out = Object.assign({}, state, s);
  out.image = Math.min(Math.max(0, out.image | 0), DATA.images.length - 1);
  const image = DATA.images[out.image], methods = Object.keys(image.methods);
  if (!methods.includes(out.method)) out.method = methods[0];
  out.det = image.detections.length ? Math.min(Math.max(0, out.det | 0), image.detections.length - 1) : 0;
  const layers = layerOptions(out.image, out.method);
  if (!layers.includes(out.layer)) out.layer = layers.includes(image.layers - 1) ? image.layers - 1 : layers[0];
  const heads = headOptions(out.image, out.method, out.layer);
  if (!heads.includes(out.head)) out.head = heads[0];
  out.opacity = Math.min(Math.max(Number.isFinite(+out.opacity) ? +out.opacity : 0.6, 0), 1);
  if (!image.encoder) out.point = null;
  if (out.point) out.point = [Math.min(Math.max(0, out.point[0] | 0), image.size[0] - 1), Math.min(Math.max(0, out.point[1] | 0), image.size[1] - 1)];
  return out;
}
function hashOf(s) {
  let text = "image=" + s.image + "&det=" + s.det + "&method=" + encodeURIComponent(s.method) + "&layer=" + s.layer +
    "&head=" + s.head + "&opacity=" + s.opacity;
  if (s.point) text += "&point=" + s.point[0] + "," + s.point[1];
  return "#" + text;
}
function stateFromHash(hash) {
  const params = new URLSearchParams(hash.replace(/^#/, "")), s = {};
  if (params.has("image")) s.image = parseInt(params.get("image"), 10);
  if (params.has("det")) s.det = parseInt(params.get("det"), 10);
  if (params.has("method")) s.method = params.get("method");
  if (params.has("layer")) s.layer = parseLabel(params.get("layer"));
  if (params.has("head")) s.head = parseLabel(params.get("head"));
  if (params.has("opacity")) s.opacity = parseFloat(params.get("opacity"));
  s.point = params.has("point") ? params.get("point").split(",").map((v) => parseInt(v, 10)) : null;
  return s;
}
function setState(change) {
  const imageChanged = change.image !== undefined && change.image !== state.image;
  if (imageChanged && change.point === undefined) change.point = null;
  if (imageChanged && change.det === undefined) change.det = 0;
  state = validState(change);
  history.replaceState(null, "", hashOf(state));
  render();
}

function loadImage(index, done) {
  const e = entry(index);
  if (e.base) return done(e);
  const img = new Image();
  img.onload = () => {
    const canvas = document.createElement("canvas"), [height, width] = DATA.images[index].canvas;
    canvas.width = width; canvas.height = height;
    const context = canvas.getContext("2d");
    context.imageSmoothingQuality = "high";
    context.drawImage(img, 0, 0, width, height);
    e.img = img; e.base = context.getImageData(0, 0, canvas.width, canvas.height).data;
    done(e);
  };
  img.src = DATA.images[index].image;
}
function paint(canvas, base, height, width, cells, image, opacity) {
  canvas.width = width; canvas.height = height;
  canvas.style.width = width + "px"; canvas.style.height = height + "px";
  let pixels = base;
  if (cells) {
    const map = normalize(upsample(cells, image.valid[0], image.valid[1], image.stride, image.input[0], image.input[1], height, width));
    pixels = blend(base, map, opacity);
  }
  canvas.getContext("2d").putImageData(new ImageData(new Uint8ClampedArray(pixels), width, height), 0, 0);
}
function svgSized(svg, height, width) {
  svg.setAttribute("width", width); svg.setAttribute("height", height); svg.innerHTML = "";
}
function marker(svg, point, image) {
  if (!point) return;
  const [height, width] = image.canvas, circle = document.createElementNS(SVGNS, "circle");
  circle.setAttribute("cx", (point[1] + 0.5) * width / image.size[1]); circle.setAttribute("cy", (point[0] + 0.5) * height / image.size[0]);
  circle.setAttribute("r", 5); circle.setAttribute("fill", "none"); circle.setAttribute("stroke", "#ff0080"); circle.setAttribute("stroke-width", 2);
  svg.appendChild(circle);
}
let renderToken = 0;
function render() {
  const token = ++renderToken, s = state, image = DATA.images[s.image];
  document.body.dataset.ready = "0";
  $("title").textContent = DATA.title;
  $("image-select").value = String(s.image);
  const methods = Object.keys(image.methods);
  fillSelect($("method-select"), methods, s.method, 0, "method");
  $("method-label").style.display = methods.length > 1 ? "" : "none";
  const layers = layerOptions(s.image, s.method), heads = headOptions(s.image, s.method, s.layer);
  fillSelect($("layer-select"), layers, s.layer, image.layers, "layer");
  fillSelect($("head-select"), heads, s.head, image.heads, "head");
  $("layer-label").style.display = layers.length === 1 && layers[0] === "all" ? "none" : "";
  $("head-label").style.display = heads.length === 1 && heads[0] === "all" ? "none" : "";
  $("opacity").value = String(s.opacity);
  $("mode-label").style.display = image.encoder ? "" : "none";
  if (!image.encoder) pointMode = false;
  $("point-mode").checked = pointMode;
  $("stage").classList.toggle("pointmode", pointMode);
  $("encoder").style.display = image.encoder && s.point ? "" : "none";
  renderTable(image, s);
  const det = image.detections[s.det];
  $("caption").textContent = det ? "detection " + s.det + ": " + det.class_name + " " + det.score.toFixed(3) + " (query " +
    det.query_index + ") \u00b7 " + s.method + " \u00b7 layer " + s.layer + " \u00b7 head " + s.head : "no detections";
  loadImage(s.image, (e) => {
    if (token !== renderToken) return;
    paintMain(e, image, s);
    renderBoxes(image, s, image.canvas[0], image.canvas[1]);
    const encoderView = image.encoder && s.point ? [s.image, s.point, s.opacity].join("|") : null;
    if (encoderView && encoderView !== shownEncoder) renderEncoder(e, image, s);  // a detection change keeps it
    shownEncoder = encoderView;
    document.body.dataset.ready = "1";
  });
}
function paintMain(e, image, s) {
  const [height, width] = image.canvas, shown = hoverDet !== null ? hoverDet : s.det;
  const cells = image.detections.length ? cellGrid(s.image, shown, s.method, s.layer, s.head) : null;
  paint($("map-canvas"), e.base, height, width, cells, image, s.opacity);
}
function renderTable(image, s) {
  const body = $("det-table").tBodies[0], method = entry(s.image).methods[s.method];
  body.innerHTML = "";
  image.detections.forEach((det, k) => {
    const row = body.insertRow(), hasMap = method.detections.includes(k);
    row.className = "det" + (k === s.det ? " selected" : "") + (hasMap ? "" : " nomap");
    row.id = "det-row-" + k;
    const swatch = '<span class="swatch" style="background:rgb(' + det.color.join(",") + ')"></span>';
    row.innerHTML = "<td>" + k + "</td><td>" + swatch + "</td><td>" + det.score.toFixed(3) + "</td><td>" + det.query_index + "</td>";
    row.cells[1].appendChild(document.createTextNode(det.class_name + (hasMap ? "" : " (no map saved)")));
    row.addEventListener("mouseenter", () => preview(k));
    row.addEventListener("mouseleave", () => preview(null));
    row.addEventListener("click", () => setState({det: k}));
  });
  const notes = [];
  if (image.kind === "sampled") notes.push("sampled (deformable) attention: no rollout, no encoder self-attention");
  if (image.detail !== "layer_head") notes.push("size budget: kept " + image.detail.replace(/_/g, " ") + " slices");
  if (!image.encoder && image.kind !== "sampled") notes.push("encoder self-attention not saved (--save-encoder-attention)");
  $("notes").textContent = notes.join("; ");
}
function renderBoxes(image, s, height, width) {
  const svg = $("boxes"), sx = width / image.size[1], sy = height / image.size[0];
  svgSized(svg, height, width);
  const order = image.detections.map((d, k) => k).sort((a, b) => area(image.detections[b]) - area(image.detections[a]));
  for (const k of order) {
    const det = image.detections[k], rect = document.createElementNS(SVGNS, "rect");
    rect.setAttribute("x", det.box[0] * sx); rect.setAttribute("y", det.box[1] * sy);
    rect.setAttribute("width", Math.max(1, (det.box[2] - det.box[0]) * sx)); rect.setAttribute("height", Math.max(1, (det.box[3] - det.box[1]) * sy));
    rect.setAttribute("stroke", "rgb(" + det.color.join(",") + ")");
    rect.setAttribute("class", "box" + (k === s.det ? " selected" : "")); rect.id = "det-box-" + k;
    rect.addEventListener("mouseenter", () => preview(k));
    rect.addEventListener("mouseleave", () => preview(null));
    rect.addEventListener("click", (event) => { event.stopPropagation(); setState({det: k}); });
    svg.appendChild(rect);
  }
  marker(svg, s.point, image);
}
const area = (d) => (d.box[2] - d.box[0]) * (d.box[3] - d.box[1]);
function renderEncoder(e, image, s) {
  const [height, width] = image.canvas, [validH, validW] = image.valid, count = validH * validW;
  const inputY = s.point[0] * (image.input[0] / image.size[0]), inputX = s.point[1] * (image.input[1] / image.size[1]);
  const cell = Math.min(Math.floor(inputY / image.stride), validH - 1) * validW + Math.min(Math.floor(inputX / image.stride), validW - 1);
  const outgoing = e.encoder.subarray(cell * count, (cell + 1) * count), incoming = new Float32Array(count);
  for (let k = 0; k < count; k++) incoming[k] = e.encoder[k * count + cell];
  for (const [id, cells] of [["enc-out", outgoing], ["enc-in", incoming]]) {
    paint($(id), e.base, height, width, cells, image, s.opacity);
    svgSized($(id + "-svg"), height, width); marker($(id + "-svg"), s.point, image);
  }
}
function preview(k) {  // hover: show detection k's map (null: the selected one) without changing the state
  if (hoverDet === k) return;
  hoverDet = k;
  const e = entry(state.image);
  if (e.base) paintMain(e, DATA.images[state.image], state);
}

function init() {
  DATA.images.forEach((image, index) => {
    const option = document.createElement("option");
    option.value = String(index); option.textContent = index + ": " + image.key; option.title = image.file;
    $("image-select").appendChild(option);
  });
  // a select gives the keys back once chosen (arrows navigate the viewer, not the select)
  const chosen = (ev) => { ev.target.blur(); return ev.target.value; };
  $("image-select").addEventListener("change", (ev) => setState({image: parseInt(chosen(ev), 10)}));
  $("prev-image").addEventListener("click", () => setState({image: state.image - 1}));
  $("next-image").addEventListener("click", () => setState({image: state.image + 1}));
  $("method-select").addEventListener("change", (ev) => setState({method: chosen(ev)}));
  $("layer-select").addEventListener("change", (ev) => setState({layer: parseLabel(chosen(ev))}));
  $("head-select").addEventListener("change", (ev) => setState({head: parseLabel(chosen(ev))}));
  $("opacity").addEventListener("input", (ev) => setState({opacity: parseFloat(ev.target.value)}));
  $("point-mode").addEventListener("change", (ev) => { pointMode = ev.target.checked; render(); });
  $("boxes").addEventListener("click", (event) => {
    if (!pointMode) return;
    const image = DATA.images[state.image], bounds = $("boxes").getBoundingClientRect();
    const y = Math.floor((event.clientY - bounds.top) * image.size[0] / image.canvas[0]);
    const x = Math.floor((event.clientX - bounds.left) * image.size[1] / image.canvas[1]);
    setState({point: [y, x]});
  });
  document.addEventListener("keydown", (event) => {
    if (["SELECT", "INPUT"].includes(event.target.tagName) && event.target.type !== "checkbox") return;
    const image = DATA.images[state.image], step = (list, value, by) => list[(list.indexOf(value) + by + list.length) % list.length];
    const keys = {
      ArrowRight: () => setState({det: (state.det + 1) % Math.max(1, image.detections.length)}),
      ArrowLeft: () => setState({det: (state.det - 1 + image.detections.length) % Math.max(1, image.detections.length)}),
      ArrowDown: () => setState({image: (state.image + 1) % DATA.images.length}),
      ArrowUp: () => setState({image: (state.image - 1 + DATA.images.length) % DATA.images.length}),
      l: () => setState({layer: step(layerOptions(state.image, state.method), state.layer, 1)}),
      L: () => setState({layer: step(layerOptions(state.image, state.method), state.layer, -1)}),
      h: () => setState({head: step(headOptions(state.image, state.method, state.layer), state.head, 1)}),
      H: () => setState({head: step(headOptions(state.image, state.method, state.layer), state.head, -1)}),
      m: () => setState({method: step(Object.keys(image.methods), state.method, 1)}),
      "+": () => setState({opacity: Math.round((state.opacity + 0.1) * 100) / 100}),
      "-": () => setState({opacity: Math.round((state.opacity - 0.1) * 100) / 100}),
      p: () => { if (image.encoder) { pointMode = !pointMode; render(); } },
      Escape: () => setState({point: null}),
    };
    if (keys[event.key]) { event.preventDefault(); keys[event.key](); }
  });
  window.addEventListener("hashchange", () => setState(stateFromHash(location.hash)));
  setState(stateFromHash(location.hash));
}
window.detrViewer = {data: DATA, upsample, normalize, blend, cellGrid, float16, get state() { return state; },
  base: (index) => Array.from(entry(index).base || [])};
init();
})();
"""


def viewer_html(payload: dict[str, Any]) -> str:
    """The whole page: payload (see `render.viewer.viewer_payload`) inlined as JSON, no external resource."""
    data = json.dumps(payload, separators=(",", ":")).replace("</", "<\\/")
    title = html.escape(str(payload.get("title", "Attention viewer")))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>'
            f'<body data-ready="0">{_BODY}<script type="application/json" id="viewer-data">{data}</script>'
            f'<script>{_JS}</script></body></html>\n')
