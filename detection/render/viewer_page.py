"""The viewer's page: HTML, CSS and the script's frame around its two parts, the map arithmetic
(`viewer_map_script`) and the interaction (`viewer_view_script`), as one self-contained file.
"""
from __future__ import annotations

import html
import json
from typing import Any

from detection.render.token_view import TOKEN_VIEW_CSS
from detection.render.viewer_map_script import MAP_SCRIPT
from detection.render.viewer_view_script import VIEW_SCRIPT

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
#token-view{margin-top:8px;max-width:480px}#token-row{font-size:14px;line-height:1.9}
""" + TOKEN_VIEW_CSS + "\n"

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
 <tbody></tbody></table>
 <div id="token-view"><div class="help" id="token-method"></div><div id="token-row"></div></div>
 <p class="note" id="notes"></p></div>
</div>
"""

# the script's frame: the globals its two parts share, and the handle the browser test reads
_SCRIPT_OPEN = r"""
(function () {
"use strict";
const DATA = JSON.parse(document.getElementById("viewer-data").textContent);
const $ = (id) => document.getElementById(id);
const SVGNS = "http://www.w3.org/2000/svg";
let state = {image: 0, det: 0, method: null, layer: null, head: "mean", opacity: 0.6, point: null};
let hoverDet = null, pointMode = false, shownEncoder = null;
const cache = new Map();

"""
_SCRIPT_CLOSE = r"""window.detrViewer = {data: DATA, upsample, normalize, blend, cellGrid, float16, get state() { return state; },
  base: (index) => Array.from(entry(index).base || [])};
init();
})();
"""
_JS = _SCRIPT_OPEN + MAP_SCRIPT + VIEW_SCRIPT + _SCRIPT_CLOSE


def viewer_html(payload: dict[str, Any]) -> str:
    """The whole page: payload (see `render.viewer.viewer_payload`) inlined as JSON, no external resource."""
    data = json.dumps(payload, separators=(",", ":")).replace("</", "<\\/")
    title = html.escape(str(payload.get("title", "Attention viewer")))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>'
            f'<body data-ready="0">{_BODY}<script type="application/json" id="viewer-data">{data}</script>'
            f'<script>{_JS}</script></body></html>\n')
