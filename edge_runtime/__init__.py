"""The board runtime: bundle.py (the one bundle reader) -> preprocess.py (the one preprocessing) ->
interpreter.py (LiteRT / tflite-runtime) -> gate.py (the one gate rule) -> inspector.py (two-stage inspection);
with digest, safeopen, names, inputs and exits. It needs only a TFLite interpreter, numpy, Pillow and PyYAML,
and imports nothing from the sub-packages around it (config, db, service, fleet, review, collect): the layering
is in pyproject.toml ([tool.importlinter]) and docs/architecture.md."""
