"""`python -m benchmarks`: what LiteRT's benchmark_model measures, from Python, for every stage, variant,
runtime and thread count of a bundle, plus the two-stage pipeline end to end at several defect prevalences.

Thin entry point (cli.py) over single-purpose modules:
    worker.py     one measurement in a fresh process (honest, isolated RSS), JSON in a result file
    stats.py      latency summaries (mean, p50, p90, p99, throughput)
    macs.py       multiply-accumulates counted from the TFLite graph (roofline)
    machine.py    CPU model, cores, flags, versions; nominal peak MAC/s estimate
    streams.py    labelled image discovery and prevalence-mixed streams
    costmodel.py  two-stage vs single-model cost and the break-even prevalence
    schema.py     the results.json schema (TypedDicts) shared by cli.py, worker.py and report.py
    report.py     results.json, results.md and PNG plots
"""
