"""The click parameter types and the option stacks several commands share, each defined once.

Name lists shown in ``--help`` come from modules that do not import torch (``bora_tools.choices``,
``gguf.outtypes``, ``training.options``); the library is imported only when a value is converted.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from bora_tools.choices import DEVICE_CHOICES, DTYPE_ALIASES, DTYPE_NAMES, GGUF_FLOAT_NAMES
from bora_tools.cli.frame import _set_debug, _set_quiet, _state, _with_flags, make_progress
from bora_tools.errors import BoraError

_debug_option = click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                             help="Show the full traceback on errors.")
_quiet_option = click.option("--quiet", "-q", is_flag=True, expose_value=False, callback=_set_quiet,
                             help="No progress bars or warnings on stderr.")


def common_options(func: Callable) -> Callable:
    """``--quiet`` and ``--debug``, accepted by every command (and by the group)."""
    return _debug_option(_quiet_option(func))


json_option = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
device_option = click.option("--device", type=click.Choice(list(DEVICE_CHOICES)), default="auto", show_default=True,
                             help="Where tensors are computed; auto picks CUDA when present.")
token_option = click.option("--token", default=None, metavar="TOKEN",
                            help="Hub token for OWNER/NAME inputs (default: HF_TOKEN, then the saved login); "
                                 "never printed.")


class _DtypeType(click.ParamType):
    """One dtype vocabulary for every command: the library's ``dtype_name`` (case-insensitive, with aliases)."""

    name = "dtype"

    def __init__(self, *, allow_auto: bool) -> None:
        self.allow_auto = allow_auto

    def _names(self) -> list[str]:
        return (["auto"] if self.allow_auto else []) + list(DTYPE_NAMES)

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return f"[{'|'.join(self._names())}]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from bora_tools.core.dtypes import dtype_name

        try:
            return dtype_name(value, allow_auto=self.allow_auto)
        except BoraError as e:
            self.fail(_with_flags(str(e).split(": ", 1)[-1], None), param, ctx)

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
        from click.shell_completion import CompletionItem

        # The canonical names, then the short aliases people type (fp16, bf16, ...).
        short = [a for a in DTYPE_ALIASES if a.startswith(("fp", "bf")) and a not in DTYPE_NAMES]
        return [CompletionItem(n) for n in self._names() + short if n.startswith(incomplete.lower())]


class _OuttypeChoice(click.Choice):
    """``--outtype``: lower-cased, dtype aliases mapped to GGUF names (fp16 -> f16), then the plain choice."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        key = str(value).strip().lower()
        key = GGUF_FLOAT_NAMES.get(DTYPE_ALIASES.get(key, ""), key)
        return super().convert(key, param, ctx)


class _InputType(click.ParamType):
    """A local path, or a Hub id ``owner/name[@revision]`` (downloaded in the command body, see ``_resolve``)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.name = "PATH|OWNER/NAME[@REV]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from bora_tools.io.hub_input import parse_hub_id
        from bora_tools.io.paths import long_component

        text = str(value)
        if long_component(text) is not None:  # no file system holds it: resolve_input says so in one line
            return text
        if Path(text).exists() or parse_hub_id(text) is not None:
            return text
        self.fail(f"Path {text!r} does not exist (and it is not a Hub id owner/name[@revision])", param, ctx)

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
        from click.shell_completion import CompletionItem

        return [CompletionItem(incomplete, type="dir")]


class _RankType(click.ParamType):
    """``--rank K|full``: the library's ``parse_rank``, failing as a click usage error."""

    name = "K|full"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        from bora_tools.core.lowrank import parse_rank

        try:
            return parse_rank(value)
        except BoraError:
            self.fail(f"expected a positive integer or 'full', found {value!r}", param, ctx)


def _resolve(spec: str, kind: str, *, token: str | None) -> Any:
    """A local path or Hub id -> ``HubInput`` (its ``path`` is local); says on stderr which one was used."""
    from bora_tools.io.hub_input import parse_hub_id, resolve_input

    found = resolve_input(spec, kind=kind, token=token, progress=make_progress())
    if not _state().quiet and (found.from_hub or parse_hub_id(spec) is not None):
        note = found.describe() + ("" if found.from_hub else f", not the Hub repo {spec}")
        click.echo(note, err=True)
    return found


def _resolve_base(base: str | None, adapter: Any, *, token: str | None) -> Any:
    """``--base`` as ``_resolve`` finds it, or, without it, the base the adapter records; stderr says which."""
    if base is not None:
        return _resolve(base, "model", token=token)
    from bora_tools.io.hub_input import recorded_base

    spec = recorded_base(adapter.path)
    if not _state().quiet:
        kind = "a local folder" if Path(spec).exists() else "a Hub id"
        click.echo(f"no --base given: using the base model the adapter records (base_model_name_or_path), "
                   f"{spec} ({kind})", err=True)
    return _resolve(spec, "model", token=token)
