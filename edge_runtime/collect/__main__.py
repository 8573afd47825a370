"""python -m edge_runtime.collect: the central collector (edge_runtime/collect/collector.py)."""
import sys

from edge_runtime.collect.collector import main

sys.exit(main())
