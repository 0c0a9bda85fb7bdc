"""Layer 4, reporting: metrics, charts, photos, the HTML page (html), report.html and its files (report), the tune report (tune_report)."""
