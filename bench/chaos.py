#!/usr/bin/env python
"""Kill the orchestrator (SIGKILL) at random moments of a real run, restart, and check the result.

    python bench/chaos.py --trials 100 [--kills 3] [--seed 0] [--db URL]

Each trial: a 13-job run (9 calibrate, 3 coadd fan-ins, a final job) of real processes; the
orchestrator is killed ``--kills`` times at random moments (every second kill also kills every job
process, like a reboot) and restarted each time (``--double-restart``: two engines race at every
restart; the run lock must refuse one). Prints lost outputs (vs an uninterrupted run),
duplicated publications (an output recorded twice, or a succeeded job's payload run again) and
inconsistent states of the store. Goal: 0, 0, 0.

``--db URL`` keeps every run of the bench in one central database instead of each run's own
``state.db`` (the engines get it as $BATCHPROD_DB): ``sqlite:///PATH``, or ``postgresql+psycopg://...``,
where the bench works in a fresh schema of that database, dropped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from batchprod.testing import chaos_trial, reference_outputs


@contextlib.contextmanager
def central_db(url: str | None) -> Iterator[str | None]:
    """The database the bench's runs go to (None: each run's own file), selected for this process
    and the engines it starts."""
    if not url:
        yield None
        return
    from batchprod.state.database import ENV_DB, parse_url, public_url

    with contextlib.ExitStack() as stack:
        if parse_url(url).get_backend_name() == "postgresql":
            from batchprod.state.testdb import fresh_schema

            url = stack.enter_context(fresh_schema(url, prefix="chaos"))
        os.environ[ENV_DB] = url
        print(f"state in {public_url(url)}")
        yield url


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-delay", type=float, default=1.5, help="latest kill moment after (re)start, seconds")
    ap.add_argument("--db", default=None, metavar="URL",
                    help="one central state database for every run (default: each run's own state.db)")
    ap.add_argument("--double-restart", action="store_true",
                    help="start two engines at every (re)start: the run lock must refuse one of them")
    a = ap.parse_args()
    t0 = time.time()
    totals = {"lost": 0, "duplicated": 0, "inconsistent": 0, "restarts": 0, "refused": 0, "attempts": 0, "jobs": 0}
    with tempfile.TemporaryDirectory() as d, central_db(a.db):
        ref = reference_outputs(Path(d) / "ref")
        for t in range(a.trials):
            r = chaos_trial(Path(d) / f"trial{t}", ref, seed=a.seed + t, kills=a.kills, max_delay=a.max_delay,
                            racers=2 if a.double_restart else 1)
            for k in totals:
                totals[k] += r[k]
            if r["lost"] or r["duplicated"] or r["inconsistent"]:
                print(f"trial {t}: {r}")
    race = f", racing engines refused {totals['refused']}" if a.double_restart else ""
    print(f"trials {a.trials}, kills/trial {a.kills}, restarts {totals['restarts']}{race}, jobs {totals['jobs']}, "
          f"attempts {totals['attempts']}: lost outputs {totals['lost']}, duplicated publications "
          f"{totals['duplicated']}, inconsistent states {totals['inconsistent']} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
