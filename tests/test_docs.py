"""The docs match the code.

- docs/cli.md documents every command and every option, each in the command's own section, and every
  command and option has help text (sqlite-utils' tests/test_docs.py does the same);
- the README shows every command, and its test command is the one .ci/run runs;
- every relative link in README.md and docs/*.md reaches an existing file (and heading);
- every ``bora_tools.x.y`` and ``bt.name`` the docs mention exists;
- the ``python`` blocks of docs/python-api.md run, in order, offline, in a temporary directory.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import tempfile
import unicodedata
from pathlib import Path

import click
import pytest

import bora_tools
from bora_tools.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CLI_MD = DOCS / "cli.md"
API_MD = DOCS / "python-api.md"
NO_RUN = "<!-- no-run -->"

FENCE = re.compile(r"^```[^\n]*\n.*?^```[ \t]*$", re.S | re.M)


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _sections(text: str) -> dict[str, str]:
    """``## heading`` -> its text up to the next ``## `` heading; ``""`` is everything before the first one."""
    out: dict[str, str] = {}
    title, lines = "", []
    for line in FENCE.sub("", text).splitlines():
        if line.startswith("## "):
            out[title] = "\n".join(lines)
            title, lines = line[3:].strip().strip("`").strip(), []
        else:
            lines.append(line)
    out[title] = "\n".join(lines)
    return out


def _mentions(text: str, token: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(token)}(?![\w-])", text) is not None


def _long_flag(param: click.Parameter) -> str:
    opts = [*param.opts, *param.secondary_opts]
    return next((o for o in opts if o.startswith("--")), opts[0])


def _params() -> list[tuple[str, click.Command, click.Parameter]]:
    rows: list[tuple[str, click.Command, click.Parameter]] = [("", cli, p) for p in cli.params]
    for name, command in sorted(cli.commands.items()):
        rows += [(name, command, p) for p in command.params]
    return rows


def _param_id(row: tuple[str, click.Command, click.Parameter]) -> str:
    name, _, param = row
    shown = _long_flag(param) if isinstance(param, click.Option) else param.human_readable_name
    return f"{name or 'bora-tools'} {shown}"


# -- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_command_has_a_section_in_cli_md(name):
    assert name in _sections(CLI_MD.read_text()), f"docs/cli.md has no '## {name}' section"


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_command_has_help_with_an_example(name):
    command = cli.commands[name]
    assert (command.help or "").strip() or (command.short_help or "").strip(), f"{name}: no help text"
    assert f"bora-tools {name}" in (command.help or ""), f"{name}: the help shows no example 'bora-tools {name} ...'"


@pytest.mark.parametrize("row", _params(), ids=_param_id)
def test_option_is_documented_in_its_section(row):
    name, _, param = row
    sections = _sections(CLI_MD.read_text())
    if name:
        section = sections.get(name)
        assert section is not None, f"docs/cli.md has no '## {name}' section"
    else:  # the group's own options: the introduction and the common rules
        section = "\n".join(text for title, text in sections.items() if title not in cli.commands)
    if isinstance(param, click.Option):
        token = _long_flag(param)
    else:
        token = param.human_readable_name  # an argument: ADAPTER, REPO_ID, ...
    where = f"the '## {name}' section" if name else "the sections that are not a command's (Common rules)"
    assert _mentions(section, token), f"{token} is not documented in {where} of docs/cli.md"


@pytest.mark.parametrize("row", [r for r in _params() if isinstance(r[2], click.Option)], ids=_param_id)
def test_option_has_help(row):
    assert (row[2].help or "").strip(), f"{_param_id(row)}: no help text"


# -- the README ---------------------------------------------------------------------------------


def test_readme_test_command_is_what_ci_runs():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python -m venv")]
    assert len(ci) == 1, ".ci/run should hold one 'python -m venv ...' line"
    first_block = FENCE.search(README.read_text()).group(0)
    commands = [line for line in first_block.splitlines()[1:-1] if line.strip() and not line.startswith("#")]
    assert len(commands) == 2, "the README opens with exactly two commands"
    assert commands[0].startswith("python -m venv .venv && ") and commands[0].endswith(" && bora-tools demo")
    assert commands[1] == ci[0]


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_readme_shows_every_command(name):
    assert f"bora-tools {name}" in README.read_text(), f"README.md shows no example of 'bora-tools {name}'"


