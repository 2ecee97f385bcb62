"""Site health: what the dispatcher believes of a site, on evidence, and what it does about it.

States (as an operator reads them; every change carries its evidence):

``online``    takes work.
``degraded``  takes work, less of it: its recent infrastructure failure rate is over
              ``degrade_rate`` (lost, killed or infrastructure-failed attempts over the last
              ``window`` ends); it counts less in placement (its weight falls with the rate).
``draining``  a scheduled downtime starts within ``drain_horizon``: only work whose walltime ends
              before it goes there (the dispatcher's downtime rule); nothing is killed.
``down``      no new work. Evidence: its scheduler has not answered for ``unanswered_for`` seconds,
              ``submit_failures`` submissions in a row failed, ``lost_jobs`` attempts vanished in the
              window, or the failure rate reached ``down_rate``; or a scheduled downtime is in force.
              Work in flight there is re-dispatched elsewhere or held, per run (``RunDag.on_site_down``).
``probing``   after ``probe_after`` seconds down (doubling after each failed probe, up to
              ``probe_max``): one job at a time goes there; its success brings the site back
              ``online``, its failure (or no answer) sends it ``down`` again.

Payload errors (``user_error``, ``oom``, ``timeout``) say nothing of a site and are not counted; a kill
on an opportunistic site is a preemption, counted as such, not held against the site either.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from batchprod.execution.states import FailureClass


class SiteState(enum.StrEnum):
    ONLINE = "online"
    DEGRADED = "degraded"
    DRAINING = "draining"
    DOWN = "down"
    PROBING = "probing"


@dataclass(frozen=True)
class HealthPolicy:
    """Thresholds of the evidence (seconds, counts, rates)."""

    unanswered_for: float = 120.0
    submit_failures: int = 3
    lost_jobs: int = 5
    window: int = 20
    min_samples: int = 10
    degrade_rate: float = 0.3
    down_rate: float = 0.7
    probe_after: float = 60.0
    probe_max: float = 1800.0
    drain_horizon: float = 24 * 3600.0


#: failure classes held against the site an attempt ran on (not the payload's doing)
SITE_FAULTS = frozenset({FailureClass.INFRASTRUCTURE, FailureClass.KILLED})


@dataclass
class Health:
    """One site's evidence and state. The dispatcher feeds it; :meth:`evaluate` decides."""

    policy: HealthPolicy = field(default_factory=HealthPolicy)
    state: SiteState = SiteState.ONLINE
    since: float = 0.0
    evidence: str = "no evidence against it"
    unanswered_since: float | None = None
    unanswered_reason: str = ""
    submit_failed: int = 0  # in a row
    submit_reason: str = ""  # the last failure's
    recent: deque[bool] = field(default_factory=deque)  # last `window` ends: True = the site's fault
    faults: int = 0  # True values in `recent`
    lost: deque[float] = field(default_factory=deque)  # times of vanished attempts in the window
    probe_at: float = 0.0
    backoff: float = 0.0
    scheduled: bool = False  # down because of a scheduled window (it comes back by itself)
    changed: bool = False  # since the last time someone looked (``take_change``)

    def fault_rate(self) -> float:
        return self.faults / len(self.recent) if self.recent else 0.0

    def weight(self) -> float:
        """Placement weight from observed failures: 1 for a healthy site, towards 0.05."""
        return max(0.05, 1.0 - self.fault_rate())

    def takes_work(self) -> bool:
        return self.state not in (SiteState.DOWN,)

    # -- evidence -----------------------------------------------------------------------------------
    def unanswered(self, now: float, reason: str) -> None:
        if self.unanswered_since is None:
            self.unanswered_since = now
        self.unanswered_reason = reason
        if self.state == SiteState.PROBING:
            self._down(now, f"probe: scheduler not answering: {reason}")

    def answered(self) -> None:
        self.unanswered_since = None

    def submitted(self, ok: bool, now: float, reason: str = "") -> None:
        self.submit_failed = 0 if ok else self.submit_failed + 1
        if not ok:
            self.submit_reason = reason
        if not ok and self.state == SiteState.PROBING:
            self._down(now, f"probe: submission failed: {reason}")

    def ended(self, fclass: FailureClass | None, reason: str | None, opportunistic: bool, now: float) -> None:
        if fclass is not None and fclass not in SITE_FAULTS:
            return  # the payload's business
        if fclass == FailureClass.KILLED and opportunistic:
            return  # a preemption: expected there, counted apart
        fault = fclass is not None
        self.recent.append(fault)
        self.faults += fault
        while len(self.recent) > self.policy.window:
            self.faults -= self.recent.popleft()
        if fault and reason and ("lost" in reason or "vanish" in reason or "NODE_FAIL" in reason):
            self.lost.append(now)
        if self.state == SiteState.PROBING:
            if fault:
                self._down(now, f"probe failed: {reason or fclass}")
            else:
                self.recent.clear()
                self.faults = 0
                self.lost.clear()
                self._set(SiteState.ONLINE, now, "probe job succeeded")
                self.backoff = 0.0

    # -- decisions ----------------------------------------------------------------------------------
    def evaluate(self, now: float, in_downtime: str | None, downtime_soon: str | None, alone: bool = False) -> None:
        """Apply the policy to the evidence at ``now``. ``in_downtime``: the scheduled window in force
        (its description), if any; ``downtime_soon``: the next one within the drain horizon.
        ``alone``: no other site takes work. The attempts' failures (lost, killed, infrastructure) then
        make it degraded, not down: taking the last site away sends the work nowhere and only stops
        the jobs that do run there (a payload that kills itself would stall the rest of its run)."""
        p = self.policy
        while self.lost and now - self.lost[0] > max(p.unanswered_for * 10, 600.0):
            self.lost.popleft()
        if in_downtime is not None:
            if self.state != SiteState.DOWN or not self.scheduled:
                self.scheduled = True
                self._set(SiteState.DOWN, now, f"scheduled downtime {in_downtime}")
            return
        if self.scheduled:  # the window ended: back, no probing needed
            self.scheduled = False
            self._set(SiteState.ONLINE, now, "scheduled downtime over")
        if self.state == SiteState.DOWN:
            if now >= self.probe_at:
                self._set(SiteState.PROBING, now, f"probing after {self.backoff:.0f} s down ({self.evidence})")
            return
        if self.state == SiteState.PROBING:
            return
        if self.unanswered_since is not None and now - self.unanswered_since >= p.unanswered_for:
            self._down(now, f"scheduler not answering for {now - self.unanswered_since:.0f} s: "
                            f"{self.unanswered_reason}")
            return
        if self.submit_failed >= p.submit_failures:
            self._down(now, f"{self.submit_failed} submissions in a row failed: {self.submit_reason}")
            return
        if len(self.lost) >= p.lost_jobs and not alone:
            self._down(now, f"{len(self.lost)} attempts vanished recently")
            return
        rate = self.fault_rate()
        if len(self.recent) >= p.min_samples and rate >= p.down_rate and not alone:
            self._down(now, f"{self.faults} of the last {len(self.recent)} attempts failed on the site "
                            f"(lost, killed or infrastructure)")
            return
        if len(self.recent) >= p.min_samples and rate >= p.degrade_rate:
            if self.state != SiteState.DEGRADED:
                self._set(SiteState.DEGRADED, now, f"{self.faults} of the last {len(self.recent)} attempts "
                                                   "failed on the site" + (" (the only site taking work: kept in "
                                                                           "use)" if alone else ""))
            return
        if self.state == SiteState.DEGRADED and rate < p.degrade_rate / 2:
            self._set(SiteState.ONLINE, now, f"failure rate back to {rate:.0%}")
            return
        if downtime_soon is not None and self.state == SiteState.ONLINE:
            self._set(SiteState.DRAINING, now, f"scheduled downtime {downtime_soon}: only work that ends before it")
        elif downtime_soon is None and self.state == SiteState.DRAINING:
            self._set(SiteState.ONLINE, now, "no scheduled downtime ahead")

    def _down(self, now: float, why: str) -> None:
        p = self.policy
        self.backoff = p.probe_after if self.backoff == 0 else min(self.backoff * 2, p.probe_max)
        self.probe_at = now + self.backoff
        self.submit_failed = 0
        self.unanswered_since = None
        self.recent.clear()
        self.faults = 0
        self.lost.clear()
        self._set(SiteState.DOWN, now, why)

    def _set(self, state: SiteState, now: float, evidence: str) -> None:
        self.state, self.since, self.evidence = state, now, evidence
        self.changed = True

    def take_change(self) -> bool:
        c, self.changed = self.changed, False
        return c
