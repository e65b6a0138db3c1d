"""``train``: supervised fine-tuning of a BoRA adapter with transformers' Trainer.

Its hyperparameter options are made from the fields of ``TrainOptions`` (``bora_tools.training.options``):
flags, help, defaults and checks are written there once; this module only maps each field to a click option.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from bora_tools.cli.frame import _state, print_report
from bora_tools.cli.params import (
    _DtypeType,
    _InputType,
    _resolve,
    common_options,
    device_option,
    json_option,
    overwrite_option,
    token_option,
)
from bora_tools.training.options import Flag, TrainOptions


class _ModulesType(click.ParamType):
    """``--target-modules``: comma-separated names -> a list; one name that is not a plain dotted name -> a regex."""

    name = "names"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[str] | str:
        if not isinstance(value, str):
            return value
        parts = [t.strip() for t in value.split(",") if t.strip()]
        return parts if "," in value or re.fullmatch(r"[\w.]+", value) else value


#: ``Flag.kind`` -> the click type of that kind of option.
KINDS: dict[str, click.ParamType] = {
    "dtype": _DtypeType(allow_auto=True),
    "directory": click.Path(file_okay=False, path_type=Path),
    "file": click.Path(dir_okay=False, path_type=Path),
    "modules": _ModulesType(),
}


def _click_option(field: dataclasses.Field, hint: Any) -> Callable:
    """One ``TrainOptions`` field as a click option: its flags, help and default; the type from its kind, its
    choices or its annotation (``bool``: an on/off flag; ``int``, ``float``; text); the default shown when it is
    a value."""
    flag: Flag = field.metadata["flag"]
    kwargs: dict[str, Any] = {"default": field.default, "help": flag.help}
    if flag.kind is not None:
        kwargs["type"] = KINDS[flag.kind]
    elif flag.choices:
        kwargs["type"] = click.Choice(list(flag.choices))
    else:
        scalars = [t for t in typing.get_args(hint) or (hint,) if t is not type(None)]
        if scalars == [bool]:
            kwargs["is_flag"] = True
        elif scalars in ([int], [float]):
            kwargs["type"] = scalars[0]
        elif not set(scalars) <= {str, Path}:  # text is click's default; anything else needs a kind
            raise TypeError(f"TrainOptions.{field.name}: {hint} has no click type; give its option a `kind`")
    if flag.flag_value is not None:
        kwargs.update(is_flag=False, flag_value=flag.flag_value)
    if flag.metavar is not None:
        kwargs["metavar"] = flag.metavar
    if field.default is not None and not isinstance(field.default, bool):
        kwargs["show_default"] = True
    return click.option(*flag.names, field.name, **kwargs)


def train_options(func: Callable) -> Callable:
    """Every ``TrainOptions`` field as a click option, in the fields' order."""
    hints = typing.get_type_hints(TrainOptions)
    for field in reversed(dataclasses.fields(TrainOptions)):
        func = _click_option(field, hints[field.name])(func)
    return func


#: parameters of ``train`` a config file may not set: the file itself, and how the result is shown
_NOT_IN_CONFIG = ("config", "as_json", "quiet", "debug", "token", "version", "help")


def _read_config(ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    """``--config``: the file's values become the defaults of the other options (a flag given wins)."""
    if value is None or ctx.resilient_parsing:
        return value
    from bora_tools.training.config_file import read_config_file

    extra = [p.name for p in ctx.command.params if p.name and p.name not in _NOT_IN_CONFIG]
    ctx.default_map = {**(ctx.default_map or {}), **read_config_file(value, extra=extra)}
    return value


@click.command("train", short_help="Fine-tune a BoRA adapter with transformers' Trainer (SFT, offline).")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), is_eager=True, expose_value=False,
              callback=_read_config, metavar="FILE.yaml",
              help="Options from a YAML file (keys: the options' names, e.g. lr, max_steps, base); flags win.")
@click.option("--base", required=True, type=_InputType("model"),
              help="The base model: a folder (config.json, safetensors, tokenizer) or a Hub id.")
@click.option("--data", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL: one {\"text\"}, {\"prompt\", \"completion\"}, {\"messages\"} or ShareGPT "
                   "{\"conversations\"} object per line.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The BoRA adapter directory to write.")
@train_options
@click.option("--push-to-hub", "push_to_hub", metavar="OWNER/NAME",
              help="At the end, push OUT to this Hub repo (through push), with a card recording the training.")
@device_option
@token_option
@overwrite_option
@json_option
@common_options
def train_cmd(base: str, data: Path, out: Path, push_to_hub: str | None, device: str, token: str | None,
              overwrite: bool, as_json: bool, **fields: Any) -> None:
    """Fine-tune a BoRA adapter on a causal LM with transformers' Trainer, offline; runs unchanged under torchrun.

    Loss is taken on every token of a text, on the completion of a prompt/completion record, and on
    the assistant turns of a chat (rendered with the tokenizer's chat template).

    \b
    Examples:
      bora-tools train --base ./Llama-3.2-1B --data chats.jsonl --out ./my-bora -r 8 --blocks 4 --epochs 2
      torchrun --nproc_per_node 8 -m bora_tools.cli train --base ./Llama-3.2-1B --data chats.jsonl --out ./my-bora
      bora-tools train --config run.yaml --max-steps 100
    """
    from bora_tools.training.sft import is_main_process, train

    if not _state().quiet and not _state().debug:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading bars; the loss lines are this command's progress
    main = is_main_process()
    if push_to_hub is not None and main:
        from bora_tools.hub.train_card import check_push

        check_push(push_to_hub, token)
    say = (lambda line: click.echo(line, err=True)) if main and not _state().quiet else None
    found = _resolve(base, "model", token=token) if main else None
    if found is None:  # the other processes of a torchrun job: the first one reported it; the cache holds it
        from bora_tools.io.hub_input import resolve_input

        found = resolve_input(base, kind="model", token=token)
    base_name = found.repo_id if found.from_hub else None  # recorded as base_model_name_or_path, for push's cards
    options = TrainOptions(**fields)
    report = train(found.path, data, out, options, device=device, overwrite=overwrite, base_name=base_name, log=say)
    if main and push_to_hub is not None and hasattr(report, "pushed"):
        from bora_tools.hub.train_card import push_trained

        report.pushed = push_trained(out, repo_id=push_to_hub, summary=report.to_dict(), token=token,
                                     hyperparameters=dataclasses.asdict(options), base_model=base_name).to_dict()
    if main:
        print_report(report, as_json=as_json)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # This command owns the torchrun job's process group: closed here, its gloo threads are joined rather
        # than torn down at interpreter exit (which can abort a process with "terminate called ...").
        dist.destroy_process_group()
