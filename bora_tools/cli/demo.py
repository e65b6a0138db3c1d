"""``demo``: every command on a tiny model, offline."""

from __future__ import annotations

from pathlib import Path

import click

from bora_tools.cli.frame import emit_json, make_progress
from bora_tools.cli.params import common_options, json_option


@click.command("demo", short_help="Train a tiny BoRA adapter offline and run every command on it.")
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
