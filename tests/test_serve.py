"""covidct serve: analysis folders over HTTP (viewer, report, an index of analysed scans)."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import pytest

from covidct.cli import main
from covidct.errors import InputError
from covidct.report.json_io import write_json
from covidct.serve import make_server, start_page


def _fake_analysis(folder, total: float, label: str) -> None:
    write_json({"input": {"path": f"/scans/{folder.name}"}, "lesions": {"total": {"percent_of_lung": total}},
                "severity_score": 4, "diagnosis": {"label": label}}, folder / "report.json")
    (folder / "report.html").write_text("<html>report</html>")
    (folder / "viewer.html").write_text("<html>viewer</html>")


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "runs"
    _fake_analysis(root / "P001", 1.9, "lesions present")
    _fake_analysis(root / "normal001", 0.09, "no lesions found")
    (tmp_path / "secret.txt").write_text("outside")
    server = make_server(root, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def test_index_lists_every_analysed_scan_with_links(served):
    root, base = served
    status, page = _get(base + "/")
    assert status == 200 and page.index("not for diagnosis") < page.index("<h1>")
    assert "1.90 %" in page and "0.09 %" in page and "no lesions found" in page
    assert 'href="P001/viewer.html"' in page and 'href="normal001/report.html"' in page
    assert _get(base + "/P001/viewer.html") == (200, "<html>viewer</html>")
    assert _get(base + "/../secret.txt")[1] != "outside"  # nothing above the folder
    assert start_page(root) == "" and start_page(root / "P001") == "viewer.html"


def test_serve_refuses_a_missing_folder_in_one_line(tmp_path, capsys):
    with pytest.raises(InputError):
        make_server(tmp_path / "nope", port=0)
    assert main(["serve", str(tmp_path / "nope"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and "no such folder" in err[0]
    (tmp_path / "report.json").write_text("{}")     # a file, not an analysis folder
    assert main(["serve", str(tmp_path / "report.json"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"covidct: error: {tmp_path / 'report.json'}: not a folder (give a covidct analyze output folder)"]


def test_serve_reports_a_busy_port_in_one_line(tmp_path, capsys):
    server = make_server(tmp_path, port=0)
    try:
        assert main(["serve", str(tmp_path), "--port", str(server.server_address[1])]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot listen" in err[0]
    finally:
        server.server_close()


def test_serve_refuses_a_port_out_of_range_in_one_line(tmp_path, capsys):
    for port in ("99999", "-1"):
        assert main(["serve", str(tmp_path), "--port", port]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"covidct: error: --port: {port} is not a TCP port (0-65535; 0: any free one)"]
