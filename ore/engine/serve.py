"""A local web page and JSON endpoint over one loaded detector (``ore serve``).

``POST /api/detect`` takes one uploaded image (form field ``image``) and answers with its
``detections.json`` record (:func:`ore.engine.detect.detection_record`); ``?ebui=false``
answers without the energy-based identifier. ``GET /`` is a page that uploads an image
(picked or dropped), draws the boxes on it (unknowns in magenta) beside a table of them,
with a score slider and an EBUI switch. The model is loaded once; requests run one at a
time (a lock), so the detector's state is never shared between two requests. An upload
over the size limit answers 413, a file that is no image 415, an image over
``INPUT.MAX_PIXELS`` 413, each with a one-line ``detail``.
"""

from __future__ import annotations

import io
import threading
import warnings

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import HTMLResponse
from PIL import Image, UnidentifiedImageError

from ore.engine.detect import DRAW_THRESH, detection_record
from ore.engine.inference import Predictor

MAX_UPLOAD_BYTES = 20 * 1024 * 1024


def read_upload(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """The RGB pixels of an uploaded file; an :class:`HTTPException` (413/415) naming it
    when it is no image or has too many pixels (checked from its header, before decoding)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if max_pixels and w * h > max_pixels:
                raise HTTPException(413, f"{name}: {w}×{h} pixels is over INPUT.MAX_PIXELS="
                                         f"{max_pixels}")
            return np.array(img.convert("RGB"))
    except HTTPException:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as exc:
        raise HTTPException(415, f"{name}: not a decodable image ({exc.__class__.__name__})"
                            ) from None


def build_app(predictor: Predictor, *, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    """The web app over ``predictor`` (see the module docstring)."""
    app = FastAPI(title="ORE detect", docs_url="/api/docs", redoc_url=None)
    lock = threading.Lock()
    heads = predictor.model.roi_heads
    relabeller = getattr(heads, "relabeller", None)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return (PAGE.replace("{{EBUI}}", "checked" if relabeller is not None else "disabled")
                .replace("{{SCORE}}", f"{DRAW_THRESH:.2f}"))

    @app.get("/api/info")
    def info() -> dict:
        return {"classes": list(predictor.split.label_names[1:]),
                "ebui": relabeller is not None, "max_upload_bytes": max_upload_bytes}

    @app.post("/api/detect")
    def detect(image: UploadFile = File(...),
               ebui: bool = Query(True, description="use the energy fit when loaded")) -> dict:
        name = image.filename or "upload"
        data = image.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"{name}: over the upload limit of {max_upload_bytes} "
                                     "bytes")
        rgb = read_upload(data, name, predictor.cfg.INPUT.MAX_PIXELS)
        with lock:
            heads.relabeller = relabeller if ebui else None
            try:
                det = predictor.predict([rgb])[0]
            finally:
                heads.relabeller = relabeller
        return detection_record(name, None, det, *rgb.shape[:2])

    return app


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ORE detect</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
#drop{border:2px dashed #999;padding:1.2em;text-align:center;margin-bottom:1em}
#drop.over{background:#f3e6ff}
#main{display:flex;gap:1.5em;align-items:flex-start;flex-wrap:wrap}
canvas{max-width:60vw;border:1px solid #ccc}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}
tr.unknown td{color:#b000b0;font-weight:bold}#error{color:#b00}
</style></head><body>
<h1>ORE: known objects and unknowns</h1>
<div id="drop">Drop an image here or <input type="file" id="file" accept="image/*"></div>
<label>min score <input type="range" id="score" min="0" max="1" step="0.01" value="{{SCORE}}">
<span id="scoreval">{{SCORE}}</span></label>
<label><input type="checkbox" id="ebui" {{EBUI}}> EBUI (energy-based unknowns)</label>
<p id="error"></p>
<div id="main"><canvas id="canvas" width="0" height="0"></canvas>
<table id="table"><thead><tr><th>#</th><th>class</th><th>score</th><th>energy</th>
<th>known/unknown</th><th>box (x1, y1, x2, y2)</th></tr></thead><tbody></tbody></table></div>
<script>
let record = null, picture = null, lastFile = null;
const $ = id => document.getElementById(id);
function colour(name) {
  if (name === "unknown") return "#ff00ff";
  let h = 0; for (const c of name) h = (h * 31 + c.charCodeAt(0)) % 360;
  if (h > 270 && h < 330) h = (h + 110) % 360;
  return `hsl(${h},85%,50%)`;
}
function show() {
  if (!record || !picture) return;
  const min = parseFloat($("score").value), cv = $("canvas"), g = cv.getContext("2d");
  cv.width = picture.width; cv.height = picture.height; g.drawImage(picture, 0, 0);
  const body = $("table").tBodies[0]; body.innerHTML = "";
  g.lineWidth = Math.max(1, Math.round(Math.min(cv.width, cv.height) / 250));
  g.font = "12px sans-serif";
  record.boxes.forEach((b, i) => {
    const s = record.scores[i]; if (s < min) return;
    const name = record.labels[i], c = colour(name);
    const e = record.energies ? record.energies[i] : null;
    g.strokeStyle = c; g.strokeRect(b[0], b[1], b[2] - b[0], b[3] - b[1]);
    const text = `${name} ${s.toFixed(2)}` + (e === null ? "" : ` E${e.toFixed(1)}`);
    g.fillStyle = c; g.fillRect(b[0], b[1] - 14, g.measureText(text).width + 4, 14);
    g.fillStyle = "#000"; g.fillText(text, b[0] + 2, b[1] - 3);
    const tr = body.insertRow(); tr.className = name === "unknown" ? "unknown" : "known";
    [i + 1, name, s.toFixed(3), e === null ? "" : e.toFixed(2),
     name === "unknown" ? "unknown" : "known", b.map(v => v.toFixed(0)).join(", ")]
      .forEach(v => { tr.insertCell().textContent = v; });
  });
}
async function detect(file) {
  lastFile = file; $("error").textContent = "";
  const form = new FormData(); form.append("image", file);
  const ebui = $("ebui").disabled ? "" : `?ebui=${$("ebui").checked}`;
  const r = await fetch("/api/detect" + ebui, {method: "POST", body: form});
  const body = await r.json();
  if (!r.ok) { $("error").textContent = body.detail; record = null; return; }
  record = body;
  picture = new Image();
  picture.onload = show; picture.src = URL.createObjectURL(file);
}
$("file").onchange = e => e.target.files.length && detect(e.target.files[0]);
$("score").oninput = () => { $("scoreval").textContent =
  parseFloat($("score").value).toFixed(2); show(); };
$("ebui").onchange = () => lastFile && detect(lastFile);
const drop = $("drop");
drop.ondragover = e => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = e => { e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) detect(e.dataTransfer.files[0]); };
</script></body></html>
"""
