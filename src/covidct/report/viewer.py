"""A browser viewer for one analysed scan: ``viewer.html``, one self-contained file.

Every slice of the scan is embedded as a JPEG in the lung window (for CT in HU also in the mediastinal
window, chosen on the page: consolidation and pleural effusion are read there), with its lesion labels (GGO
red, consolidation blue, effusion green) and the lung outline as a transparent PNG drawn over it. The page
scrolls through the slices (slider, mouse wheel, arrow keys, or a click on the per-slice strip of
infection probabilities), switches the display window (also the key ``w``), toggles the overlay and sets its
opacity. Nothing is fetched from the
network; the disclaimer heads the page. ``covidct serve`` serves such folders over HTTP.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from covidct import DISCLAIMER
from covidct.data.segmentation import LESION_CLASSES, LESION_COLOURS
from covidct.io.atomic import write_bytes_atomic

#: The longest side of the embedded slices (the page scales them up for display).
MAX_SIDE = 320
JPEG_QUALITY = 75   # 85 -> 75 when the mediastinal pictures were added: no visible change at 320 px, -25 % bytes


def _b64(image: Image.Image, fmt: str, **kw) -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _display_size(rows: int, cols: int, spacing: Sequence[float] | None, max_side: int) -> tuple[int, int]:
    """(width, height) of the embedded picture: square pixels in mm when the spacing is known."""
    aspect = 1.0 if not spacing else float(spacing[1]) / float(spacing[2])  # row / column size
    h, w = rows * aspect, float(cols)
    scale = min(1.0, max_side / max(h, w))
    return max(1, round(w * scale)), max(1, round(h * scale))


def _label_png(labels: np.ndarray, lung: np.ndarray, size: tuple[int, int]) -> str:
    """Lesion colours and the lung outline on a transparent background (palette PNG)."""
    from skimage.segmentation import find_boundaries

    small = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize(size, Image.NEAREST))
    lung_small = np.asarray(Image.fromarray((lung > 0).astype(np.uint8)).resize(size, Image.NEAREST)).astype(bool)
    index = small.copy()
    outline_value = len(LESION_CLASSES)
    index[find_boundaries(lung_small, mode="inner") & (index == 0)] = outline_value
    palette = [0, 0, 0]
    for name in LESION_CLASSES[1:]:
        palette += list(LESION_COLOURS[name])
    palette += list(LESION_COLOURS["lung"])
    im = Image.fromarray(index, mode="P")
    im.putpalette(palette)
    return _b64(im, "PNG", optimize=False, transparency=0)


def _jpeg(grey: np.ndarray, size: tuple[int, int]) -> str:
    """A [0, 1] slice as a base64 JPEG of ``size``."""
    image = Image.fromarray((np.clip(grey, 0, 1) * 255).astype(np.uint8)).resize(size, Image.BILINEAR)
    return _b64(image, "JPEG", quality=JPEG_QUALITY)


def viewer_html(grey_slices: Callable[[int], np.ndarray], lesions: np.ndarray, lungs: np.ndarray,
                slices: list[dict], *, spacing: Sequence[float] | None = None, title: str = "covidct viewer",
                max_side: int = MAX_SIDE, notes: Sequence[str] = (), window_name: str = "lung",
                extra_windows: Mapping[str, Callable[[int], np.ndarray]] | None = None) -> str:
    """The viewer page. ``grey_slices(k)`` gives slice ``k`` in [0, 1] in the display window ``window_name``;
    ``extra_windows``: more display windows to switch to on the page (name -> the same kind of function);
    ``lesions`` and ``lungs`` are the (slices, rows, cols) label maps of the analysis; ``slices`` its per-slice
    rows; ``notes`` the report's notes (:func:`covidct.report.notes.report_notes`), shown under the title."""
    n, rows, cols = lesions.shape
    size = _display_size(rows, cols, spacing, max_side)
    extra_windows = dict(extra_windows or {})
    frames = []
    for k in range(n):
        has_overlay = bool(lesions[k].any() or lungs[k].any())
        frames.append({"ct": _jpeg(grey_slices(k), size),
                       "win": {name: _jpeg(show(k), size) for name, show in extra_windows.items()},
                       "ov": _label_png(lesions[k], lungs[k], size) if has_overlay else ""})
    info = [{"p": s.get("infection_probability", 0.0), "pct": s.get("lesion_percent", 0.0),
             "ggo": s.get("ggo_percent"), "cons": s.get("consolidation_percent"),
             "tri": s.get("triage_probabilities")} for s in slices]
    start = int(np.argmax([s["pct"] for s in info])) if info else 0
    legend = "".join(f'<span><i style="background:rgb{tuple(LESION_COLOURS[c])}"></i>{label}</span>'
                     for c, label in (("ggo", "GGO"), ("consolidation", "consolidation"), ("effusion", "effusion"),
                                      ("lung", "lung outline")))
    data = json.dumps({"frames": frames, "info": info, "start": start, "width": size[0], "height": size[1],
                       "windows": [window_name, *extra_windows]})
    notes_html = "".join(f'<p class="note">note: {html.escape(n)}</p>' for n in notes)
    return _PAGE.replace("%TITLE%", html.escape(title)).replace("%DISCLAIMER%", html.escape(DISCLAIMER)) \
        .replace("%NOTES%", notes_html).replace("%LEGEND%", legend).replace("%DATA%", data.replace("</", "<\\/"))


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>%TITLE%</title>
<style>
body{font-family:sans-serif;margin:1em;background:#111;color:#eee}
.warn{background:#fff3cd;color:#000;border:1px solid #c9a100;padding:.6em;font-weight:bold}
.note{color:#ffd27f;margin:.3em 0}
#stack{position:relative;display:inline-block;cursor:ns-resize}
#stack img{display:block;width:min(80vh,90vw);height:auto;image-rendering:auto}
#ov{position:absolute;left:0;top:0;image-rendering:pixelated}
#strip{display:block;margin:.4em 0;cursor:pointer;background:#222}
.legend span{margin-right:1em} .legend i{display:inline-block;width:.9em;height:.9em;margin-right:.3em}
label{margin-right:1em}
</style></head><body>
<p class="warn">%DISCLAIMER%</p>
<h1>%TITLE%</h1>
%NOTES%
<div><label>slice <input id="slider" type="range" min="0" value="0" style="width:24em"></label>
<span id="where"></span></div>
<div><label>window <select id="win"></select></label>
<label><input id="show" type="checkbox" checked> lesions and lung outline</label>
<label>opacity <input id="alpha" type="range" min="0" max="100" value="45"></label>
<span class="legend">%LEGEND%</span></div>
<canvas id="strip" width="800" height="40" title="infection probability per slice (click to jump)"></canvas>
<div id="stack"><img id="ct" alt="CT slice"><img id="ov" alt="lesion overlay"></div>
<p><small>Mouse wheel or arrow keys move through the slices; w switches the display window. covidct - research
software, not for diagnosis.</small></p>
<script id="data" type="application/json">%DATA%</script>
<script>
const D = JSON.parse(document.getElementById('data').textContent);
const n = D.frames.length, slider = document.getElementById('slider'), ct = document.getElementById('ct'),
      ov = document.getElementById('ov'), show = document.getElementById('show'), alpha = document.getElementById('alpha'),
      where = document.getElementById('where'), strip = document.getElementById('strip'),
      win = document.getElementById('win');
slider.max = n - 1;
D.windows.forEach(name => { const o = document.createElement('option'); o.value = o.textContent = name; win.appendChild(o); });
win.disabled = D.windows.length < 2;
let k = Math.min(D.start, n - 1);
function drawStrip() {
  const g = strip.getContext('2d'), w = strip.width / Math.max(n, 1);
  g.clearRect(0, 0, strip.width, strip.height);
  D.info.forEach((s, i) => { g.fillStyle = 'rgb(220,60,60)'; const h = s.p * strip.height;
                             g.fillRect(i * w, strip.height - h, Math.max(w - 0.5, 1), h); });
  g.fillStyle = '#ff0'; g.fillRect(k * w, 0, Math.max(w, 2), strip.height);
}
function show_slice(i) {
  k = Math.max(0, Math.min(n - 1, i)); slider.value = k;
  const f = D.frames[k];
  ct.src = 'data:image/jpeg;base64,' + (win.selectedIndex > 0 ? f.win[win.value] : f.ct);
  ov.src = f.ov ? 'data:image/png;base64,' + f.ov : '';
  ov.style.display = (show.checked && f.ov) ? 'block' : 'none';
  ov.style.width = ct.clientWidth ? ct.clientWidth + 'px' : '100%';
  ov.style.opacity = alpha.value / 100;
  const s = D.info[k] || {p: 0, pct: 0};
  const types = (s.ggo == null) ? '' : ` (GGO ${s.ggo.toFixed(2)} %, consolidation ${s.cons.toFixed(2)} %)`;
  const tri = s.tri ? ' - ' + Object.entries(s.tri).map(([c, v]) => `${c} ${v.toFixed(2)}`).join(', ') : '';
  where.textContent = `${k + 1} / ${n} (index ${k}) - infection probability ${s.p.toFixed(3)}, lesions ${s.pct.toFixed(2)} % of lung${types}${tri}`;
  drawStrip();
}
slider.oninput = () => show_slice(+slider.value);
show.onchange = alpha.oninput = win.onchange = () => show_slice(k);
document.getElementById('stack').addEventListener('wheel', e => { e.preventDefault(); show_slice(k + Math.sign(e.deltaY)); });
document.addEventListener('keydown', e => { if (e.key === 'ArrowUp' || e.key === 'ArrowLeft') show_slice(k - 1);
                                            if (e.key === 'ArrowDown' || e.key === 'ArrowRight') show_slice(k + 1);
                                            if (e.key === 'w' && !win.disabled) { win.selectedIndex = (win.selectedIndex + 1) % D.windows.length; show_slice(k); } });
strip.onclick = e => show_slice(Math.floor(e.offsetX / strip.clientWidth * n));
window.onresize = () => show_slice(k);
ct.onload = () => { ov.style.width = ct.clientWidth + 'px'; };
show_slice(k);
</script>
</body></html>
"""


def write_viewer(path: str | Path, grey_slices: Callable[[int], np.ndarray], lesions: np.ndarray, lungs: np.ndarray,
                 slices: list[dict], *, spacing: Sequence[float] | None = None, title: str = "covidct viewer",
                 max_side: int = MAX_SIDE, notes: Sequence[str] = (), window_name: str = "lung",
                 extra_windows: Mapping[str, Callable[[int], np.ndarray]] | None = None) -> Path:
    """:func:`viewer_html` written atomically to ``path``."""
    page = viewer_html(grey_slices, lesions, lungs, slices, spacing=spacing, title=title, max_side=max_side,
                       notes=notes, window_name=window_name, extra_windows=extra_windows)
    return write_bytes_atomic(page.encode("utf-8"), path)
