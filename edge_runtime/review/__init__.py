"""The operator review loop: the review queue and corrections (reviews.py), the page that serves it
(server.py + page.html/.css/.js, `edge-inspect review`) and the reviewed images as training data
(export_labels.py, `edge-inspect export-labels`)."""
