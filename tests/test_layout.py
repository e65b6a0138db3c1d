"""The package's shape: arrows point one way (cli/demo -> commands -> core -> io), no import cycle,
no command module imports another command's module, and inside the cli package the command modules
import only its frame and params. Read with ``ast``; nothing is imported."""

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
    ("verification", ("bora_tools.verification",)),
    ("command", ("bora_tools.inspection", "bora_tools.merge", "bora_tools.conversion", "bora_tools.combine",
                 "bora_tools.training", "bora_tools.gguf", "bora_tools.hub")),
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


#: Inside ``bora_tools.cli``: what every command shares, and what each shared module may import of the package.
CLI_SHARED = {"bora_tools.cli.frame": set(), "bora_tools.cli.params": {"bora_tools.cli.frame"}}
CLI_APP = "bora_tools.cli.app"
#: The entry points: the only modules that import the app (the group that registers every command).
CLI_ENTRIES = {"bora_tools.cli", "bora_tools.cli.__main__"}
CLI_COMMANDS = sorted(n for n in MODULES if n.startswith("bora_tools.cli.")
                      and n not in {*CLI_SHARED, CLI_APP, *CLI_ENTRIES})


def _cli_imports(name: str) -> set[str]:
    return {dep for dep in GRAPH[name] if dep == "bora_tools.cli" or dep.startswith("bora_tools.cli.")}


def test_the_cli_has_its_frame_params_app_and_command_modules():
    assert {*CLI_SHARED, CLI_APP, *CLI_ENTRIES} <= set(MODULES)
    assert {"bora_tools.cli.adapters", "bora_tools.cli.gguf", "bora_tools.cli.train"} <= set(CLI_COMMANDS)


@pytest.mark.parametrize("name", CLI_COMMANDS)
def test_a_cli_command_module_imports_only_the_frame_and_params(name):
    inside = _cli_imports(name)
    assert inside <= set(CLI_SHARED), f"{name} imports {sorted(inside - set(CLI_SHARED))}: a command module " \
                                      f"imports the frame and params only, never the app or another command"


@pytest.mark.parametrize("name", sorted(CLI_SHARED))
def test_the_cli_frame_and_params_import_no_command(name):
    extra = _cli_imports(name) - CLI_SHARED[name]
    assert not extra, f"{name} imports {sorted(extra)}"


def test_only_the_entry_points_import_the_cli_app():
    importers = {name for name, deps in GRAPH.items() if CLI_APP in deps}
    assert importers <= CLI_ENTRIES, f"{sorted(importers - CLI_ENTRIES)} import {CLI_APP}"
