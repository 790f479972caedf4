"""The viewer's map arithmetic in JavaScript, the same as the Python's: float16 grids decoded, upsampled
as `attention.maps.cells_to_image` does (cell centres, crop, resize), normalised, blended, (layer, head) views."""

MAP_SCRIPT = r"""function half(bits) {
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
"""
