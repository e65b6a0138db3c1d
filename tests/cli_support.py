"""Driving the command line in tests: one runner, and the bad-input harness.

``run(*args)`` is ``CliRunner().invoke(cli, args)`` with every argument turned into a string (paths and
numbers may be passed as they are); keyword arguments go to ``invoke`` (``input=``, ``env=``...).

The bad-input harness (test_bad_inputs.py, test_hardening.py): the ``work`` fixture of conftest.py gives
a test its own copies of the pristine inputs (``work["adapter"]``, ``work["base"]``) and an empty
``work["outdir"]``; ``COMMANDS[name](work)`` is a command line on them, and ``clean_failure(work, argv,
*culprits)`` runs it and checks the refusal: exit code 1 (or ``code``), stderr exactly one ``Error:``
line naming every culprit, no traceback, and every input untouched with nothing written (no temporary
left behind either). A new bad input is one entry in a cases table: a function that spoils the copy and the
words its error line must hold::

    ADAPTER_CASES = {..., "nan": (tensors(lambda t: t[Q + ".lora_B.weight"].fill_(math.nan)), "lora_B")}

A command the harness does not know yet is one line in ``COMMANDS`` (its inputs taken from ``work``).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result
from safetensors.torch import load_file, save_file

from bora_tools.cli import cli
from bora_tools.io.model_dir import INDEX_FILE

#: The weights file of a saved adapter, and a module every tiny llama adapter adapts.
ST = "adapter_model.safetensors"
Q = "base_model.model.model.layers.0.self_attn.q_proj"


def run(*args: object, **invoke: Any) -> Result:
    """``bora-tools ARGS`` in this process (click's ``CliRunner``; stdout and stderr kept apart)."""
    return CliRunner().invoke(cli, [str(a) for a in args], **invoke)


# -- the commands of the harness, on the inputs of `work` ---------------------------------------------------

Work = dict[str, Path]

COMMANDS: dict[str, Callable[[Work], list]] = {
    "inspect": lambda w: ["inspect", w["adapter"]],
    "merge": lambda w: ["merge", w["adapter"], "--base", w["base"], "--out", w["outdir"] / "merged"],
    "to-lora": lambda w: ["to-lora", w["adapter"], "--out", w["outdir"] / "lora", "--rank", "full"],
    "combine": lambda w: ["combine", w["adapter"], w["adapter"], "--weights", "1,-0.5", "--out", w["outdir"] / "sum"],
    "gguf-lora": lambda w: ["export-gguf", w["adapter"], "--base", w["base"], "--out", w["outdir"] / "lora.gguf"],
    "gguf-merge": lambda w: ["export-gguf", w["adapter"], "--base", w["base"], "--merge",
                             "--out", w["outdir"] / "m.gguf"],
    "gguf-full": lambda w: ["export-gguf", w["base"], "--out", w["outdir"] / "base.gguf"],
}
READS_ADAPTER = ["inspect", "merge", "to-lora", "gguf-lora", "gguf-merge", "combine"]
READS_BASE = ["merge", "gguf-lora", "gguf-merge", "gguf-full"]
WRITES = ["merge", "to-lora", "gguf-lora", "gguf-merge", "gguf-full", "combine"]
GGUF = ["gguf-full", "gguf-lora", "gguf-merge"]


def output_of(argv: Sequence) -> Path:
    """The ``--out`` of a command line."""
    return Path(argv[list(argv).index("--out") + 1])


# -- the refusal ------------------------------------------------------------------------------------------


def snapshot(work: Work) -> dict[str, list]:
    """Every entry under each directory of ``work``, with its size and modification time."""
    return {k: sorted((p.relative_to(v), p.stat().st_size, p.stat().st_mtime_ns) for p in v.rglob("*"))
            for k, v in work.items()}


def clean_failure(work: Work, argv: str | Sequence, *culprits: str, code: int = 1) -> str:
    """Run ``argv`` (a ``COMMANDS`` name, or a command line); assert a clean refusal and return its line.

    The rules of every refusal: exit ``code``; stderr is one ``Error:`` line, holding every one of
    ``culprits``; no traceback; the inputs of ``work`` untouched and nothing written. stderr holds nothing
    else, so a refusal without ``--quiet`` also proves it came before any work began (no progress label,
    no warning); a refusal that can only come during the work is checked with ``--quiet`` in ``argv``.
    """
    if isinstance(argv, str):
        argv = COMMANDS[argv](work)
    before = snapshot(work)
    result = run(*argv)
    errors = result.stderr.splitlines()
    assert result.exit_code == code, (result.exit_code, result.stderr, result.exception)
    assert len(errors) == 1 and errors[0].startswith("Error: "), result.stderr
    for culprit in culprits:
        assert culprit in errors[0], errors[0]
    assert "Traceback" not in result.output and not isinstance(result.exception, AssertionError)
    assert snapshot(work) == before, "an input changed or something was written"
    return errors[0]


# -- spoiling a copy: small edits of JSON files, safetensors files and their headers ------------------------


def edit_json(path: Path, mutate: Callable[[Any], object]) -> None:
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))


def edit_tensors(path: Path, mutate: Callable[[dict], object]) -> None:
    tensors = load_file(path)
    mutate(tensors)
    save_file(tensors, path)


def rewrite_header(path: Path, mutate: Callable[[dict], object], *, raw: Callable[[dict], str] | None = None) -> None:
    """Change the JSON header of a safetensors file in place (``raw``: how the header is written back)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    mutate(header)
    text = (raw or json.dumps)(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


def config(mutate: Callable[[dict], object], name: str = "adapter_config.json") -> Callable[[Path], None]:
    """A spoiler of a directory: ``mutate`` its JSON file ``name``."""
    return lambda directory: edit_json(directory / name, mutate)


def tensors(mutate: Callable[[dict], object], name: str = ST) -> Callable[[Path], None]:
    """A spoiler of a directory: ``mutate`` the tensors of its safetensors file ``name``."""
    return lambda directory: edit_tensors(directory / name, mutate)


def first_shard(base: Path) -> Path:
    """The shard of a sharded base that holds the first layer's q_proj."""
    index = json.loads((base / INDEX_FILE).read_text())
    return base / index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
