"""The local HTML report: `render_report(out_dir)` turns OUT/run.db into OUT/report.html."""

from fineline_monitor.report.render import render_report

__all__ = ["render_report"]
