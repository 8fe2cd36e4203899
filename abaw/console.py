"""What the command-line tools share: one rich console, tables built from row dicts, and SIGTERM
handled like Ctrl-C."""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.table import Table

console = Console(highlight=False, soft_wrap=True)  # soft_wrap: log lines stay greppable


def table(rows: Iterable[dict], title: str | None = None, floats: str = "{:.4f}") -> Table:
    """A rich table whose columns are the keys of the first row."""
    rows = list(rows)
    out = Table(title=title)
    if not rows:
        return out
    for key in rows[0]:
        out.add_column(str(key), justify="right" if isinstance(rows[0][key], (int, float)) else "left")
    for row in rows:
        out.add_row(*[floats.format(v) if isinstance(v, float) else str(v) for v in row.values()])
    return out


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or ``kill``'s stop), raised like Ctrl-C's KeyboardInterrupt.

    Python's default for SIGTERM ends the process on the spot, skipping every ``finally``: temporary
    files and staging folders would stay behind. Raised instead, it unwinds like Ctrl-C, so the
    atomic writers remove their temporary files and nothing half-written is published."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside: SIGTERM raises :class:`Terminated` in the main thread (elsewhere: unchanged)."""
    if threading.current_thread() is not threading.main_thread():  # signal.signal works there only
        yield
        return

    def handler(signum, frame):
        # One is enough: a second SIGTERM (schedulers repeat theirs) must not cut the cleanup short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted(exc: KeyboardInterrupt, kept: str) -> int:
    """Print what an interruption left (``kept``) and return the shell's exit status for it."""
    name, status = ("SIGTERM", 128 + signal.SIGTERM) if isinstance(exc, Terminated) else ("Ctrl-C", 130)
    console.print(f"interrupted ({name}): {kept}", markup=False)
    return status
