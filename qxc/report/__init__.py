"""Reports: a versioned JSON document and a self-contained HTML page (inline SVG plots, no network resources)."""

from qxc.report.build import SCHEMA, build_report, render_html, write_report

__all__ = ["SCHEMA", "build_report", "render_html", "write_report"]
