"""Retry policy, declared once and applied by every backend.

* ``user_error`` / ``timeout``: retry while the budget (``numberOfRetries``) lasts;
* ``oom``: retry with ``requestMemory x memoryMultiplier`` (capped by ``memoryLimit``, else the
  site's memory); at the cap it fails for good, saying so;
* ``killed``: retry without spending the budget, at most ``maxPreemptions`` times;
* ``infrastructure``: retry with exponential back-off (``infraRetryDelay`` doubling, capped at
  ``MAX_BACKOFF``) up to ``maxInfraRetries`` times, without spending the budget, so an outage of
  minutes does not burn every retry in seconds;
* ``cancelled``: never retried.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from batchprod.execution.states import FailureClass
from batchprod.workflow.generic import Resources

MAX_BACKOFF = 900.0  # seconds


@dataclass
class JobCounters:
    """What a job has used since its budget was last reset (submit or restart)."""

    retries: int = 0
    preemptions: int = 0
    infra: int = 0


@dataclass(frozen=True)
class Decision:
    retry: bool
    reason: str
    memory: int  # MB for the next attempt (or the current one if not retried)
    delay: float = 0.0  # seconds to wait before the next attempt


def decide(
    fclass: FailureClass,
    res: Resources,
    counters: JobCounters,
    memory: int,
    site_memory: int,
    exit_code: int | None = None,
) -> Decision:
    """What to do after a failed attempt; updates ``counters`` for a retry."""
    if fclass == FailureClass.CANCELLED:
        return Decision(False, "cancelled", memory)
    if fclass == FailureClass.USER_ERROR and exit_code is not None and exit_code in res.retry_unless_exit:
        return Decision(False, f"exit code {exit_code} is one of retryUnlessExit; not retried", memory)
    if fclass == FailureClass.KILLED:
        if counters.preemptions < res.max_preemptions:
            counters.preemptions += 1
            return Decision(True, f"killed (preemption {counters.preemptions}/{res.max_preemptions}, budget kept)", memory)
        return Decision(False, f"killed {counters.preemptions + 1} times (maxPreemptions={res.max_preemptions})", memory)
    if fclass == FailureClass.INFRASTRUCTURE:
        if counters.infra < res.max_infra_retries:
            counters.infra += 1
            delay = min(MAX_BACKOFF, res.infra_retry_delay * 2 ** (counters.infra - 1))
            return Decision(True, f"infrastructure failure {counters.infra}/{res.max_infra_retries}, "
                                  f"retry in {delay:.0f}s", memory, delay)
        return Decision(False, f"infrastructure failed {counters.infra + 1} times (maxInfraRetries={res.max_infra_retries})",
                        memory)
    cap = res.memory_limit or site_memory
    if counters.retries >= res.number_of_retries:
        # an OOM still teaches the job to ask for more next time (e.g. after a restart)
        learned = min(cap, math.ceil(memory * res.memory_multiplier)) if fclass == FailureClass.OOM else memory
        return Decision(False, f"{fclass}: retries exhausted ({res.number_of_retries})", max(memory, learned))
    if fclass == FailureClass.OOM:
        if memory >= cap or res.memory_multiplier <= 1.0:
            why = f"at memory cap {cap} MB" if memory >= cap else "memoryMultiplier is 1"
            return Decision(False, f"oom with requestMemory {memory} MB ({why}); not retried", memory)
        counters.retries += 1
        new = min(cap, math.ceil(memory * res.memory_multiplier))
        return Decision(True, f"oom at {memory} MB; retry {counters.retries}/{res.number_of_retries} with {new} MB", new)
    counters.retries += 1
    return Decision(True, f"{fclass}; retry {counters.retries}/{res.number_of_retries}", memory)
