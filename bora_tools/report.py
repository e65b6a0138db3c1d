"""Command reports: one dataclass per command, ``to_dict()`` for ``--json``, ``str(report)`` for a terminal.

Library functions return reports and never print; the CLI prints ``to_dict()`` as JSON or the text form.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any


def plain(value: Any) -> Any:
    """``value`` made JSON-ready: paths as strings, tuples as lists, nested reports as dicts."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


class Report:
    """Base of the command reports (each a dataclass). Subclasses write ``to_text``."""

    def to_dict(self) -> dict[str, Any]:
        """What ``--json`` prints: every field, in order, made JSON-ready."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def to_text(self) -> str:  # pragma: no cover - every report overrides it
        raise NotImplementedError

    def __str__(self) -> str:
        return self.to_text()


def json_text(data: Any, *, indent: int = 2) -> str:
    """``data`` as strict JSON text: what ``--json`` prints and ``--report`` files hold (docs/cli.md).

    JSON has no infinity or NaN: a non-finite number is written as ``null``, so the text always parses, in
    Python's ``json`` and in strict parsers alike. Paths become strings and tuples lists.

    Example: ``json_text({"x": float("inf")}, indent=None)`` -> ``'{"x": null}'``.
    """
    return json.dumps(_finite(plain(data)), indent=indent, allow_nan=False,
                      default=lambda o: str(o) if isinstance(o, Path) else _finite(list(o)))


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def human_bytes(n: int | float) -> str:
    """``1536`` -> ``"1.5 KiB"``; exact bytes below 1 KiB."""
    if n < 1024:
        return f"{int(n)} B"
    exp = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024 ** exp:.1f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][exp]}"


def human_seconds(s: float) -> str:
    """``0.0123`` -> ``"12 ms"``, ``1.94`` -> ``"1.9 s"``, ``125`` -> ``"2 min 5 s"``."""
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    return f"{int(s // 60)} min {int(s % 60)} s"
