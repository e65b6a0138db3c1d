"""The package's shape: arrows point one way (cli/demo -> commands -> core -> io), no import cycle,
and no command module imports another command's module. Read with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bora_tools

PACKAGE = Path(bora_tools.__file__).parent

#: The floors, top to bottom. A module may import its own floor's group or any floor below.
FLOORS = [
    ("cli", ("bora_tools.cli",)),
    ("demo", ("bora_tools.demo",)),
    ("command", ("bora_tools.inspection", "bora_tools.merge", "bora_tools.conversion", "bora_tools.training",
                 "bora_tools.gguf", "bora_tools.hub")),
    ("drawing", ("bora_tools.plot",)),
    ("core", ("bora_tools.core",)),
    ("io", ("bora_tools.io",)),
    ("base", ("bora_tools.errors", "bora_tools.progress", "bora_tools.report", "bora_tools.choices")),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """Every bora_tools module ``path`` imports, at module level or inside functions (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from bora_tools.gguf import writer` imports the submodule when there is one
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        else:
            continue
        found.update(n for n in names if n.startswith("bora_tools.") and n in MODULES)
    return found


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _floor(name: str) -> tuple[int, str]:
    for level, (_, groups) in enumerate(FLOORS):
        for group in groups:
            if name == group or name.startswith(group + "."):
                return level, group
    raise AssertionError(f"{name} is on no floor: add it to FLOORS")


def test_every_module_has_a_floor():
    for name in MODULES:
        if name != "bora_tools":
            _floor(name)


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep] if dep in stack else [name, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != "bora_tools"))
def test_arrows_point_down(name):
    level, group = _floor(name)
    for dep in GRAPH[name]:
        dep_level, dep_group = _floor(dep)
        assert dep_level > level or dep_group == group, \
            f"{name} ({FLOORS[level][0]}) imports {dep} ({FLOORS[dep_level][0]}): an arrow running up or sideways"


def test_the_public_api_resolves():
    import bora_tools as bt

    assert set(bt.__all__) == {"__version__", *bt._EXPORTS}
    for name in bt.__all__:
        assert getattr(bt, name) is not None, name
    assert bt.__version__ and bt.__version__ != "0+unknown"
    assert set(dir(bt)) >= set(bt.__all__)
