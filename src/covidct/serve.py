"""``covidct serve``: the analysis outputs in a browser, over HTTP, from this machine.

Serves one ``covidct analyze`` output folder (its ``viewer.html`` and ``report.html``) or a folder of
several: the start page then lists every analysed scan (the subfolders holding a ``report.json``) with
its lesion burden, severity and answer, linked to its viewer and report. Only files below the folder
are served (Python's ``http.server``); it binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import functools
import html
import json
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from covidct import DISCLAIMER
from covidct.errors import CovidctError, require_folder
from covidct.report.notes import report_notes


def analysed_scans(root: Path) -> list[tuple[str, dict]]:
    """``(relative folder, report)`` for the folder itself and every subfolder holding a report.json."""
    found = []
    for report in sorted([root / "report.json", *root.glob("*/report.json"), *root.glob("*/*/report.json")]):
        if report.is_file():
            try:
                found.append((report.parent.relative_to(root).as_posix(), json.loads(report.read_text())))
            except (OSError, ValueError):
                continue
    return found


def _notes(report: dict) -> list[str]:
    """The report's notes; none for a report.json from another covidct version that lacks what they read."""
    try:
        return report_notes(report)
    except (KeyError, TypeError, AttributeError):
        return []


def index_page(root: Path) -> str:
    """The start page: one row per analysed scan."""
    rows = []
    for rel, rep in analysed_scans(root):
        base = "" if rel == "." else rel + "/"
        total = rep.get("lesions", {}).get("total", {}).get("percent_of_lung")
        viewer = f'<a href="{html.escape(base)}viewer.html">viewer</a>' if (root / base / "viewer.html").is_file() else ""
        rows.append(
            f"<tr><td>{html.escape(rel if rel != '.' else root.name)}</td>"
            f"<td>{html.escape(str(rep.get('input', {}).get('path', '')))}</td>"
            f"<td>{'' if total is None else f'{total:.2f} %'}</td><td>{rep.get('severity_score', '')}</td>"
            f"<td>{html.escape(str(rep.get('diagnosis', {}).get('label', '')))}</td>"
            f"<td>{'<br>'.join(html.escape(n) for n in _notes(rep))}</td>"
            f'<td><a href="{html.escape(base)}report.html">report</a> {viewer}</td></tr>')
    body = ("<table><tr><th>folder</th><th>input</th><th>lesions % of lung</th><th>severity</th><th>answer</th>"
            "<th>notes</th><th></th></tr>" + "".join(rows) + "</table>") if rows else \
        "<p>No analysed scans here (no report.json): run <code>covidct analyze PATH -o OUTDIR</code> first.</p>"
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>covidct</title>
<style>body{{font-family:sans-serif;margin:1.5em}} .warn{{background:#fff3cd;border:1px solid #c9a100;padding:.7em;font-weight:bold}}
td,th{{border:1px solid #bbb;padding:.25em .6em}} table{{border-collapse:collapse}}</style></head><body>
<p class="warn">{html.escape(DISCLAIMER)}</p><h1>covidct: analysed scans in {html.escape(root.name)}</h1>{body}</body></html>
"""


class _Handler(SimpleHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.split("?")[0] in ("/", "/index.html") and not (Path(self.directory) / "index.html").exists():
            data = index_page(Path(self.directory)).encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        super().do_GET()

    def log_message(self, format: str, *args) -> None:  # quiet: no line per request
        pass


def make_server(root: str | Path, *, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server for ``root`` (not yet serving: call ``serve_forever``); ``port=0`` picks a free one."""
    root = require_folder(root, hint="give a covidct analyze output folder")
    if not 0 <= int(port) <= 65535:
        raise CovidctError("--port", f"{port} is not a TCP port (0-65535; 0: any free one)")
    try:
        return ThreadingHTTPServer((host, port), functools.partial(_Handler, directory=str(root.resolve())))
    except OSError as exc:
        raise CovidctError(f"{host}:{port}", f"cannot listen: {exc.strerror or exc}") from None


def start_page(root: str | Path) -> str:
    """The page to open first: the viewer of a single analysed scan, else the index."""
    return "viewer.html" if (Path(root) / "viewer.html").is_file() else ""
