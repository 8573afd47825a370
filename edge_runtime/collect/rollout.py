"""Deprecated: python -m edge_runtime.collect.rollout runs python -m central.rollout."""
if __name__ == "__main__":
    from edge_runtime.collect import run_moved

    run_moved("edge_runtime.collect.rollout", "central.rollout")
