"""What the board records: the SQLite result store (store.py, schema and migrations) and the JSONL mirror
(journal.py). Written by the watch service; read by the fleet, the review page and export-labels."""
