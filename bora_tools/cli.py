"""The ``bora-tools`` command line: parse, call one library function, report.

Common rules (docs/cli.md): a known error becomes one ``Error: ...`` line on
stderr and a non-zero exit, with no traceback unless ``--debug``; progress bars
go to stderr and ``--quiet`` silences them; ``--json`` prints a summary on
stdout.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click

from bora_tools.errors import BoraError
from bora_tools.progress import logger

# Exit codes: 1 for bad input or a refused operation, 2 for usage (click's own),
# 3 for an unexpected internal error, 130 for Ctrl-C.
EXIT_ERROR = 1
EXIT_INTERNAL = 3


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
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except BoraError as e:
            self._fail(ctx, _with_flags(e.one_line(), self.get_command(ctx, ctx.invoked_subcommand or "")), EXIT_ERROR)
        except KeyboardInterrupt:
            self._fail(ctx, "interrupted; nothing was written", 130)
        except Exception as e:  # an internal bug: still one line, with the way to learn more
            msg = f"unexpected {type(e).__name__}: {' '.join(str(e).split())} (rerun with --debug for the traceback)"
            self._fail(ctx, msg, EXIT_INTERNAL)

    @staticmethod
    def _fail(ctx: click.Context, message: str, code: int) -> None:
        if isinstance(ctx.obj, _State) and ctx.obj.debug:
            raise  # noqa: PLE0704 - re-raise the active exception with its traceback
        click.echo(f"Error: {message}", err=True)
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
dtype_choice = click.Choice(["auto", "float32", "float16", "bfloat16"])


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
    """Print ``data`` as JSON on stdout (paths and tuples made serialisable)."""
    click.echo(json.dumps(data, indent=2, default=lambda o: str(o) if isinstance(o, Path) else list(o)))


def print_report(report: Any, *, as_json: bool) -> None:
    """A command's report on stdout: ``to_dict()`` as JSON with ``--json``, else its text form."""
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(report.to_text())


class _WarningHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            quiet = _state().quiet
        except RuntimeError:
            quiet = False
        if not quiet:
            ctx = click.get_current_context(silent=True)
            click.echo(f"Warning: {_with_flags(record.getMessage(), ctx.command if ctx else None)}", err=True)


