"""What every command runs inside: exit codes, signals, one-line errors, per-run state, warnings, progress, output.

Common rules (docs/cli.md): a known error becomes one ``Error: ...`` line on
stderr and a non-zero exit, with no traceback unless ``--debug``; progress bars
go to stderr and ``--quiet`` silences them; ``--json`` prints a summary on
stdout.
"""

from __future__ import annotations

import errno
import logging
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import click

from bora_tools.errors import BoraError, scrub

# Exit codes: 1 for bad input or a refused operation, 2 for usage (click's own),
# 3 for an unexpected internal error, 130 for Ctrl-C (SIGINT), 143 for SIGTERM.
EXIT_ERROR = 1
EXIT_INTERNAL = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM (what ``timeout``, Docker and Slurm send), unwound like Ctrl-C so that temporaries are removed."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _interrupted_message(e: KeyboardInterrupt) -> str:
    from bora_tools.io.atomic import COMMITTED, KEPT

    what = "terminated" if isinstance(e, Terminated) else "interrupted"
    if COMMITTED:
        return f"{what} after {COMMITTED[-1]} was written; it is complete"
    if KEPT:
        return f"{what}: {KEPT[-1]}"
    return f"{what}; nothing was written"


class _State:
    """Per-invocation flags shared by the group and its commands."""

    def __init__(self) -> None:
        self.debug = False
        self.quiet = False


def _state() -> _State:
    ctx = click.get_current_context()
    root = ctx.find_root()
    if not isinstance(root.obj, _State):
        root.obj = _State()
    return root.obj


class _CleanErrorsGroup(click.Group):
    """Turns known errors into one line; shows tracebacks only under ``--debug``."""

    def invoke(self, ctx: click.Context) -> Any:
        main = threading.current_thread() is threading.main_thread()
        old_term = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except BoraError as e:
            self._fail(ctx, _with_flags(e.one_line(), self.get_command(ctx, ctx.invoked_subcommand or "")), EXIT_ERROR)
        except KeyboardInterrupt as e:
            command = self.get_command(ctx, ctx.invoked_subcommand or "")
            self._fail(ctx, _with_flags(_interrupted_message(e), command),
                       EXIT_SIGTERM if isinstance(e, Terminated) else EXIT_SIGINT)
        except OSError as e:
            if e.errno != errno.ENAMETOOLONG:
                self._fail(ctx, _unexpected(e), EXIT_INTERNAL)
            # a name over 255 bytes met by a check that came first (an existence test): the culprit, one line
            self._fail(ctx, _too_long(e), EXIT_ERROR)
        except RecursionError:  # a hostile input nested beyond what a reader checks: still one line
            self._fail(ctx, "an input is nested too deeply to be read", EXIT_ERROR)
        except Exception as e:  # an internal bug: still one line, with the way to learn more
            self._fail(ctx, _unexpected(e), EXIT_INTERNAL)
        finally:
            if main:
                signal.signal(signal.SIGTERM, old_term if old_term is not None else signal.SIG_DFL)

    @staticmethod
    def _fail(ctx: click.Context, message: str, code: int) -> None:
        if isinstance(ctx.obj, _State) and ctx.obj.debug:
            # The traceback of the active exception and its chained causes, with every secret (a Hub
            # token in a header an HTTP library echoed) masked: printed here rather than re-raised.
            click.echo(scrub("".join(traceback.format_exc())).rstrip("\n"), err=True)
        click.echo(f"Error: {scrub(message)}", err=True)
        ctx.exit(code)


def _too_long(e: OSError) -> str:
    from bora_tools.io.paths import check_name_lengths

    try:
        check_name_lengths(str(e.filename), "a path")
    except BoraError as found:
        return found.one_line()
    return f"{e.filename}: the path is longer than the file system accepts"


def _unexpected(e: Exception) -> str:
    return f"unexpected {type(e).__name__}: {' '.join(str(e).split())} (rerun with --debug for the traceback)"


_PARAM = re.compile(r"`([a-z_][a-z0-9_]*)`")


def _with_flags(message: str, command: click.Command | None) -> str:
    """Library messages name parameters in backquotes (`scale`); a terminal user reads the flag (--scale).

    The one place where parameter names become flags: each command's own click parameters say how.
    """
    if command is None:
        return message
    flags = {}
    for p in command.params:
        shown = p.opts[0] if isinstance(p, click.Option) else (p.name or "").upper()
        flags[p.name] = shown
        flags.update({opt.lstrip("-").replace("-", "_"): shown for opt in p.opts})  # --plot names plot_path
    return _PARAM.sub(lambda m: flags.get(m.group(1), m.group(1)), message)


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        _state().debug = True
    return value


def _set_quiet(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        _state().quiet = True
    return value


def _version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """``--version``: ours, then Python and every library whose version changes results (as ``hf env`` does)."""
    if not value or ctx.resilient_parsing:
        return
    import platform
    from importlib.metadata import PackageNotFoundError, version

    lines = []
    for dist in ("bora-tools", "torch", "transformers", "peft", "safetensors", "gguf", "huggingface_hub",
                 "llama-cpp-python", "click"):
        try:
            lines.append(f"{dist}: {version(dist)}")
        except PackageNotFoundError:
            lines.append(f"{dist}: not installed")
        if dist == "bora-tools":
            lines.append(f"Python: {platform.python_version()} ({platform.platform(terse=True)})")
    click.echo("\n".join(lines))
    ctx.exit(0)


version_option = click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_version,
                              help="Show the versions of bora-tools, Python and the libraries it uses, and exit.")


def make_progress() -> Callable[..., Iterable]:
    """A progress callable for library functions: a bar on stderr, or nothing when quiet."""
    if _state().quiet:
        from bora_tools.progress import no_progress
        return no_progress

    def progress(items: Iterable, *, total: int | None = None, label: str = "") -> Iterable:
        if total is None:
            try:
                total = len(items)  # type: ignore[arg-type]
            except TypeError:
                total = None
        with click.progressbar(items, length=total, label=label, file=sys.stderr) as bar:
            yield from bar

    return progress


def emit_json(data: Any) -> None:
    """Print ``data`` as strict JSON on stdout (``report.json_text``: non-finite numbers become ``null``)."""
    from bora_tools.report import json_text

    click.echo(json_text(data))


def print_report(report: Any, *, as_json: bool) -> None:
    """A command's report on stdout: ``to_dict()`` as JSON with ``--json``, else its text form."""
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(report.to_text())


class _WarningHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            quiet, debug = _state().quiet, _state().debug
        except RuntimeError:
            quiet = debug = False
        if record.levelno < logging.WARNING:  # debug lines (llama.cpp's log): only under --debug
            if debug:
                click.echo(f"Debug: {record.getMessage()}", err=True)
            return
        if not quiet:
            ctx = click.get_current_context(silent=True)
            click.echo(f"Warning: {_with_flags(record.getMessage(), ctx.command if ctx else None)}", err=True)


def install_warning_handler() -> None:
    """Library warnings (``bora_tools.progress.logger``) become ``Warning: ...`` lines, with flags for names."""
    from bora_tools.progress import logger

    if not any(isinstance(h, _WarningHandler) for h in logger.handlers):
        logger.addHandler(_WarningHandler())
        logger.setLevel(logging.DEBUG)  # the handler shows debug lines only under --debug
        logger.propagate = False
    # bitsandbytes (the qlora extra), once imported by transformers or peft, logs on some CPUs that an optional
    # kernel could not be fetched: noise on every command's stderr. Its errors still show.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
