"""Tables that never cut what an operator copies.

rich shrinks a table that does not fit by truncating cells with an ellipsis: a run name, a job name or
a path cut in the middle is worse than no table. So a table is laid out in the first form that fits
the terminal whole: as is; with short headers and light borders; or, as the last resort, one block of
``key: value`` lines per row. Off a terminal the width is unlimited and the first form is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

#: short forms of headers, used when the long ones do not fit
ABBREVIATIONS = {
    "succeeded": "ok", "failed": "fail", "running": "run", "pending": "pend", "unready": "unrdy",
    "cancelled": "canc", "interrupted": "intr", "elapsed": "time", "submit dir": "dir", "started": "start",
}


def _width(headers: Sequence[str], rows: Sequence[Sequence[str]], per_column: int) -> int:
    widest = [len(h) for h in headers]
    for r in rows:
        for i, cell in enumerate(r):
            widest[i] = max(widest[i], max((len(x) for x in str(cell).split("\n")), default=0))
    return sum(widest) + per_column * len(headers) + 1


def _needs(table: Table) -> int:
    """Columns rich needs to draw ``table`` without shrinking a cell (its own measure)."""
    import io

    from rich.console import Console
    from rich.measure import Measurement

    console = Console(file=io.StringIO(), width=1_000_000)
    return Measurement.get(console, console.options, table).maximum


def fit_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], width: int,
              right: Sequence[str] = (), footer: Sequence[str] | None = None, optional: Sequence[str] = ()) -> Any:
    """A table of ``rows`` (strings) in the first layout that fits ``width`` columns uncut; the
    ``optional`` columns are the first thing given up (and the table says so)."""
    all_rows = [*rows, *([footer] if footer else [])]
    keep_all = list(range(len(headers)))
    keep_some = [i for i, h in enumerate(headers) if h not in optional]
    layouts = [(False, box.HEAVY_HEAD, 3, keep_all), (True, box.SIMPLE_HEAD, 2, keep_all)]
    if len(keep_some) < len(headers):
        layouts.append((True, box.SIMPLE_HEAD, 2, keep_some))
    for short, style, per_col, keep in layouts:
        cols = [headers[i] for i in keep]
        shown = [ABBREVIATIONS.get(h, h) if short else h for h in cols]
        cut = [[r[i] for i in keep] for r in all_rows]
        if _width(shown, cut, per_col) > width:  # cheap first test: too wide in any case
            continue
        t = Table(title=title, box=style)
        for h, s in zip(cols, shown, strict=True):
            t.add_column(s, justify="right" if h in right else "left", no_wrap=True)
        for r in cut[:len(rows)]:
            t.add_row(*r)
        if footer:
            t.add_section()
            t.add_row(*cut[-1], style="bold")
        if _needs(t) <= width:
            if keep is keep_some:
                dropped = ", ".join(h for h in headers if h in optional)
                t.caption = f"({dropped}: see --json or a wider terminal)"
            return t
    # stacked: nothing fits across, so every row is a block; long values wrap, never get cut
    blocks: list[Any] = [Text(title, style="bold")]
    for r in all_rows:
        blocks.append(Text(str(r[0]), style="bold", overflow="fold"))
        blocks.extend(Text(f"  {h}: {v}", overflow="fold") for h, v in zip(headers[1:], r[1:], strict=True) if v != "")
    return Group(*blocks)
