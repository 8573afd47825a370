"""edge-inspect's output: one JSON line per image."""
from __future__ import annotations

import json
from pathlib import Path


def rows_by_name(stdout: str) -> dict[str, dict]:
    """edge-inspect's JSON lines by the image's file name."""
    rows = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    return {Path(r["path"]).name: r for r in rows}
