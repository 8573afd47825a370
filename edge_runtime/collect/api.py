"""Deprecated: python -m edge_runtime.collect.api runs python -m central.api."""
if __name__ == "__main__":
    from edge_runtime.collect import run_moved

    run_moved("edge_runtime.collect.api", "central.api")
