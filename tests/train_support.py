"""What the training tests share: one torch thread per test, and JSONL written from records.

``from train_support import jsonl, one_thread  # noqa: F401`` (``one_thread`` is an autouse fixture: importing
it into a test module applies it to every test there).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train faster, and alike on every machine, on one torch thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def jsonl(path: Path, records: list) -> Path:
    """``records`` written to ``path`` as JSON Lines (one ``json.dumps`` per line)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
