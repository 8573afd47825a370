"""The central side, not a board: `python -m edge_runtime.collect` subscribes to every board's results over
MQTT and stores them once each (collector.py)."""
