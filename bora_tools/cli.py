"""The ``bora-tools`` command line: parse, call one library function, report.

Common rules (docs/cli.md): a known error becomes one ``Error: ...`` line on
stderr and a non-zero exit, with no traceback unless ``--debug``; progress bars
go to stderr and ``--quiet`` silences them; ``--json`` prints a summary on
stdout.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click

from bora_tools.errors import BoraError, scrub
from bora_tools.gguf.outtypes import OUTTYPES
from bora_tools.progress import logger

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
    from bora_tools.io.atomic import COMMITTED

    what = "terminated" if isinstance(e, Terminated) else "interrupted"
    if COMMITTED:
        return f"{what} after {COMMITTED[-1]} was written; it is complete"
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
            self._fail(ctx, _interrupted_message(e), EXIT_SIGTERM if isinstance(e, Terminated) else EXIT_SIGINT)
        except RecursionError:  # a hostile input nested beyond what a reader checks: still one line
            self._fail(ctx, "an input is nested too deeply to be read", EXIT_ERROR)
        except Exception as e:  # an internal bug: still one line, with the way to learn more
            msg = f"unexpected {type(e).__name__}: {' '.join(str(e).split())} (rerun with --debug for the traceback)"
            self._fail(ctx, msg, EXIT_INTERNAL)
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


_PARAM = re.compile(r"`([a-z_]+)`")


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


_debug_option = click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                             help="Show the full traceback on errors.")
_quiet_option = click.option("--quiet", "-q", is_flag=True, expose_value=False, callback=_set_quiet,
                             help="No progress bars or warnings on stderr.")


def common_options(func: Callable) -> Callable:
    """``--quiet`` and ``--debug``, accepted by every command (and by the group)."""
    return _debug_option(_quiet_option(func))


json_option = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                             help="Where tensors are computed; auto picks CUDA when present.")
token_option = click.option("--token", default=None, metavar="TOKEN",
                            help="Hub token for OWNER/NAME inputs (default: HF_TOKEN, then the saved login); "
                                 "never printed.")


class _DtypeType(click.ParamType):
    """One dtype vocabulary for every command: the library's ``dtype_name`` (case-insensitive, with aliases)."""

    name = "dtype"

    def __init__(self, *, allow_auto: bool) -> None:
        self.allow_auto = allow_auto

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[auto|float32|float16|bfloat16]" if self.allow_auto else "[float32|float16|bfloat16]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from bora_tools.core.dtypes import dtype_name

        try:
            return dtype_name(value, allow_auto=self.allow_auto)
        except BoraError as e:
            self.fail(_with_flags(str(e).split(": ", 1)[-1], None), param, ctx)

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
        from click.shell_completion import CompletionItem

        names = (["auto"] if self.allow_auto else []) + ["float32", "float16", "bfloat16", "fp32", "fp16", "bf16"]
        return [CompletionItem(n) for n in names if n.startswith(incomplete.lower())]


class _OuttypeChoice(click.Choice):
    """``--outtype``: lower-cased, dtype aliases mapped to GGUF names (fp16 -> f16), then the plain choice."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from bora_tools.core.dtypes import DTYPE_ALIASES, GGUF_FLOAT_NAMES

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

        text = str(value)
        if Path(text).exists() or parse_hub_id(text) is not None:
            return text
        self.fail(f"Path {text!r} does not exist (and it is not a Hub id owner/name[@revision])", param, ctx)

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
        from click.shell_completion import CompletionItem

        return [CompletionItem(incomplete, type="dir")]


def _resolve(spec: str, kind: str, *, token: str | None) -> Any:
    """A local path or Hub id -> ``HubInput`` (its ``path`` is local); says on stderr which one was used."""
    from bora_tools.io.hub_input import parse_hub_id, resolve_input

    found = resolve_input(spec, kind=kind, token=token, progress=make_progress())
    if not _state().quiet and (found.from_hub or parse_hub_id(spec) is not None):
        note = found.describe() + ("" if found.from_hub else f", not the Hub repo {spec}")
        click.echo(note, err=True)
    return found


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


_EPILOG = """\b
Inputs (ADAPTER, --base, SOURCE) are local folders or Hub ids, owner/name[@revision]; an existing local
path wins. Hub ids are downloaded into the Hugging Face cache (only the files the command reads).
\b
Shell completion (bash; zsh and fish likewise with zsh_source / fish_source):
  eval "$(_BORA_TOOLS_COMPLETE=bash_source bora-tools)"
