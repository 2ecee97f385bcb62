"""The cyclic garbage collector under an engine that holds millions of long-lived objects.

A dispatcher keeps every run's arrays, job states, names and attempts for hours; Python's collector
walks all of them again each time enough young objects were made, and garbage in the engine is
almost all freed by reference counting anyway. Measured on the campaign simulation (100 campaigns,
3x10^5 jobs): a third of the loop's time was the collector. So while an engine loop runs, what was
loaded is frozen out of collection (``settle``: after a run is opened) and young collections are
rarer; cycles still are collected, the thresholds are restored after.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

#: (gen0 allocations, gen1, gen2 collections) while an engine loop runs; Python's default is 700, 10, 10
ENGINE_THRESHOLDS = (50_000, 20, 100)

_depth = 0


@contextlib.contextmanager
def long_lived() -> Iterator[None]:
    """While an engine loop runs: collect young objects less often (process-wide, restored after)."""
    global _depth
    old = gc.get_threshold()
    _depth += 1
    if _depth == 1:
        gc.set_threshold(*ENGINE_THRESHOLDS)
    try:
        settle()
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            gc.set_threshold(*old)
            gc.unfreeze()


def settle() -> None:
    """Inside :func:`long_lived`: everything alive now (a run just opened: its graph, workflow and job
    states) is long-lived; keep the collector from walking it again."""
    if _depth:
        gc.freeze()
