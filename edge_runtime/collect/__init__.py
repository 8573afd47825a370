"""The central side, not a board: `python -m edge_runtime.collect` subscribes to every board's results over
MQTT and stores them once each (collector.py: the MQTT side; schema.py: what a result must look like;
storage.py: where results, dead letters and conflicts are kept)."""
