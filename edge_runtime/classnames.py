"""Class names: one rule for every place a class name enters (a bundle's manifest, the training config, the
reviews in a result database).

Class names become folder names (export-labels writes OUT/CLASS/..., `train prepare` reads class folders),
database values, HTML text and CSV cells, so one is a short identifier: a lowercase ASCII letter, then at most
31 lowercase letters, digits, '_' or '-' (`clean`, `bridges`, `malformed_via`). A name that passes is a single
path component that cannot climb (`..`, `/`), is never absolute or hidden, holds no control character and never
starts like a spreadsheet formula.
"""
from __future__ import annotations

import re

CLASS_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
RULE = "a lowercase letter, then at most 31 lowercase letters, digits, '_' or '-'"


class ClassNameError(ValueError):
    """A class name that breaks the rule; the message names where it came from."""


def check_class_name(name, where: str = "class name") -> str:
    if not isinstance(name, str) or not CLASS_NAME.fullmatch(name):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise ClassNameError(f"{where}: {shown} is not a class name ({RULE})")
    return name
