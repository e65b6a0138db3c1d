"""The ``bora-tools`` command line: the group, its entry point, and the commands it registers.

Each command lives in the module of its group (``adapters``, ``gguf``, ``train``, ``hub``, ``demo``),
with its examples; what they share is in ``frame`` (errors, signals, state, progress, output) and
``params`` (click types and option stacks). Nothing imports this module but ``__main__`` and the
package's ``__init__``.
"""

from __future__ import annotations

import signal

import click

from bora_tools.cli import adapters, demo, gguf, hub, train, verify
from bora_tools.cli.frame import _CleanErrorsGroup, install_warning_handler, version_option
from bora_tools.cli.params import common_options

_EPILOG = """\b
Inputs (ADAPTER, --base, SOURCE) are local folders or Hub ids, owner/name[@revision]; an existing local
path wins. Hub ids are downloaded into the Hugging Face cache (only the files the command reads).
\b
Shell completion (bash; zsh and fish likewise with zsh_source / fish_source):
  eval "$(_BORA_TOOLS_COMPLETE=bash_source bora-tools)"
"""


@click.group(cls=_CleanErrorsGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=_EPILOG)
@common_options
@version_option
def cli() -> None:
    """Ship BoRA adapters: inspect, merge, convert to LoRA, export GGUF, publish.

    Run `bora-tools demo` to see every step on a tiny model, offline.
    """
    install_warning_handler()


for _command in (adapters.inspect_cmd, demo.demo_cmd, hub.push_cmd, adapters.merge_cmd, gguf.export_gguf_cmd,
                 adapters.to_lora_cmd, train.train_cmd, verify.verify_cmd, adapters.combine_cmd):
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point."""
    try:
        cli(prog_name="bora-tools")
    finally:
        # The command is over (its outputs complete, its message printed): a signal arriving during the
        # interpreter's shutdown would only print a traceback, so it is ignored.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