"""


@click.group(cls=_CleanErrorsGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=_EPILOG)
@common_options
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_version,
              help="Show the versions of bora-tools, Python and the libraries it uses, and exit.")
def cli() -> None:
    """Ship BoRA adapters: inspect, merge, convert to LoRA, export GGUF, publish.

    Run `bora-tools demo` to see every step on a tiny model, offline.
    """
    if not any(isinstance(h, _WarningHandler) for h in logger.handlers):
        logger.addHandler(_WarningHandler())
        logger.setLevel(logging.DEBUG)  # the handler shows debug lines only under --debug
        logger.propagate = False


@cli.command("inspect", short_help="Describe a BoRA adapter: modules, shapes, ranks, sigma.")
@click.argument("adapter", type=_InputType("adapter"))
@device_option
@token_option
@json_option
@common_options
def inspect_cmd(adapter: str, device: str, token: str | None, as_json: bool) -> None:
    """Describe a BoRA adapter: modules, shapes, b, r, scaling, parameters, update ranks, sigma.

    \b
    Examples:
      bora-tools inspect ./my-bora-adapter --json
      bora-tools inspect someone/my-bora@v1
    """
    from bora_tools.core.devices import resolve_device
    from bora_tools.inspection import inspect_adapter

    found = _resolve(adapter, "adapter", token=token)
    report = inspect_adapter(found.path, device=resolve_device(device), progress=make_progress())
    print_report(report, as_json=as_json)


@cli.command("demo", short_help="Train a tiny BoRA adapter offline and run every command on it.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the demo's files here (default: a temporary directory, removed afterwards).")
@click.option("--steps", type=click.IntRange(min=1), default=60, show_default=True, help="Training steps.")
@json_option
@common_options
def demo_cmd(workdir: Path | None, steps: int, as_json: bool) -> None:
    """Train a BoRA adapter on a tiny model offline, then run every command on it.

    Example: bora-tools demo
    """
    from bora_tools.demo.run import run_demo

    # With --json the step lines go to stderr and stdout holds only the figures.
    say = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    report = run_demo(workdir=workdir, steps=steps, say=say, progress=make_progress())
    say(report.to_text())
    if as_json:
        emit_json(report.to_dict())


@cli.command("push", short_help="Upload an adapter, model or .gguf file to the Hugging Face Hub.")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, metavar="BRANCH",
              help="Commit to this branch, created from main when missing; with --create-pr, the PR's target.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--commit-message", default=None, help="Default: 'Upload <what PATH holds> with bora-tools'.")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN, then the saved login); never printed.")
@click.option("--include", multiple=True, metavar="PATTERN", help="Upload only the paths matching (repeatable).")
@click.option("--exclude", multiple=True, metavar="PATTERN",
              help="Skip the paths matching (repeatable); --exclude README.md leaves out the generated card.")
@click.option("--base-model", default=None, metavar="OWNER/NAME",
              help="Base model for the card, when the files only record a local path.")
@json_option
@common_options
def push_cmd(path: Path, repo_id: str, private: bool, revision: str | None, create_pr: bool,
             commit_message: str | None, token: str | None, include: tuple[str, ...], exclude: tuple[str, ...],
             base_model: str | None, as_json: bool) -> None:
    """Upload PATH (a directory or a .gguf file) to the Hub model repo REPO_ID, in one commit.

    Adds a model card when PATH has no README.md. Files already on the Hub are not sent again; when
    nothing changed, no commit is made and the report says so.
    Another server: set HF_ENDPOINT (and HF_HUB_DISABLE_XET=1 if it has no Xet storage).

    Example: bora-tools push ./my-bora-adapter me/my-bora --private
    """
    from bora_tools.hub.push import push

    result = push(path=path, repo_id=repo_id, private=private, revision=revision, create_pr=create_pr,
                  commit_message=commit_message, token=token, include=include, exclude=exclude,
                  base_model=base_model, progress=make_progress())
    print_report(result, as_json=as_json)


@cli.command("merge", short_help="Merge a BoRA adapter into its base model (a full model folder).")
@click.argument("adapter", type=_InputType("adapter"))
@click.option("--base", required=True, type=_InputType("model"),
              help="The base model: a folder (config.json, safetensors shards) or a Hub id.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="The merged model directory to write (missing parent folders are created).")
@click.option("--dtype", type=_DtypeType(allow_auto=True), default="auto", show_default=True,
              help="Output dtype of float tensors (fp16, bf16, ... accepted); auto keeps each base tensor's dtype.")
@click.option("--scale", type=float, default=1.0, show_default=True, help="Multiply the update: W + scale * dW.")
@device_option
@token_option
@overwrite_option
@json_option
@common_options
def merge_cmd(adapter: str, base: str, out: Path, dtype: str, scale: float, device: str, token: str | None,
              overwrite: bool, as_json: bool) -> None:
    """Merge a BoRA adapter into its base model: OUT is a complete model directory.

    \b
    Examples:
      bora-tools merge ./my-bora-adapter --base ./Llama-3.2-1B --out ./merged --dtype bf16
      bora-tools merge someone/my-bora --base meta-llama/Llama-3.2-1B@main --out ./merged
    """
    from bora_tools.merge import merge_adapter

    found_adapter = _resolve(adapter, "adapter", token=token)
    found_base = _resolve(base, "model", token=token)
    report = merge_adapter(found_adapter.path, found_base.path, out, dtype=dtype, scale=scale, device=device,
                           overwrite=overwrite, progress=make_progress(), base_name=found_base.repo_id)
    print_report(report, as_json=as_json)


class _RankType(click.ParamType):
    """``--rank K|full``: the library's ``parse_rank``, failing as a click usage error."""

    name = "K|full"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        from bora_tools.core.lowrank import parse_rank

        try:
            return parse_rank(value)
        except BoraError:
            self.fail(f"expected a positive integer or 'full', found {value!r}", param, ctx)


