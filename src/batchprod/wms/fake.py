"""A fake site, shipped in the package (the idea of httpx's ``MockTransport``): it runs nothing, and
ends each attempt when and how you say. For unit tests of the engine and for simulating campaigns
on many sites in virtual time with the real dispatcher.

    site = FakeBackend(clock, duration=lambda launch: 30.0,
                       outcome=lambda launch: FakeEnd(exit_code=3) if launch.attempt == 1 else None)

``outcome`` returns None for success, or a :class:`FakeEnd`. On success the fake either reports the
attempt's outputs itself (``write_outputs=False``: no file is touched, the fastest) or writes every
declared output file and commits it through the native file protocol (``write_outputs=True``), so
that ingest, provenance and reports see a real run. ``unavailable`` makes ``start``/``poll`` raise
:class:`SiteUnavailable` (a dead scheduler) until it is set back to None.
"""

from __future__ import annotations

import heapq
import itertools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchprod.execution.protocol import collect_outputs, final_outputs, finish_attempt, staging_map
from batchprod.execution.states import FailureClass
from batchprod.wms.base import Backend, BaseWmsService, Capacity, Ended, Launch, SiteUnavailable

if TYPE_CHECKING:
    from batchprod.state.run import Run


class _Clock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass
class FakeEnd:
    """How an attempt ends when it does not succeed (or succeeds with a measured peak)."""

    exit_code: int | None = 1
    signal: int | None = None
    fclass: FailureClass | None = None
    reason: str | None = None
    peak_rss_mb: float | None = None


@dataclass
class _Attempt:
    launch: Launch
    started: float  # wall clock
    end: float  # monotonic
    forced: tuple[FailureClass, str] | None = None


class FakeBackend(Backend):
    """A site whose attempts end after ``duration(launch)`` seconds of ``clock`` time."""

    name = "fake"

    def __init__(self, clock: Any = None, duration: float | Callable[[Launch], float] = 0.0,
                 outcome: Callable[[Launch], FakeEnd | None] | None = None, capacity: Capacity | None = None,
                 write_outputs: bool = False, name: str = "fake", host: str = "fake-node",
                 queue_time: float = 0.0) -> None:
        self.clock = clock or _Clock()
        self.duration = duration
        self.outcome = outcome
        self._capacity = capacity or Capacity(cores=1 << 20, memory_mb=1 << 40)
        self.write_outputs = write_outputs
        self.name = name
        self.host = host
        self.queue_time = queue_time
        self.unavailable: str | None = None
        self.attempts: dict[str, _Attempt] = {}
        self._ends: list[tuple[float, str]] = []
        self._ids = itertools.count(1)
        self.started = 0  # attempts ever started here

    def capacity(self) -> Capacity:
        return self._capacity

    def _check(self) -> None:
        if self.unavailable:
            raise SiteUnavailable(self.name, self.unavailable)

    def start(self, launches: Sequence[Launch]) -> list[str]:
        self._check()
        now, wall = self.clock.monotonic(), self.clock.time()
        handles = []
        dur = self.duration
        for launch in launches:
            h = f"{self.name}-{next(self._ids)}"
            d = dur(launch) if callable(dur) else dur
            self.attempts[h] = _Attempt(launch, wall + self.queue_time, now + self.queue_time + d)
            heapq.heappush(self._ends, (now + self.queue_time + d, h))
            handles.append(h)
        self.started += len(launches)
        return handles

    def poll(self) -> list[Ended]:
        self._check()
        now = self.clock.monotonic()
        out = []
        while self._ends and self._ends[0][0] <= now:
            _, h = heapq.heappop(self._ends)
            a = self.attempts.pop(h, None)
            if a is not None:
                out.append(self._ended(a))
        return out

    def _ended(self, a: _Attempt) -> Ended:
        launch = a.launch
        if a.forced is not None:
            return launch.ended(None, 9, fclass=a.forced[0], reason=a.forced[1], host=self.host)
        end = self.outcome(launch) if self.outcome is not None else None
        if end is not None:
            return launch.ended(end.exit_code, end.signal, fclass=end.fclass, reason=end.reason,
                                peak_rss_mb=end.peak_rss_mb, host=self.host, cpu_s=0.0)
        if not self.write_outputs:
            return launch.ended(0, None, outputs=[], host=self.host, cpu_s=0.0)
        return launch.ended(0, None, outputs=self._publish(launch), host=self.host, cpu_s=0.0)

    @staticmethod
    def _publish(launch: Launch) -> list[dict[str, Any]]:
        """Write every declared output (its content names the attempt) and commit it as a real
        attempt would: staged, checksummed, published under the job's fence."""
        spec = launch.spec
        staged = staging_map(spec)
        outputs = []
        for q in spec["quanta"]:
            for r in q["outputs"]:
                path = staged[r["path"]]
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as fh:
                    fh.write(f"fake {launch.name} attempt {launch.attempt}\n")
        for q in spec["quanta"]:
            outputs.extend(collect_outputs(q, staged))
        if spec.get("final"):
            for r in spec["final"].get("outputs") or []:
                with open(r["path"], "w") as fh:
                    fh.write(f"fake {launch.name}\n")
            outputs.extend(final_outputs(spec["final"]))
        finish_attempt(spec, outputs, 0.0, durable=False)
        return outputs

    def kill(self, handle: str, fclass: FailureClass, reason: str) -> None:
        a = self.attempts.get(handle)
        if a is not None and a.forced is None:
            a.forced = (fclass, reason)
            heapq.heappush(self._ends, (self.clock.monotonic(), handle))

    def active(self) -> int:
        return len(self.attempts)

    def queued(self) -> int:
        if not self.queue_time:
            return 0
        wall = self.clock.time()
        return sum(1 for a in self.attempts.values() if a.started > wall)

    def running_since(self, handle: str) -> float | None:
        a = self.attempts.get(handle)
        if a is None or a.started > self.clock.time():
            return None
        return a.started

    def next_end(self) -> float | None:
        """When the next attempt here ends (clock time), None if none runs (for virtual time)."""
        while self._ends and self._ends[0][1] not in self.attempts:
            heapq.heappop(self._ends)  # ended by a kill already reported
        return self._ends[0][0] if self._ends else None

    def wait(self, timeout: float) -> None:
        """Until the next end or ``timeout``: a virtual clock jumps there, a real one sleeps."""
        now = self.clock.monotonic()
        until = min(self._ends[0][0], now + timeout) if self._ends else now + timeout
        if hasattr(self.clock, "advance_to"):
            self.clock.advance_to(until)
        else:
            time.sleep(max(0.0, until - now))

    def cleanup_orphans(self, run: Run, handles: Sequence[str]) -> None:
        key = str(run.submit_dir)
        for h, a in list(self.attempts.items()):
            if a.launch.run == key:
                del self.attempts[h]


class FakeService(BaseWmsService):
    """``wmsServiceClass: fake``: every job succeeds at once and writes its declared outputs (no
    process is started). For trying a config, the engine and the reports without running anything."""

    name = "fake"

    def backend(self, run: Run) -> Backend:
        return FakeBackend(write_outputs=True)

    def site_backend(self, settings: Any) -> Backend:
        return FakeBackend(write_outputs=True, name=getattr(settings, "site", None) or "fake")

    def cleanup_orphans(self, run: Run, handles: Sequence[str]) -> None:
        return None
