"""Two-stage gate vs one 8-class model: the cost model and its break-even prevalence.

    single model   cost = pre + S                          (one Stage-2-sized invoke per image: same backbone,
                                                            8-way head instead of 7-way; the head is negligible)
    two stages     cost = pre + G + P(flagged) * S2
                   P(flagged) = prevalence * recall + (1 - prevalence) * false_positive_rate

pre = decode + preprocessing, G = Stage-1 (gate) invoke, S2 = Stage-2 invoke, all measured in the same run.
The gate pays (is cheaper) below the break-even prevalence
    p* = (S - G - fpr * S2) / ((recall - fpr) * S2).
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
    """Prevalence below which the two-stage pipeline is cheaper than one model, and what that means."""
    slope = (recall - fpr) * stage2_ms
    if slope <= 0:
        p = None
    else:
        p = (single_ms - gate_ms - fpr * stage2_ms) / slope
    if p is None or p <= 0:
        verdict = "never pays: the gate alone costs as much as the single model" if (p is not None and p <= 0) \
            else "undefined (gate never sends images on)"
        return {"prevalence": p, "pays_below": 0.0, "verdict": verdict}
    if p >= 1:
        return {"prevalence": p, "pays_below": 1.0, "verdict": "always pays (cheaper at every prevalence)"}
    return {"prevalence": p, "pays_below": p,
            "verdict": f"pays below {100 * p:.1f}% defect prevalence"}


def curve(pre_ms: float, gate_ms: float, stage2_ms: float, single_ms: float, prevalences,
          recall: float = 1.0, fpr: float = 0.0) -> list[dict]:
    return [{"prevalence": p,
             "two_stage_ms": two_stage_ms(pre_ms, gate_ms, stage2_ms, p, recall, fpr),
             "single_model_ms": single_model_ms(pre_ms, single_ms)} for p in prevalences]
