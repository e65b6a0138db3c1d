"""``push``: an adapter, a model or a .gguf file to the Hugging Face Hub."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from bora_tools.cli.frame import make_progress, print_report
from bora_tools.cli.params import common_options, json_option


@click.command("push", short_help="Upload an adapter, model or .gguf file to the Hugging Face Hub.")
@click.argument("path")
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
@click.option("--base-model", default=None, metavar="OWNER/NAME", callback=lambda c, p, v: _hub_id(v),
              help="Base model for the card (a Hub id), when the files only record a local path.")
@json_option
@common_options
def push_cmd(path: str, repo_id: str, private: bool, revision: str | None, create_pr: bool,
             commit_message: str | None, token: str | None, include: tuple[str, ...], exclude: tuple[str, ...],
             base_model: str | None, as_json: bool) -> None:
    """Upload PATH (a directory or a .gguf file) to the Hub model repo REPO_ID, in one commit.

    Adds a model card when PATH has no README.md. Files already on the Hub are not sent again; when
    nothing changed, no commit is made and the report says so.
    Another server: set HF_ENDPOINT (and HF_HUB_DISABLE_XET=1 if it has no Xet storage).

    The order is PATH then REPO_ID (hf upload's is the reverse: hf's order is refused, with the right one).

    Example: bora-tools push ./my-bora-adapter me/my-bora --private
    """
    from bora_tools.hub.push import push

    result = push(path=_path(path, repo_id), repo_id=repo_id, private=private, revision=revision, create_pr=create_pr,
                  commit_message=commit_message, token=token, include=include, exclude=exclude,
                  base_model=base_model, progress=make_progress())
    print_report(result, as_json=as_json)


def _path(path: str, repo_id: str) -> Path:
    """PATH, checked; ``push REPO_ID PATH`` (hf upload's order) is recognised and refused with the right order."""
    from bora_tools.io.hub_input import parse_hub_id

    if Path(path).exists():
        return Path(path)
    if Path(repo_id).exists() and parse_hub_id(path) is not None:
        raise click.UsageError(f"PATH comes first, then REPO_ID (hf upload's order is the reverse): "
                               f"bora-tools push {shlex.quote(repo_id)} {shlex.quote(path)}")
    raise click.BadParameter(f"Path {path!r} does not exist.", param_hint="'PATH'")


def _hub_id(value: str | None) -> str | None:
    from bora_tools.hub.card import is_hub_model_id

    if value is not None and not is_hub_model_id(value):
        raise click.BadParameter(f"{value!r} is not a Hub model id (owner/name)", param_hint="'--base-model'")
    return value
