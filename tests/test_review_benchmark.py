"""`python -m benchmarks.review_page` runs end to end on a small store and reports every figure (the figures
themselves depend on the machine and are not checked here)."""
from __future__ import annotations

import json

from PIL import Image

from benchmarks.review_page import main


def test_review_page_benchmark_reports_every_figure(tmp_path, tiny_bundle):
    out, shot = tmp_path / "out", tmp_path / "page.png"
    assert main(["--results", "60", "--loads", "2", "--api-runs", "3", "--models", str(tiny_bundle),
                 "--out", str(out), "--screenshot", str(shot)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["results"] == 60 and report["reviews"] == 6 + 3      # 6 made while building, 3 timed saves
    assert set(report["api"]) == {"/api/queue?state=unreviewed&limit=100&offset=0", "/api/summary", "/api/meta",
                                  "/api/results/1/image"}
    assert all(s["count"] == 3 and s["bytes"] > 0 for s in report["api"].values())
    assert report["save_review"]["count"] == 3
    mem = report["server_memory"]
    assert 0 < mem["after_start"]["rss_mb"] <= mem["after_load"]["peak_rss_mb"]
    page = report["page"]
    if "skipped" not in page:               # Chromium present: the page was loaded and photographed
        assert page["ready_ms"]["count"] == 2 and page["queue_items_listed"] == 60 - 6
        with Image.open(shot) as img:
            assert img.format == "PNG"
    table = (out / "results.md").read_text()
    assert "60 results in the store" in table and "Review server memory" in table