# -- links and names ----------------------------------------------------------------------------

LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`[^`\n]*`")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = unicodedata.normalize("NFKC", heading.strip()).lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(path: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", path.read_text()))
    return LINK.findall(text)


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for link in _links(page):
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link} (no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path})")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link} (no heading #{anchor} in {path.name})")
    assert not broken, f"{page.name}: broken links: {broken}"


def test_every_docs_page_is_listed_in_the_docs_index():
    index = DOCS / "README.md"
    linked = {(DOCS / link.partition("#")[0]).resolve() for link in _links(index)}
    missing = [p.name for p in DOCS.glob("*.md") if p != index and p.resolve() not in linked]
    assert not missing, f"docs/README.md does not link {missing}"


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_python_names_in_the_docs_exist(page):
    text = page.read_text()
    dotted = sorted(set(re.findall(r"\bbora_tools(?:\.[A-Za-z_]\w*)+", text)))
    missing = [d for d in dotted if not _resolves(d)]
    public = sorted(set(re.findall(r"\bbt\.([A-Za-z_]\w*)", text)))
    missing += [f"bt.{n}" for n in public if n not in bora_tools.__all__]
    assert not missing, f"{page.name} names what does not exist: {missing}"


def test_code_cites_existing_docs_and_sections():
    """Docstrings cite docs/format.md by section number ("docs/format.md, sections 1 and 3"): those must exist."""
    bad = []
    for path in sorted([*(ROOT / "bora_tools").rglob("*.py"), *(ROOT / "tests").glob("*.py"),
                        *(ROOT / "scripts").glob("*.py")]):
        text = path.read_text()
        for m in re.finditer(r"docs/([\w.-]+\.md)(?:,? sections? (\d+(?:(?:, | and )\d+)*))?", text):
            page = DOCS / m.group(1)
            if not page.is_file():
                bad.append(f"{path.relative_to(ROOT)}: docs/{m.group(1)} does not exist")
                continue
            for number in re.findall(r"\d+", m.group(2) or ""):
                if not re.search(rf"^## {number}\. ", page.read_text(), re.M):
                    bad.append(f"{path.relative_to(ROOT)}: docs/{m.group(1)} has no section {number}")
    assert not bad, bad


# -- the Python examples ------------------------------------------------------------------------


def _python_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """``(line, code, runs)`` for every ```python block; a ``<!-- no-run -->`` line just before one skips it."""
    text = path.read_text()
    blocks = []
    for m in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, re.S | re.M):
        before = text[: m.start()].rstrip().splitlines()
        line = text.count("\n", 0, m.start()) + 2
        blocks.append((line, m.group(1), not (before and before[-1].strip() == NO_RUN)))
    return blocks


def test_no_public_name_is_also_a_submodule():
    # `import bora_tools.X` sets the package attribute X to the module, hiding the lazy public name X
    package = Path(bora_tools.__file__).parent
    clashes = [n for n in bora_tools.__all__ if (package / f"{n}.py").exists() or (package / n).is_dir()]
    assert not clashes, f"public names shadowed by submodules of the same name: {clashes}"


@pytest.mark.slow
def test_python_api_examples_run(tmp_path, monkeypatch):
    blocks = _python_blocks(API_MD)
    assert sum(runs for _, _, runs in blocks) >= 5, "docs/python-api.md lost its examples"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # tempfile.mkdtemp() in the examples lands here
    # Offline for the examples only: huggingface_hub reads HF_HUB_OFFLINE once, at import, so the constant is
    # patched (and restored) too; an environment variable alone would leak into every later test of the session.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    namespace: dict = {"__name__": "docs_python_api"}
    for line, code, runs in blocks:
        compiled = compile(code, f"{API_MD.relative_to(ROOT)}:{line}", "exec")  # no-run blocks must still parse
        if runs:
            exec(compiled, namespace)