@cli.command("export-gguf", short_help="Export a model or a BoRA adapter as GGUF for llama.cpp.")
@click.argument("source", type=_InputType("any"))
@click.option("--out", required=True, type=click.Path(),
              help="The .gguf file to write, or an existing folder (or one ending in /) to write "
                   "<name>-<outtype>.gguf into.")
@click.option("--base", type=_InputType("model"), default=None,
              help="The base model (a folder or a Hub id), when SOURCE is an adapter.")
@click.option("--merge", is_flag=True, help="With an adapter: write the merged model as a full GGUF, in one pass.")
@click.option("--rank", type=_RankType(), default=None,
              help="LoRA export: 'full' (the default) is the exact form (rank b*r); K keeps the best rank-K "
                   "truncation.")
@click.option("--outtype", type=_OuttypeChoice(list(OUTTYPES)), default="f16", show_default=True, metavar="TYPE",
              help="Type of the weight matrices, case-insensitive: f32, f16, bf16, q8_0 (norms and 1-D tensors stay "
                   "f32; q8_0 falls back to f16 where a row is not a multiple of 32). Full and merged models also "
                   "take llama.cpp's quantizations, made by its own quantizer (the 'llama' extra): q4_0, q4_1, q5_0, "
                   "q5_1, q2_k, q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads of llama.cpp's quantizer  [default: all cores]")
@device_option
@token_option
@overwrite_option
@json_option
@common_options
def export_gguf_cmd(source: str, out: str, base: str | None, merge: bool, rank: int | str | None, outtype: str,
                    threads: int | None, device: str, token: str | None, overwrite: bool, as_json: bool) -> None:
    """Export a model directory, or a BoRA adapter (with --base), as GGUF for llama.cpp.

    \b
    Examples:
      bora-tools export-gguf ./Llama-3.2-1B --out model.gguf --outtype q8_0
      bora-tools export-gguf ./my-bora-adapter --base ./Llama-3.2-1B --out lora.gguf
      bora-tools export-gguf ./my-bora-adapter --base ./Llama-3.2-1B --merge --out merged.gguf
      bora-tools export-gguf ./my-bora-adapter --base ./Llama-3.2-1B --merge --out merged-q4.gguf --outtype q4_k_m
    """
    if merge and base is None:
        raise click.UsageError("--merge needs --base: the base model the adapter was trained on")
    if rank is not None and base is None:
        raise click.UsageError("--rank applies only to a LoRA adapter export (an adapter with --base)")
    if rank is not None and merge:
        raise click.UsageError("--rank applies only to a LoRA adapter export, not with --merge")
    from bora_tools.gguf.export import export_gguf

    found = _resolve(source, "any" if base is None else "adapter", token=token)
    found_base = _resolve(base, "model", token=token) if base is not None else None
    out = _gguf_target(out, source, found.path, base=base, merge=merge, outtype=outtype)
    report = export_gguf(found.path, out, base=found_base.path if found_base else None, merge=merge,
                         rank=rank or "full", outtype=outtype, overwrite=overwrite, device=device,
                         threads=threads, progress=make_progress(), name=_gguf_name(found_base if merge else found))
    print_report(report, as_json=as_json)


