"""Progress reporting without printing from library code.

Long-running library functions take ``progress``: a callable that wraps an
iterable (``progress(items, total=n, label="merging")``) and returns one to
iterate. The default does nothing; the CLI passes one that draws a bar on
stderr (or nothing under ``--quiet``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

Progress = Callable[..., Iterable]

#: Warnings from library code go through this logger; the CLI prints them as
#: ``Warning: ...`` lines on stderr.
logger = logging.getLogger("bora_tools")


def no_progress(items: Iterable[T], *, total: int | None = None, label: str = "") -> Iterable[T]:
    """The silent default: return ``items`` unchanged."""
    return items
