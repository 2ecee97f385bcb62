from __future__ import annotations

from batchprod.execution.policy import MAX_BACKOFF, JobCounters, decide
from batchprod.execution.states import FailureClass as F
from batchprod.workflow import Resources


def test_user_error_spends_the_budget() -> None:
    r, c = Resources(number_of_retries=2), JobCounters()
    assert decide(F.USER_ERROR, r, c, 100, 1000).retry
    assert decide(F.TIMEOUT, r, c, 100, 1000).retry
    d = decide(F.USER_ERROR, r, c, 100, 1000)
    assert not d.retry and "retries exhausted" in d.reason


def test_oom_multiplies_memory_up_to_the_cap() -> None:
    r, c = Resources(number_of_retries=5, memory_multiplier=2.0, memory_limit=700), JobCounters()
    d1 = decide(F.OOM, r, c, 200, 10_000)
    d2 = decide(F.OOM, r, c, d1.memory, 10_000)
    d3 = decide(F.OOM, r, c, d2.memory, 10_000)
    assert (d1.memory, d2.memory) == (400, 700)
    assert not d3.retry and "at memory cap 700 MB" in d3.reason
    # the site memory is the cap when memoryLimit is 0
    assert decide(F.OOM, Resources(number_of_retries=1, memory_multiplier=4), JobCounters(), 300, 1000).memory == 1000


def test_oom_without_multiplier_is_not_retried_and_learning_survives_exhaustion() -> None:
    assert not decide(F.OOM, Resources(number_of_retries=3), JobCounters(), 100, 1000).retry
    d = decide(F.OOM, Resources(number_of_retries=0, memory_multiplier=3), JobCounters(), 100, 1000)
    assert not d.retry and d.memory == 300


def test_kill_keeps_the_budget_but_is_bounded() -> None:
    r, c = Resources(number_of_retries=0, max_preemptions=2), JobCounters()
    assert decide(F.KILLED, r, c, 100, 1000).retry
    assert decide(F.KILLED, r, c, 100, 1000).retry
    assert c.retries == 0
    d = decide(F.KILLED, r, c, 100, 1000)
    assert not d.retry and "maxPreemptions=2" in d.reason


def test_infrastructure_backs_off_exponentially() -> None:
    r, c = Resources(number_of_retries=0, infra_retry_delay=10, max_infra_retries=8), JobCounters()
    delays = [decide(F.INFRASTRUCTURE, r, c, 1, 1).delay for _ in range(8)]
    assert delays == [10, 20, 40, 80, 160, 320, 640, MAX_BACKOFF]
    assert sum(delays) > 600  # a ten-minute outage does not exhaust it
    assert not decide(F.INFRASTRUCTURE, r, c, 1, 1).retry
    assert decide(F.CANCELLED, r, JobCounters(), 1, 1).retry is False
