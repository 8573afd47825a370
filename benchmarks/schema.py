"""The results.json schema (format sem-inspect-benchmark/1), shared by the writer (runners.py and rows.py, from
the workers' results), the report (report.py: results.md) and the plots.

TypedDicts, so results.json stays plain JSON; `problems(results)` checks a loaded or freshly built document
against them with the one strict-document reader (every required key present, no undeclared key, types,
nested rows included): report.py refuses a results.json that does not match, and the tests check what the
writer produces.
"""
# no `from __future__ import annotations` here: TypedDict needs NotRequired evaluated
from typing import Any, NotRequired, TypedDict

from edge_runtime import strict

FORMAT = "sem-inspect-benchmark/1"


class Latency(TypedDict):            # benchmarks.stats.summarize
    count: int
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    throughput_ips: float


class Macs(TypedDict):               # benchmarks.macs.count_macs
    macs: int
    gmac: float
    by_op: dict[str, int]
    counted_ops: dict[str, int]
    uncounted_ops: dict[str, int]


class PeakEstimate(TypedDict):
    macs_per_cycle: dict[str, Any]
    basis: str
    note: str


class Machine(TypedDict):            # benchmarks.machine.describe_machine
    date: str
    hostname: str
    cpu_model: str
    cpu_mhz: float | None
    cores: int
    architecture: str
    os: str
    python: str
    memory_gb: float | None
    isa_flags: list[str]
    load_average_at_start: list[float] | None
    versions: dict[str, str]
    peak_estimate: PeakEstimate
    load_average_at_end: NotRequired[list[float] | None]


class Settings(TypedDict):
    bundle: str
    variants: list[str]
    threads: list[int]
    runtimes: list[str]
    prevalences: list[float]
    runs: int
    max_seconds: float
    stream_length: int
    images: str | None
    keras_run: str | None
    seed: int
    command: str
    gate_images: NotRequired[int]    # 0: the gate was measured on every labelled image


class BundleInfo(TypedDict):
    path: str
    image_size: list[int]                        # the largest stage input (what an image is decoded for)
    backbones: dict[str, str]
    variants: list[str]
    stage1_threshold: float
    stage2_classes: list[str]
    source_run: str | None
    format: NotRequired[str]                     # sem-inspect-bundle/1 or /2
    image_sizes: NotRequired[dict[str, list[int]]]     # {"1": [h, w], "2": [h, w]}: each stage's input
    stage_classes: NotRequired[dict[str, list[str]]]   # what each stage's probabilities are over


class Runtime(TypedDict):
    status: str                      # ok | not installed | skipped
    version: NotRequired[str]
    reason: NotRequired[str]
    run: NotRequired[str]


class Images(TypedDict):
    status: str                      # ok | skipped
    reason: NotRequired[str]
    source: NotRequired[str]
    clean: NotRequired[int]
    defective: NotRequired[int]
    unmapped_folders: NotRequired[dict[str, int]]
    skipped_prevalences: NotRequired[dict[str, str]]


class StageRow(TypedDict):           # one stage x variant x runtime x threads, alone in a fresh process
    stage: int
    variant: str
    runtime: str
    threads: int
    model: str
    model_mb: float | None
    status: str                      # ok | not installed | error
    reason: NotRequired[str]
    runtime_version: NotRequired[str]
    import_ms: NotRequired[float]
    init_ms: NotRequired[float]
    first_ms: NotRequired[float]
    warmup_runs: NotRequired[int]
    warmup_mean_ms: NotRequired[float | None]
    rss_after_import_mb: NotRequired[float | None]
    rss_after_init_mb: NotRequired[float | None]
    peak_rss_mb: NotRequired[float | None]
    input: NotRequired[dict[str, Any]]
    cpu_per_wall: NotRequired[float | None]
    cpu_ms_per_run: NotRequired[float | None]
    load_average: NotRequired[list[float] | None]
    latency: NotRequired[Latency]
    latencies_ms: NotRequired[list[float]]
    macs: NotRequired[Macs]
    gmac: NotRequired[float]                 # added by the roofline
    achieved_gmacs: NotRequired[float]
    peak_gmacs_estimate: NotRequired[float]
    pct_of_peak_estimate: NotRequired[float]


class Speedup(TypedDict):
    stage: int
    threads: int
    config: str
    baseline: str
    speedup: float


class LightGate(TypedDict):
    status: str                      # ok | skipped | error
    reason: NotRequired[str]
    source: NotRequired[str]
    model: NotRequired[str]
    from_bundle: NotRequired[bool]
    rows: NotRequired[list[StageRow]]


