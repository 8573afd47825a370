"""The service's one validated configuration (service_config.py): every setting defined once, with its flag,
check, default and line in service.example.yaml. Used by the watch service, the fleet and edge-inspect's flags."""