@click.group(cls=_CleanErrorsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@common_options
@click.version_option(package_name="bora-tools")
def cli() -> None:
    """Ship BoRA adapters: inspect, merge, convert to LoRA, export GGUF, publish.

    Run `bora-tools demo` to see every step on a tiny model, offline.
    """
    if not any(isinstance(h, _WarningHandler) for h in logger.handlers):
        logger.addHandler(_WarningHandler())
        logger.setLevel(logging.WARNING)
        logger.propagate = False


@cli.command("inspect")
@click.argument("adapter", type=click.Path(exists=True, file_okay=False, path_type=Path))
@device_option
@json_option
@common_options
def inspect_cmd(adapter: Path, device: str, as_json: bool) -> None:
    """Describe a BoRA adapter: modules, shapes, b, r, scaling, parameters, update ranks, sigma.

    Example: bora-tools inspect ./my-bora-adapter --json
    """
    from bora_tools.core.devices import resolve_device
    from bora_tools.inspection import inspect_adapter

    report = inspect_adapter(adapter, device=resolve_device(device), progress=make_progress())
    print_report(report, as_json=as_json)


@cli.command("demo")
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


@cli.command("push")
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

    Adds a model card when PATH has no README.md. Files already on the Hub are not sent again.
    Another server: set HF_ENDPOINT (and HF_HUB_DISABLE_XET=1 if it has no Xet storage).

    Example: bora-tools push ./my-bora-adapter me/my-bora --private
    """
    from bora_tools.hub.push import push

    if _state().quiet:
        from huggingface_hub.utils import disable_progress_bars
        from huggingface_hub.utils import logging as hf_logging

        disable_progress_bars()
        hf_logging.set_verbosity_error()
    result = push(path=path, repo_id=repo_id, private=private, revision=revision, create_pr=create_pr,
                  commit_message=commit_message, token=token, include=include, exclude=exclude,
                  base_model=base_model)
    print_report(result, as_json=as_json)


@cli.command("merge")
@click.argument("adapter", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--base", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The base model directory (config.json, safetensors shards).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The merged model directory to write.")
@click.option("--dtype", type=dtype_choice, default="auto", show_default=True,
              help="Output dtype of float tensors; auto keeps each base tensor's dtype.")
@click.option("--scale", type=float, default=1.0, show_default=True, help="Multiply the update: W + scale * dW.")
@device_option
@overwrite_option
@json_option
@common_options
def merge_cmd(adapter: Path, base: Path, out: Path, dtype: str, scale: float, device: str, overwrite: bool,
              as_json: bool) -> None:
    """Merge a BoRA adapter into its base model: OUT is a complete model directory.

    Example: bora-tools merge ./my-bora-adapter --base ./Llama-3.2-1B --out ./merged --dtype bfloat16
    """
    from bora_tools.merge import merge_adapter

    report = merge_adapter(adapter, base, out, dtype=dtype, scale=scale, device=device, overwrite=overwrite,
                           progress=make_progress())
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


@cli.command("export-gguf")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The .gguf file to write.")
@click.option("--base", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The base model directory, when SOURCE is an adapter.")
@click.option("--merge", is_flag=True, help="With an adapter: write the merged model as a full GGUF, in one pass.")
@click.option("--rank", type=_RankType(), default="full", show_default=True,
              help="LoRA export: 'full' is the exact form (rank b*r); K keeps the best rank-K truncation.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f16", show_default=True,
              help="Type of the weight matrices (norms and 1-D tensors stay f32; q8_0 falls back to f16 "
                   "where a row is not a multiple of 32).")
@device_option
@overwrite_option
@json_option
@common_options
def export_gguf_cmd(source: Path, out: Path, base: Path | None, merge: bool, rank: int | str, outtype: str,
                    device: str, overwrite: bool, as_json: bool) -> None:
    """Export a model directory, or a BoRA adapter (with --base), as GGUF for llama.cpp.

    \b
    Examples:
      bora-tools export-gguf ./Llama-3.2-1B --out model.gguf --outtype q8_0
      bora-tools export-gguf ./my-bora-adapter --base ./Llama-3.2-1B --out lora.gguf
      bora-tools export-gguf ./my-bora-adapter --base ./Llama-3.2-1B --merge --out merged.gguf
    """
    from bora_tools.gguf.export import export_gguf

    report = export_gguf(source, out, base=base, merge=merge, rank=rank, outtype=outtype, overwrite=overwrite,
                         device=device, progress=make_progress())
    print_report(report, as_json=as_json)


@cli.command("to-lora")
@click.argument("adapter", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The PEFT LoRA adapter directory to write.")
@click.option("--rank", type=_RankType(), default=None,
              help="'full': the exact factors (rank b*r, lossless); K: the best rank-K LoRA per module "
                   "(capped at each update's rank); with --energy, a cap.")
@click.option("--energy", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Per module, the smallest rank retaining at least this fraction of ||dW||_F^2.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="Dtype of the stored LoRA factors (computed in float64, cast once).")
@device_option
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the report as JSON to this file.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Draw singular value spectra and energy curves to this PNG (needs the 'plot' extra).")
@overwrite_option
@json_option
@common_options
def to_lora_cmd(adapter: Path, out: Path, rank: int | str | None, energy: float | None, dtype: str, device: str,
                report_path: Path | None, plot_path: Path | None, overwrite: bool, as_json: bool) -> None:
    """Convert a BoRA adapter into a plain PEFT LoRA adapter, exact or optimally truncated.

    \b
    Examples:
      bora-tools to-lora ./my-bora-adapter --out ./my-lora --rank full
      bora-tools to-lora ./my-bora-adapter --out ./my-lora-16 --rank 16 --dtype bfloat16
      bora-tools to-lora ./my-bora-adapter --out ./my-lora-99 --energy 0.99 --rank 32 --plot spectra.png
    """
    if rank is None and energy is None:
        raise click.UsageError("give --rank K, --rank full or --energy F")
    if rank == "full" and energy is not None:
        raise click.UsageError("--rank full keeps everything; it cannot be combined with --energy")
    from bora_tools.to_lora import to_lora

    report = to_lora(adapter, out, rank=rank, energy=energy, dtype=dtype, device=device, report=report_path,
                     plot=plot_path, overwrite=overwrite, progress=make_progress())
    print_report(report, as_json=as_json)


@cli.command("train")
@click.option("--base", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The base model directory (config.json, safetensors, tokenizer).")
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
@click.option("--dtype", type=dtype_choice, default="auto", show_default=True,
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
@overwrite_option
@json_option
@common_options
def train_cmd(base: Path, data: Path, out: Path, target_modules: str | None, as_json: bool, **options: Any) -> None:
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
    report = train(base, data, out, target_modules=targets, log=say, **options)
    if main:
        print_report(report, as_json=as_json)


# Commands are registered above this line.


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="bora-tools")


if __name__ == "__main__":
    main()
