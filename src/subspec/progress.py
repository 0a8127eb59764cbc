"""Progress display for long steps (layer files, substitutes), on stderr."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


def progress_bars(enabled: bool) -> Progress:
    """Transient bars on stderr; disabled, every call is a no-op."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=Console(file=sys.stderr), disable=not enabled, transient=True,
    )  # fmt: skip
