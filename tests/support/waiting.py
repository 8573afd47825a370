"""Waiting for a state, not for a time: poll until it holds, with a deadline generous enough for a loaded
machine, and on expiry fail with what was last seen."""
from __future__ import annotations

import inspect
import time
from typing import Any, Callable

DEFAULT_TIMEOUT_S = 60.0
SHOWN_CHARS = 3000          # of a long state (a log): its end


def _what(predicate: Callable) -> str:
    """The predicate's source when it is a lambda (one line of it), else its name."""
    name = getattr(predicate, "__name__", repr(predicate))
    if name != "<lambda>":
        return name
    try:
        source = " ".join(inspect.getsource(predicate).split())
    except (OSError, TypeError):
        return name
    start = source.find("lambda")
    return source[start:start + 200] if start >= 0 else source[:200]


def wait_until(predicate: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT_S,
               describe: Callable[[], Any] | str | None = None, step: float = 0.05) -> Any:
    """Poll predicate() every `step` seconds until it returns a true value, which is returned. After `timeout`
    seconds the test fails, naming what it waited for, the predicate's last value and describe() (or describe,
    a string): the state it saw last (a log's tail, the rows so far)."""
    __tracebackhide__ = True
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(step)
    seen = describe() if callable(describe) else describe
    if isinstance(seen, str) and len(seen) > SHOWN_CHARS:
        seen = "..." + seen[-SHOWN_CHARS:]
    message = f"waited {timeout:g} s for {_what(predicate)}: last value {value!r}"
    if seen is not None:
        message += f"; last seen: {seen if isinstance(seen, str) else repr(seen)}"
    raise AssertionError(message)
