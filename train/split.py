"""Group-aware, class-stratified, seeded train/val/test split.

Units are groups: a near-duplicate/exact-duplicate group (one label) or a single image. Per class, units are
taken largest first (ties in a seeded random order) and each goes whole to the split that is furthest below
its target count for that class. A group therefore never straddles two splits, so no near copy of a test
image can sit in train.
"""
from __future__ import annotations

import random

SPLITS = ("train", "val", "test")


def assign_splits(units: list[tuple[str, list[str]]], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """units: (label, [member keys]) -> {member key: split}. Deterministic for `seed` and the unit set."""
    total = sum(fractions[s] for s in SPLITS)
    by_label: dict[str, list[list[str]]] = {}
    for label, members in units:
        by_label.setdefault(label, []).append(sorted(members))
    assignment: dict[str, str] = {}
    for label in sorted(by_label):
        groups = sorted(by_label[label])                 # canonical order, independent of input order
        random.Random(f"{seed}:{label}").shuffle(groups)
        groups.sort(key=len, reverse=True)               # stable: ties keep the seeded order
        n = sum(len(g) for g in groups)
        target = {s: n * fractions[s] / total for s in SPLITS}
        count = dict.fromkeys(SPLITS, 0)
        for g in groups:
            split = max(SPLITS, key=lambda s: (target[s] - count[s], -SPLITS.index(s)))
            count[split] += len(g)
            for key in g:
                assignment[key] = split
    return assignment


def leaking_pairs(pairs: list[tuple[str, str]], assignment: dict[str, str]) -> list[tuple[str, str]]:
    """Pairs (both members in the split) that sit in different splits: must be empty."""
    return [(a, b) for a, b in pairs if a in assignment and b in assignment and assignment[a] != assignment[b]]
