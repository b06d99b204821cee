"""Output for the CLI: tables on stdout, progress and messages on stderr, one JSON object with --json."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)


def quiet_libraries() -> None:
    """Keep transformers' and datasets' own bars and warnings off the terminal; qtool shows its own."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def print_json(data: dict) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextmanager
def progress(enabled: bool = True):
    """A rich progress display on stderr, disabled for --json and --quiet."""
    display = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}"),
        console=stderr,
        transient=True,
        disable=not enabled,
    )
    with display:
        yield display


@contextmanager
def working(description: str, detail: str = "", enabled: bool = True):
    """A transient line on stderr while one step of unknown length runs."""
    with progress(enabled) as display:
        display.add_task(description, total=None, detail=detail)
        yield


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"