@cli.command("to-lora", short_help="Convert a BoRA adapter to a PEFT LoRA, exact or truncated.")
@click.argument("adapter", type=_InputType("adapter"))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The PEFT LoRA adapter directory to write.")
@click.option("--rank", type=_RankType(), default=None,
              help="'full' (the default without --energy): the exact factors (rank b*r, lossless); K: the best "
                   "rank-K LoRA per module (capped at each update's rank); with --energy, a cap.")
@click.option("--energy", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Per module, the smallest rank retaining at least this fraction of ||dW||_F^2.")
@click.option("--dtype", type=_DtypeType(allow_auto=False), default="float32", show_default=True,
              help="Dtype of the stored LoRA factors, fp16/bf16/... accepted (computed in float64, cast once).")
@device_option
@token_option
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the report as JSON to this file.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Draw singular value spectra and energy curves to this PNG (needs the 'plot' extra).")
@overwrite_option
@json_option
@common_options
def to_lora_cmd(adapter: str, out: Path, rank: int | str | None, energy: float | None, dtype: str, device: str,
                token: str | None, report_path: Path | None, plot_path: Path | None, overwrite: bool,
                as_json: bool) -> None:
    """Convert a BoRA adapter into a plain PEFT LoRA adapter, exact or optimally truncated.

    \b
    Examples:
      bora-tools to-lora ./my-bora-adapter --out ./my-lora
      bora-tools to-lora someone/my-bora@v1 --out ./my-lora
      bora-tools to-lora ./my-bora-adapter --out ./my-lora-16 --rank 16 --dtype bf16
      bora-tools to-lora ./my-bora-adapter --out ./my-lora-99 --energy 0.99 --rank 32 --plot spectra.png
    """
    if rank is None and energy is None:
        rank = "full"
    if rank == "full" and energy is not None:
        raise click.UsageError("--rank full keeps everything; it cannot be combined with --energy")
    from bora_tools.conversion import to_lora

    found = _resolve(adapter, "adapter", token=token)
    report = to_lora(found.path, out, rank=rank, energy=energy, dtype=dtype, device=device, report=report_path,
                     plot=plot_path, overwrite=overwrite, progress=make_progress(),
                     name=found.repo_id if found.from_hub else None)
    print_report(report, as_json=as_json)


def _gguf_name(found: Any) -> str | None:
    """The name a GGUF records (general.name): the repo's name for a Hub input (its cache folder is a commit)."""
    return found.repo_id.split("/")[-1] if found is not None and found.from_hub else None


def _gguf_target(out: str, source: str, local: Path, *, base: str | None, merge: bool, outtype: str) -> Path:
    """``--out``: a file, or a folder (existing, or written with a trailing /) that gets a default name.

    The default name follows llama.cpp's converters: ``<name>-<outtype>.gguf``, where ``<name>`` is the
    source's folder or repo name (``-merged`` or ``-lora`` added for adapters).
    """
    from bora_tools.io.hub_input import parse_hub_id

    path = Path(out)
    if path.is_dir() or out.endswith(("/", os.sep)):
        parsed = parse_hub_id(source) if not Path(source).exists() else None
        name = parsed[0].split("/")[-1] if parsed else local.resolve().name
        kind = "" if base is None else ("-merged" if merge else "-lora")
        return path / f"{name}{kind}-{outtype}.gguf"
    if path.suffix.lower() != ".gguf" and not _state().quiet:
        click.echo(f"Warning: {out} does not end in .gguf; llama.cpp does not mind, but people and tools look for "
                   "the suffix", err=True)
    return path


@cli.command("train", short_help="Fine-tune a BoRA adapter with transformers' Trainer (SFT, offline).")
@click.option("--base", required=True, type=_InputType("model"),
              help="The base model: a folder (config.json, safetensors, tokenizer) or a Hub id.")
@click.option("--data", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL: one {\"text\"}, {\"prompt\", \"completion\"} or {\"messages\"} object per line.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The BoRA adapter directory to write.")
@click.option("-r", "--rank", "r", type=int, default=8, show_default=True, help="Rank r of each block product.")
@click.option("--blocks", type=int, default=4, show_default=True, help="BoRA blocks b (must divide every dimension).")
@click.option("--alpha", type=float, default=None, help="lora_alpha (default: r, a scaling of 1).")
@click.option("--rslora", is_flag=True, help="Scale by alpha/sqrt(r) instead of alpha/r.")
@click.option("--target-modules", default=None, metavar="NAMES",
              help="Comma-separated module names (or one regex); default: every linear projection but the head.")
@click.option("--dropout", type=float, default=0.0, show_default=True, help="Dropout on the BoRA path's input.")
@click.option("--epochs", type=float, default=1.0, show_default=True, help="Passes over the data.")
@click.option("--max-steps", type=int, default=None, help="Stop after this many optimizer steps (overrides --epochs).")
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--scheduler", type=click.Choice(["linear", "cosine", "constant"]), default="linear",
              show_default=True, help="Learning-rate schedule after warmup.")
@click.option("--warmup-steps", type=int, default=0, show_default=True, help="Linear warmup steps.")
@click.option("--batch-size", type=int, default=4, show_default=True,
              help="Examples per process and step; global batch = batch size x grad accum x processes.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Gradient accumulation steps.")
@click.option("--max-length", type=int, default=1024, show_default=True, help="Cut examples at this many tokens.")
@click.option("--dtype", type=_DtypeType(allow_auto=True), default="auto", show_default=True,
              help="Base weights' dtype (auto: as stored); bfloat16/float16 also train under autocast. "
                   "Factors stay float32.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in backward: less memory.")
@click.option("--save-steps", type=int, default=None, help="Write an adapter-only checkpoint every N steps.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where checkpoints go (default: OUT-checkpoints next to OUT).")
@click.option("--resume", default=None, is_flag=False, flag_value="last", metavar="[CHECKPOINT]",
              help="Resume from the latest checkpoint, or from the checkpoint-N directory given.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the adapter's init and data order.")
@click.option("--logging-steps", type=int, default=None, help="Log the loss every N steps (default: about 20 lines).")
@device_option
@token_option
@overwrite_option
@json_option
@common_options
def train_cmd(base: str, data: Path, out: Path, target_modules: str | None, token: str | None, as_json: bool,
              **options: Any) -> None:
    """Fine-tune a BoRA adapter on a causal LM with transformers' Trainer, offline; runs unchanged under torchrun.

    Loss is taken on every token of a text, on the completion of a prompt/completion record, and on
    the assistant turns of a chat (rendered with the tokenizer's chat template).

    \b
    Examples:
      bora-tools train --base ./Llama-3.2-1B --data chats.jsonl --out ./my-bora -r 8 --blocks 4 --epochs 2
      torchrun --nproc_per_node 8 -m bora_tools.cli train --base ./Llama-3.2-1B --data chats.jsonl --out ./my-bora
    """
    from bora_tools.training.sft import is_main_process, train

    if not _state().quiet and not _state().debug:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading bars; the loss lines are this command's progress
    targets = None
    if target_modules is not None:
        parts = [t.strip() for t in target_modules.split(",") if t.strip()]
        targets = parts if "," in target_modules or re.fullmatch(r"[\w.]+", target_modules) else target_modules
    main = is_main_process()
    say = (lambda line: click.echo(line, err=True)) if main and not _state().quiet else None
    found = _resolve(base, "model", token=token) if main else None
    if found is None:  # the other processes of a torchrun job: the first one reported it; the cache holds it
        from bora_tools.io.hub_input import resolve_input

        found = resolve_input(base, kind="model", token=token)
    base_name = found.repo_id if found.from_hub else None  # recorded as base_model_name_or_path, for push's cards
    report = train(found.path, data, out, target_modules=targets, base_name=base_name, log=say, **options)
    if main:
        print_report(report, as_json=as_json)


# Commands are registered above this line.


def main() -> None:
    """Console-script entry point."""
    try:
        cli(prog_name="bora-tools")
    finally:
        # The command is over (its outputs complete, its message printed): a signal arriving during the
        # interpreter's shutdown would only print a traceback, so it is ignored.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    main()
