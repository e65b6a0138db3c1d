"""Every dotted name the package's docstrings and comments, the README and the manual cite
(``bora_tools.core.row_merge.merge_plan``, ``bt.merged_weight``) names something that exists:
a pointer left behind when code moves fails here, naming the file and the line."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import bora_tools

PACKAGE = Path(bora_tools.__file__).parent
ROOT = PACKAGE.parent
#: ``bora_tools.x.y`` anywhere (docstrings, comments, the docs' prose and code).
CITED = re.compile(r"\bbora_tools(?:\.[A-Za-z_]\w*)+")
#: ``bt.x`` in the docs, whose examples ``import bora_tools as bt``.
PUBLIC = re.compile(r"(?<![\w.])bt(?:\.[A-Za-z_]\w*)+")

SOURCES = sorted(PACKAGE.rglob("*.py"))
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _citations(paths: list[Path], pattern: re.Pattern) -> list[tuple[str, str]]:
    """(``file:line``, dotted name) for every citation, each name once per file."""
    found = {}
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for name in pattern.findall(line):
                found.setdefault((path, name), f"{path.relative_to(ROOT)}:{number}")
    return sorted((where, name) for (_, name), where in found.items())


def _resolve(dotted: str) -> object:
    """The object ``dotted`` names: its longest importable module prefix, then attributes.

    A module must come from this checkout (an editable install elsewhere may still hold a module
    that was moved away here).
    """
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        candidate = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(candidate)
        except ModuleNotFoundError as e:
            if not (candidate + ".").startswith(f"{e.name}."):
                raise  # a module that exists but does not import
            continue
        assert Path(obj.__file__).is_relative_to(PACKAGE), f"{candidate} is not in this checkout ({obj.__file__})"
        break
    for attr in parts[cut:]:
        obj = getattr(obj, attr)
    return obj


@pytest.mark.parametrize("where,name", _citations(SOURCES + DOCS, CITED))
def test_cited_names_exist(where, name):
    try:
        _resolve(name)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"{where} cites {name}, which does not exist ({e})")


@pytest.mark.parametrize("where,name", _citations(DOCS, PUBLIC))
def test_cited_public_names_exist(where, name):
    try:
        _resolve("bora_tools" + name[2:])
    except (ImportError, AttributeError) as e:
        pytest.fail(f"{where} cites {name}, which is not in the public API ({e})")


def test_a_stale_pointer_fails():
    with pytest.raises(AttributeError):
        _resolve("bora_tools.merge.merged_weight")  # moved to bora_tools.core.row_merge
    with pytest.raises(AttributeError):
        _resolve("bora_tools.no_such_module.anything")
    assert _resolve("bora_tools.core.row_merge.merged_weight") is bora_tools.merged_weight
