#!/usr/bin/env python3
"""Print what a board gets of what pyproject.toml packages (plus pyproject.toml and the readme), one per line.

Used by install.sh and bench-on-device.sh so a board only ever receives the packaged source: no data, no runs,
and not the central side (the collector, its API and the rollout publisher run on a server, never on a board).
"""
import sys

FIXED_LAYOUT = ["README.md", "benchmarks", "convert", "edge_runtime", "pyproject.toml", "train"]
NOT_ON_A_BOARD = {"central"}

try:
    import tomllib
except ImportError:  # Python < 3.11 on the machine copying the files: the layout is fixed anyway
    print("\n".join(FIXED_LAYOUT))
    sys.exit(0)

with open(sys.argv[1], "rb") as fh:
    project = tomllib.load(fh)
items = {"pyproject.toml"}
readme = project.get("project", {}).get("readme")
if isinstance(readme, str):
    items.add(readme)
# packages.find's include patterns ("edge_runtime*") name the top-level package folders
found = project.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {}).get("include", [])
items.update(pattern.rstrip("*").rstrip(".") for pattern in found)
items -= NOT_ON_A_BOARD
print("\n".join(sorted(items)))
