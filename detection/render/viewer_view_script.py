"""The viewer's interaction in JavaScript: the view state and its address (#image=...&det=...),
drawing the image, boxes, table and encoder panels, and the keys and clicks that change the view."""

VIEW_SCRIPT = r"""function label(value, count, what) {
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
  renderTokens(image, s.det);
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
function renderTokens(image, k) {  // a prompted run: detection k's prompt, each token shaded (the report's row)
  $("token-view").style.display = image.tokens ? "" : "none";
  $("token-method").textContent = image.tokens ? "prompt tokens of detection " + k + ": " + image.tokens.method : "";
  $("token-row").innerHTML = image.tokens && image.detections.length ? image.tokens.rows[k] : "";
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
  renderTokens(DATA.images[state.image], k !== null ? k : state.det);
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
"""
