"""The eval set of a run: a file of its own (``eval_data``) or a seeded share of the data (``eval_fraction``)."""

from __future__ import annotations

import random
from pathlib import Path

from bora_tools.errors import ValidationError


def split(examples: list, fraction: float, *, seed: int, data: Path) -> tuple[list, list]:
    """``(train, eval)``: ``fraction`` of the examples (at least one), drawn with ``seed``; both keep file order.

    Raises:
        ValidationError: too few examples to leave one on each side.
    """
    n = len(examples)
    k = max(1, round(fraction * n))
    if k >= n:
        raise ValidationError(f"`eval_fraction` {fraction} of the {n} example(s) of `data` {data} leaves none "
                              f"to train on")
    held = set(random.Random(seed).sample(range(n), k))
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]
