"""Two-stage gate vs one 8-class model: the cost model and its break-even prevalence.

    single model   cost = pre + S                          (one Stage-2-sized invoke per image: same backbone,
                                                            8-way head instead of 7-way; the head is negligible)
    two stages     cost = pre + G + P(flagged) * S2
                   P(flagged) = prevalence * recall + (1 - prevalence) * false_positive_rate

pre = decode + preprocessing, G = Stage-1 (gate) invoke, S2 = Stage-2 invoke, all measured in the same run.
The gate pays (is cheaper) below the break-even prevalence
    p* = (S - G - fpr * S2) / ((recall - fpr) * S2).
When the two sides preprocess differently (format-/2 stages of different input sizes: the single model resizes
to Stage 2's input, the gate to Stage 1's), break_even takes each side's preprocessing folded in: G = pre1 + G,
S = pre2 + S (benchmarks.rows.gate_cost). recall and fpr are the gate's as measured on labelled images
(benchmarks.rows.gate_cost); recall 1 and fpr 0 is a perfect gate.
"""
from __future__ import annotations


def flagged_fraction(prevalence: float, recall: float = 1.0, fpr: float = 0.0) -> float:
    return prevalence * recall + (1.0 - prevalence) * fpr


def two_stage_ms(pre_ms: float, gate_ms: float, stage2_ms: float, prevalence: float,
                 recall: float = 1.0, fpr: float = 0.0) -> float:
    return pre_ms + gate_ms + flagged_fraction(prevalence, recall, fpr) * stage2_ms


def single_model_ms(pre_ms: float, single_ms: float) -> float:
    return pre_ms + single_ms


def break_even(gate_ms: float, stage2_ms: float, single_ms: float, recall: float = 1.0, fpr: float = 0.0) -> dict:
    """Prevalence below which the two-stage pipeline is cheaper than one model, and what that means.

    two-stage - single = a + b x prevalence, a = G + fpr x S2 - S (at prevalence 0), b = (recall - fpr) x S2."""
    a = gate_ms + fpr * stage2_ms - single_ms
    b = (recall - fpr) * stage2_ms
    if b <= 0:          # the gate does not flag defective images more often than clean ones
        blind = f"the gate does not tell defective from clean images (recall {recall:.3f}, false-positive rate {fpr:.3f})"
        if a < 0 and a + b < 0:
            return {"prevalence": None, "pays_below": 1.0, "verdict": f"always cheaper, but {blind}"}
        if a >= 0 and a + b >= 0:
            return {"prevalence": None, "pays_below": 0.0, "verdict": f"never pays: {blind}"}
        p = (single_ms - gate_ms - fpr * stage2_ms) / b
        return {"prevalence": p, "pays_below": 0.0, "verdict": f"cheaper only above {100 * p:.1f}%: {blind}"}
    p = (single_ms - gate_ms - fpr * stage2_ms) / b      # = -a / b
    if p <= 0:
        what = "the gate alone costs" if fpr == 0 else "the gate and the clean images it flags cost"
        return {"prevalence": p, "pays_below": 0.0, "verdict": f"never pays: {what} as much as the single model"}
    if p >= 1:
        return {"prevalence": p, "pays_below": 1.0, "verdict": "always pays (cheaper at every prevalence)"}
    return {"prevalence": p, "pays_below": p,
            "verdict": f"pays below {100 * p:.1f}% defect prevalence"}


def curve(pre_ms: float, gate_ms: float, stage2_ms: float, single_ms: float, prevalences,
          recall: float = 1.0, fpr: float = 0.0) -> list[dict]:
    return [{"prevalence": p,
             "two_stage_ms": two_stage_ms(pre_ms, gate_ms, stage2_ms, p, recall, fpr),
             "single_model_ms": single_model_ms(pre_ms, single_ms)} for p in prevalences]
