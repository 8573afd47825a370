"""Class names: one rule for every place a class name enters (a bundle's manifest, the training config, the
reviews in a result database), and the taxonomy rule (check_taxonomy).

Class names become folder names (export-labels writes OUT/CLASS/..., `train prepare` reads class folders),
database values, HTML text and CSV cells, so one is a short identifier: a lowercase ASCII letter, then at most
31 lowercase letters, digits, '_' or '-' (`clean`, `bridges`, `malformed_via`). A name that passes is a single
path component that cannot climb (`..`, `/`), is never absolute or hidden, holds no control character and never
starts like a spreadsheet formula.
"""
from __future__ import annotations

import re

from edge_runtime.strict import Text

CLASS_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
RULE = "a lowercase letter, then at most 31 lowercase letters, digits, '_' or '-'"


class ClassNameError(ValueError):
    """A class name that breaks the rule; the message names where it came from."""


def check_class_name(name, where: str = "class name") -> str:
    if not isinstance(name, str) or not CLASS_NAME.fullmatch(name):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise ClassNameError(f"{where}: {shown} is not a class name ({RULE})")
    return name


def _rule(name, where):
    check_class_name(name, where)


# A class name in a strict document (edge_runtime/strict.py).
CLASS = Text(rule=_rule, describe=f"a class name ({RULE})")
DEFECTIVE = ("defective",)      # Stage 1 as one sigmoid unit: P(defective)


def check_taxonomy(taxonomy, stage2_classes, stage1_classes=DEFECTIVE, where: str = "") -> None:
    """The taxonomy rule, for every document that carries one (a bundle's manifest, a run's run.json, the training
    config): the taxonomy is at least two distinct class names, clean first; stage2_classes are distinct defect
    classes of it (the order of the Stage-2 outputs); Stage 1 outputs [defective] or taxonomy classes including
    clean. ClassNameError naming `where` and the key otherwise."""
    at = f"{where}: " if where else ""
    for key, names in (("taxonomy", taxonomy), ("stage2_classes", stage2_classes), ("stage1_classes", stage1_classes)):
        if not isinstance(names, (list, tuple)):
            raise ClassNameError(f"{at}{key} must be a list of class names, got {type(names).__name__}")
        for i, name in enumerate(names):
            check_class_name(name, f"{at}{key}[{i}]")
    taxonomy, stage2, stage1 = list(taxonomy), list(stage2_classes), list(stage1_classes)
    if len(taxonomy) < 2 or len(set(taxonomy)) != len(taxonomy):
        raise ClassNameError(f"{at}taxonomy must be at least two distinct class names, clean first, got {taxonomy}")
    if not stage2 or len(set(stage2)) != len(stage2) or not set(stage2) <= set(taxonomy[1:]):
        raise ClassNameError(f"{at}stage2_classes {stage2} must be distinct defect classes from the taxonomy "
                             f"{taxonomy[1:]}")
    if stage1 != list(DEFECTIVE) and (taxonomy[0] not in stage1 or not set(stage1) <= set(taxonomy)
                                      or len(set(stage1)) != len(stage1)):
        raise ClassNameError(f"{at}Stage-1 classes must be [defective] or taxonomy classes including "
                             f"{taxonomy[0]!r}, got {stage1}")
