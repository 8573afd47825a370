"""Reviews that disagree: the same image content (sha256) under two or more labels.

One image cannot teach two classes, and which review is right is for an operator to say, not for the code to
guess. So every consumer of labels (the review page's list, `edge-inspect export-labels`, `edge-inspect adapt`
and `python -m train adapt`) applies this one rule: every copy of a content whose labels disagree is left out,
and named; the copies of a content that agree, and all other images, are kept. An operator settles a conflict
by reviewing one of the copies again (its new review supersedes the old one); once the labels agree the copies
are used again. Items without a content hash (none recorded) cannot be compared and are kept.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, TypeVar

T = TypeVar("T")
PREFIX = 16            # hex digits of a sha256 shown to people

Conflicts = dict[str, list[tuple[Any, str]]]   # sha256 -> [(id, label), ...], two or more distinct labels


def split_conflicts(items: Iterable[T], key: Callable[[T], tuple[str | None, str, Any]] = lambda item: item
                    ) -> tuple[list[T], Conflicts]:
    """The items kept (in their order) and the conflicts. `key(item)` gives (content sha256, label, id)."""
    items = list(items)
    by_content: dict[str, list[tuple[Any, str]]] = {}
    for item in items:
        digest, label, ident = key(item)
        if digest:
            by_content.setdefault(digest, []).append((ident, label))
    conflicts = {digest: seen for digest, seen in by_content.items() if len({label for _, label in seen}) > 1}
    return [item for item in items if key(item)[0] not in conflicts], conflicts


def conflicts_report(conflicts: Conflicts) -> dict:
    """What a report says about the images left out: how many contents and images, and per content its
    sha256 and each copy's id and label."""
    return {"conflicts": len(conflicts), "images": sum(len(seen) for seen in conflicts.values()),
            "items": [{"sha256": digest, "images": [{"id": ident, "label": label} for ident, label in seen]}
                      for digest, seen in sorted(conflicts.items())]}


def describe(digest: str, seen: list[tuple[Any, str]], name: Callable[[Any], str] = str) -> str:
    """One line for people: the content and each copy's label."""
    labels = ", ".join(f"{label!r} ({name(ident)})" for ident, label in seen)
    return f"the same image (sha256 {digest[:PREFIX]}...) is labelled {labels}"