class PairedRun(TypedDict):          # Stage 1, Stage 2 (and the light gate) invoked in turn in one process
    variant: str
    runtime: str
    threads: int
    status: str
    reason: NotRequired[str]
    rounds: NotRequired[int]
    load_average: NotRequired[list[float] | None]
    latency: NotRequired[dict[str, Latency]]     # stage1, stage2, light_gate


class PrevalenceSummary(TypedDict):  # one prevalence stream of one pipeline run
    prevalence: float
    images: int
    failures: list[dict[str, str]]
    defective_fraction: float
    flagged_fraction: float
    gate_recall: float | None
    gate_fpr: float | None
    latency: Latency
    latencies_ms: list[float]
    preprocess_ms: float
    stage1_ms: float
    stage2_ms: float | None
    clean_path_ms: float | None
    flagged_path_ms: float | None
    stream_throughput_ips: float | None
    cpu_per_wall: float | None
    load_average: list[float] | None
    cpu_ms_per_image: float | None
    cost_model_ms: NotRequired[float]


class PipelineRun(TypedDict):        # end to end, one worker per variant x runtime x threads
    variant: str
    runtime: str
    threads: int
    status: str
    reason: NotRequired[str]
    runtime_version: NotRequired[str]
    init_ms: NotRequired[float]
    rss_after_import_mb: NotRequired[float | None]
    rss_after_init_mb: NotRequired[float | None]
    peak_rss_mb: NotRequired[float | None]
    summary: NotRequired[list[PrevalenceSummary]]


class BreakEven(TypedDict):          # benchmarks.costmodel.break_even
    prevalence: float | None
    pays_below: float
    verdict: str


class CurvePoint(TypedDict):         # benchmarks.costmodel.curve
    prevalence: float
    two_stage_ms: float
    single_model_ms: float


class SameNetwork(TypedDict):
    gmac: float
    note: str


class LightGateCost(TypedDict):
    gate_ms: float
    source: str
    break_even: BreakEven
    curve: list[CurvePoint]


class MeasuredPoint(TypedDict):
    prevalence: float
    flagged_fraction: float
    mean_ms: float
    cost_model_ms: float | None


class CostModel(TypedDict):          # gate vs one 8-class model, per runtime x variant x threads
    runtime: str
    variant: str
    threads: int
    preprocess_ms: float
    preprocess_measured: bool
    gate_ms: float
    stage2_ms: float
    single_ms: float
    estimator: str
    rounds: int
    break_even: BreakEven
    curve: list[CurvePoint]
    gate_recall: NotRequired[float]          # the gate the curve and break-even assume (absent: a perfect gate,
    gate_fpr: NotRequired[float]             # recall 1 and no false positives)
    gate_source: NotRequired[str]
    same_network: NotRequired[SameNetwork]
    light_gate: NotRequired[LightGateCost]
    measured: NotRequired[list[MeasuredPoint]]


class GateMedians(TypedDict):        # medians over the labelled images of one gate pass, ms
    decode: float
    resize1: float                   # to Stage 1's input
    stage1: float                    # Stage-1 backbone + head (+ the P(defective) score)
    resize2: float | None            # to Stage 2's input (None: same size, the Stage-1 pixels are reused)
    stage2: float                    # Stage-2 backbone + head


class GateCostRow(TypedDict):        # one prevalence of the two-stage vs one-model table
    prevalence: float
    flagged_fraction: float          # prevalence * recall + (1 - prevalence) * fpr, the gate as measured
    two_stage_ms: float              # preprocess_ms + stage1_ms + flagged_fraction * stage2_ms
    single_ms: float                 # single_preprocess_ms + single_model_ms
    ratio: float                     # two_stage_ms / single_ms


class GateCost(TypedDict):           # the bundle's gate measured on the labelled images, per variant x runtime x threads
    variant: str
    runtime: str
    threads: int
    status: str                      # ok | skipped | not installed | error
    reason: NotRequired[str]
    runtime_version: NotRequired[str]
    threshold: NotRequired[float]
    sizes: NotRequired[dict[str, list[int]]]
    images: NotRequired[int]
    clean: NotRequired[int]
    defective: NotRequired[int]
    failures: NotRequired[list[dict[str, str]]]
    recall: NotRequired[float]       # defective images flagged / defective images
    fpr: NotRequired[float]          # clean images flagged / clean images
    medians_ms: NotRequired[GateMedians]
    preprocess_ms: NotRequired[float]         # two-stage: decode + resize1
    stage1_ms: NotRequired[float]             # = medians stage1
    stage2_ms: NotRequired[float]             # a flagged image's extra cost: resize2 + stage2
    single_preprocess_ms: NotRequired[float]  # one model of Stage-2 size: decode + resize to Stage 2's input
    single_model_ms: NotRequired[float]       # = medians stage2
    rows: NotRequired[list[GateCostRow]]
    break_even: NotRequired[BreakEven]        # with the measured recall and fpr


