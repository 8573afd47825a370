"""The central side, never installed on a board: `python -m central` (sem-collect) subscribes to every board's
results over MQTT and stores them once each; `python -m central.api` (sem-central-api) serves them read-only;
`python -m central.rollout` (sem-rollout) packs, publishes and rolls back bundles. The messages it reads are the
board's wire contract, edge_runtime/fleet/messages.py."""
