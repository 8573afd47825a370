"""Deprecated: python -m edge_runtime.collect runs python -m central (the collector)."""
from edge_runtime.collect import run_moved

run_moved("edge_runtime.collect", "central")
