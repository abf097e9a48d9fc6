"""Pictures and reports (overlays, JSON, HTML)."""

from covidct.report.json_io import to_json, write_json
from covidct.report.overlay import FOOTER, overlay_rgb, save_png, with_legend

__all__ = ["FOOTER", "overlay_rgb", "save_png", "to_json", "with_legend", "write_json"]
