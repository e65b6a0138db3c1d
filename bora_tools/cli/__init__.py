"""The ``bora-tools`` command line (click): ``cli`` is the group, ``main`` the console-script entry point.

- ``app``: the group and ``main``; it registers the commands.
- ``frame``: exit codes, signals, one-line errors, ``--debug``/``--quiet`` state, warnings, progress, output.
- ``params``: the click types and the option stacks commands share.
- one module per command group, each with its examples: ``adapters`` (inspect, merge, to-lora),
  ``gguf`` (export-gguf), ``train``, ``hub`` (push), ``demo``.
"""

from bora_tools.cli.app import cli, main

__all__ = ["cli", "main"]
