"""What every ``batchprod`` command module shares: the consoles, the one-line user errors (exit 2), the
``--db`` option."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click
from rich.console import Console

from batchprod.errors import BatchprodError

F = TypeVar("F", bound=Callable[..., Any])


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """The reader of our output left (``batchprod restart RUN | head -1``): print nowhere from now
        on and go on (rich's default exits, which would end an engine that is driving a run)."""
        from batchprod.report.progress import stdout_gone

        self.quiet = True
        stdout_gone()


console = _Console()
err_console = Console(stderr=True)

def _user_errors(fn: F) -> F:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BatchprodError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper  # type: ignore[return-value]


def _select_db(_ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value:
        from batchprod.state.database import select_db

        select_db(value)


DB_OPTION = click.option(
    "--db", metavar="URL", expose_value=False, callback=_select_db,
    help="Central state database for many runs (sqlite:///PATH or postgresql+psycopg://USER@HOST/DB); "
         "default $BATCHPROD_DB, else each run's own state.db (campaigns: ~/.local/share/batchprod/batchprod.db). "
         "A password in it is never written anywhere.",
)
