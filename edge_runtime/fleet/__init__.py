"""Fleet integration of one board: MQTT publishing from the store (publisher.py), the HTTP API (http_api.py:
/healthz, /metrics, /results, POST /inspect) with Prometheus metrics (metrics.py), and the request handling
every HTTP server of the project shares (http_base.py). Needs the optional `fleet` extra (paho-mqtt,
prometheus-client) only when MQTT or HTTP is configured."""
