"""Which files are inputs: image files found in folders (the one-off `edge-inspect PATH...` and `convert check`),
and the names the watch service and the one-off path never inspect (hidden, editor backups, downloads in
progress)."""
from __future__ import annotations

import os
from pathlib import Path

from edge_runtime.preprocess import SUPPORTED_SUFFIXES, is_supported

TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".swp", ".download")


def is_ignored_name(name: str) -> bool:
    """Hidden, editor-backup and in-progress download names are never inspected."""
    low = name.lower()
    return name.startswith((".", "~")) or low.endswith(TEMP_SUFFIXES) or low.endswith("~")


def collect_inputs(paths: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand folders (recursively, sorted, supported image types only). Returns (files, problems)."""
    files, problems = [], []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = []
            for root, dirs, names in os.walk(path, onerror=lambda e: problems.append((e.filename, str(e)))):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found.extend(Path(root) / n for n in names if is_supported(n) and not is_ignored_name(n))
            if not found:
                problems.append((raw, f"no images found ({' '.join(SUPPORTED_SUFFIXES)})"))
            files.extend(sorted(found))
        elif path.exists():
            files.append(path)
        else:
            problems.append((raw, "no such file or folder"))
    return files, problems
