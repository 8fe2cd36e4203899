"""Rich output shared by the command-line tools: one console, tables built from row dicts."""
from __future__ import annotations

from collections.abc import Iterable

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
