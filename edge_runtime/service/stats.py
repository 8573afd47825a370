"""The watch service's counters: totals for the final line, and counts since the last periodic summary."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass


@dataclass
class Counts:
    inspected: int = 0
    clean: int = 0
    defective: int = 0
    review: int = 0
    quarantined: int = 0
    recovered: int = 0
    latency_ms: float = 0.0

    def line(self) -> str:
        mean = self.latency_ms / self.inspected if self.inspected else 0.0
        return (f"{self.inspected} inspected (clean {self.clean}, defective {self.defective}, review {self.review}), "
                f"{self.quarantined} quarantined, {self.recovered} recovered; mean {mean:.1f} ms/image")

    def __bool__(self) -> bool:
        return bool(self.inspected or self.quarantined or self.recovered)


class ServiceStats:
    def __init__(self):
        self.total = Counts()
        self.recent = Counts()      # since the last summary
        self.last_at: float | None = None      # time.time() of the last committed result
        self.listeners = []                     # called with each committed row (e.g. the Prometheus metrics)

    def as_dict(self) -> dict:
        return asdict(self.total)

    def count(self, row: dict) -> None:
        """One committed result row (store.COLUMNS)."""
        self.last_at = time.time()
        for listener in self.listeners:
            listener(row)
        for c in (self.total, self.recent):
            if row["outcome"] == "quarantined":
                c.quarantined += 1
                continue
            c.inspected += 1
            c.latency_ms += row["latency_ms"]
            if row["defect_class"]:
                c.defective += 1
                c.review += bool(row["review"])
            else:
                c.clean += 1

    def recovered(self) -> None:
        """An image recorded before an interruption whose move was finished now."""
        self.total.recovered += 1
        self.recent.recovered += 1

    def take_recent(self) -> Counts:
        """The counts since the last call, starting a new period."""
        recent, self.recent = self.recent, Counts()
        return recent


def rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None