class Results(TypedDict):
    format: str
    machine: Machine
    settings: Settings
    bundle: BundleInfo
    runtimes: dict[str, Runtime]
    images: Images
    stages: list[StageRow]
    pipeline: list[PipelineRun]
    notes: list[str]
    speedups: NotRequired[list[Speedup]]
    light_gate: NotRequired[LightGate]
    paired: NotRequired[list[PairedRun]]
    cost_models: NotRequired[list[CostModel]]
    gate_costs: NotRequired[list[GateCost]]
    elapsed_s: NotRequired[float]


# ---- what a worker (benchmarks.worker) returns to its runner, through its result file ---------------------
class StageResult(TypedDict):        # mode "stage"
    status: str                      # ok | not installed | error
    reason: NotRequired[str]
    traceback: NotRequired[str]
    runtime_version: NotRequired[str]
    import_ms: NotRequired[float]
    init_ms: NotRequired[float]
    first_ms: NotRequired[float]
    warmup_runs: NotRequired[int]
    warmup_mean_ms: NotRequired[float]
    latencies_ms: NotRequired[list[float]]
    input: NotRequired[dict[str, Any]]
    rss_after_import_mb: NotRequired[float | None]
    rss_after_init_mb: NotRequired[float | None]
    rss_end_mb: NotRequired[float | None]
    peak_rss_mb: NotRequired[float | None]
    cpu_per_wall: NotRequired[float | None]
    load_average: NotRequired[list[float] | None]
    cpu_ms_per_run: NotRequired[float | None]
    macs: NotRequired[Macs]


class ImageRecord(TypedDict):        # one image of a pipeline stream
    preprocess_ms: float
    stage1_ms: float
    stage2_ms: float | None          # None: Stage 1 called it clean
    latency_ms: float
    defective: bool                  # its true label
    flagged: bool                    # sent on to Stage 2


class StreamResult(TypedDict):
    images: int
    requested: int
    failures: list[dict[str, str]]
    wall_s: float
    records: list[ImageRecord]
    cpu_per_wall: float | None
    load_average: list[float] | None


class PipelineResult(TypedDict):     # mode "pipeline"
    status: str
    reason: NotRequired[str]
    traceback: NotRequired[str]
    runtime_version: NotRequired[str]
    init_ms: NotRequired[float]
    rss_after_import_mb: NotRequired[float | None]
    rss_after_init_mb: NotRequired[float | None]
    rss_end_mb: NotRequired[float | None]
    peak_rss_mb: NotRequired[float | None]
    prevalences: NotRequired[dict[str, StreamResult]]


class GateRecord(TypedDict):         # one labelled image of a gate pass
    score: float                     # Stage 1's P(defective)
    decode_ms: float
    resize1_ms: float
    stage1_ms: float
    resize2_ms: float | None
    stage2_ms: float
    defective: bool                  # its true label
    flagged: bool                    # the gate's decision at the bundle's threshold


class GateResult(TypedDict):         # mode "gate"
    status: str
    reason: NotRequired[str]
    traceback: NotRequired[str]
    runtime_version: NotRequired[str]
    threshold: NotRequired[float]
    sizes: NotRequired[dict[str, list[int]]]
    records: NotRequired[list[GateRecord]]
    failures: NotRequired[list[dict[str, str]]]
    load_average: NotRequired[list[float] | None]


class PairedResult(TypedDict):       # mode "paired"
    status: str
    reason: NotRequired[str]
    traceback: NotRequired[str]
    rounds: NotRequired[int]
    latencies_ms: NotRequired[dict[str, list[float]]]
    load_average: NotRequired[list[float] | None]


# ---- checking a document against the schema (edge_runtime/strict.py) -------------------------------------
def problems(document: dict, schema=Results) -> list[str]:
    """Where `document` departs from `schema` (empty when it matches): keys at every level (no undeclared key),
    types and the list/object shape of nested rows."""
    out: list[str] = []
    if schema is Results and document.get("format") != FORMAT:
        out.append(f"format: {document.get('format')!r}, expected {FORMAT!r}")
    return out + strict.problems(document, schema, root=schema.__name__)
