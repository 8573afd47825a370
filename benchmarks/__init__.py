"""The benchmarks (docs/benchmarks.md). `python -m benchmarks`: what LiteRT's benchmark_model measures, from
Python, for every stage, variant, runtime and thread count of a bundle, plus the two-stage pipeline end to end at
several defect prevalences. Its modules, one job each:
    cli.py        the entry point: the flags, then the runners built from the mode table, then the report
    session.py    one run's setup (bundle, variants, runtimes, labelled images and streams) and shared state
    runners.py    one runner per mode (stages, light gate, paired, end to end, the gate on labelled images,
                  cost models), each returning its part of results.json; MODES, the table cli.py runs
    rows.py       results.json entries computed from worker results (rows, roofline, speed-ups, cost models)
    worker.py     one measurement in a fresh process (honest, isolated RSS), JSON in a result file; Workers,
                  the parent's side
    stats.py      latency summaries (mean, p50, p90, p99, throughput)
    macs.py       multiply-accumulates counted from the TFLite graph (roofline)
    machine.py    CPU model, cores, flags, versions; nominal peak MAC/s estimate
    streams.py    labelled image discovery and prevalence-mixed streams
    costmodel.py  two-stage vs single-model cost and the break-even prevalence
    schema.py     the results.json schema (TypedDicts) shared by the writer, the workers and report.py
    report.py     results.json, results.md and PNG plots

The other commands, each its own module: review_page (with browser.py), watch_memory, fleet_overhead, rollout,
attack, collector_load and storage_rate; pgserver.py is the throwaway PostgreSQL the central side's tests and
benchmarks start.
"""
