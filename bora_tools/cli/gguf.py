"""``export-gguf``: a model, a merged model or a LoRA adapter as GGUF, and where the file goes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from bora_tools.cli.frame import _state, make_progress, print_report
from bora_tools.cli.params import (
    _InputType,
    _OuttypeChoice,
    _RankType,
    _resolve,
    _resolve_base,
    common_options,
    device_option,
    json_option,
    overwrite_option,
    token_option,
)
from bora_tools.gguf.outtypes import OUTTYPES


@click.command("export-gguf", short_help="Export a model or a BoRA adapter as GGUF for llama.cpp.")
@click.argument("source", type=_InputType("any"))
@click.option("--out", required=True, type=click.Path(),
              help="The .gguf file to write, or an existing folder (or one ending in /) to write "
                   "<name>-<outtype>.gguf into.")
@click.option("--base", type=_InputType("model"), default=None,
              help="The base model (a folder or a Hub id), when SOURCE is an adapter  [default: the adapter's "
                   "base_model_name_or_path]")
@click.option("--merge", is_flag=True, help="With an adapter: write the merged model as a full GGUF, in one pass.")
@click.option("--rank", type=_RankType(), default=None,
              help="LoRA export: 'full' (the default) is the exact form (rank b*r); K keeps the best rank-K "
                   "truncation.")
@click.option("--outtype", "outtypes", type=_OuttypeChoice(list(OUTTYPES)), multiple=True, metavar="TYPE",
              help="Type of the weight matrices, case-insensitive: f32, f16, bf16, q8_0 (norms and 1-D tensors stay "
                   "f32; q8_0 falls back to f16 where a row is not a multiple of 32). Full and merged models also "
                   "take llama.cpp's quantizations, made by its own quantizer (the 'llama' extra): q4_0, q4_1, q5_0, "
                   "q5_1, q2_k, q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k. Repeat it (with --out a "
                   "folder) for one file per type, <name>-<type>.gguf, from one read of the source  [default: f16]")
@click.option("--split-max-size", "split_max_size", metavar="SIZE", default=None,
              help="Split a full or merged model into llama.cpp's NAME-00001-of-0000N.gguf files of at most SIZE "
                   "tensor data each (bytes, or with K, M, G: 500M, 4G; powers of 1000, as llama.cpp's gguf-split); "
                   "llama.cpp loads them from the first file.")
@click.option("--modelfile", is_flag=True,
              help="Also write an Ollama Modelfile beside each GGUF (<name>.Modelfile): FROM the GGUF (a LoRA: FROM "
                   "the base, ADAPTER the GGUF), PARAMETER stop for the tokenizer's end-of-turn tokens.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads of llama.cpp's quantizer  [default: all cores]")
@device_option
@token_option
@overwrite_option
@json_option
@common_options
def export_gguf_cmd(source: str, out: str, base: str | None, merge: bool, rank: int | str | None,
                    outtypes: tuple[str, ...], split_max_size: str | None, modelfile: bool, threads: int | None,
                    device: str, token: str | None, overwrite: bool, as_json: bool) -> None:
    """Export a model directory, or a BoRA adapter (onto --base or the base it records), as GGUF for llama.cpp.

    \b
    Examples:
      bora-tools export-gguf ./Llama-3.2-1B --out model.gguf --outtype q8_0
      bora-tools export-gguf ./my-bora-adapter --base ./Llama-3.2-1B --out lora.gguf
      bora-tools export-gguf ./my-bora-adapter --base ./Llama-3.2-1B --merge --out merged.gguf
      bora-tools export-gguf ./my-bora-adapter --base ./Llama-3.2-1B --merge --out merged-q4.gguf --outtype q4_k_m
      bora-tools export-gguf someone/my-bora --merge --out merged.gguf     # the base the adapter records
      bora-tools export-gguf ./Llama-3.2-1B --out gguf/ --outtype q4_k_m --outtype q5_k_m --outtype q8_0
      bora-tools export-gguf ./Llama-3.1-70B --out gguf/ --outtype q4_k_m --split-max-size 40G
      bora-tools export-gguf ./my-bora-adapter --base ./Llama-3.2-1B --merge --out gguf/ --modelfile
    """
    if rank is not None and merge:
        raise click.UsageError("--rank applies only to a LoRA adapter export, not with --merge")
    outtypes = outtypes or ("f16",)
    if len(set(outtypes)) < len(outtypes):
        raise click.UsageError("--outtype: each type once")
    if len(outtypes) > 1 and not (Path(out).is_dir() or out.endswith(("/", os.sep))):
        raise click.UsageError("several --outtype write one file each: give --out a folder (existing, or ending in /)")
    from bora_tools.gguf.export import export_gguf, export_gguf_many

    found = _resolve(source, "any" if base is None else "adapter", token=token)
    is_adapter = (found.path / "adapter_config.json").is_file()
    if (merge or rank is not None) and not is_adapter:
        option = "--merge" if merge else "--rank"
        raise click.UsageError(f"{option} applies only when SOURCE is an adapter (a LoRA adapter export for --rank)")
    found_base = _resolve_base(base, found, token=token) if base is not None or is_adapter else None
    common: dict[str, Any] = dict(base=found_base.path if found_base else None, merge=merge, rank=rank or "full",
                                  overwrite=overwrite, device=device, threads=threads, progress=make_progress(),
                                  name=_gguf_name(found_base if merge else found), split_max_size=split_max_size,
                                  modelfile=modelfile)
    if modelfile and found_base is not None and not merge:  # a LoRA: FROM names the base as Ollama finds it
        common["modelfile_base"] = f"hf.co/{found_base.repo_id}" if found_base.from_hub else None
    if len(outtypes) > 1:
        stem = _gguf_target(out, source, found.path, base=found_base, merge=merge, outtype="").name[:-len("-.gguf")]
        report: Any = export_gguf_many(found.path, out, outtypes=list(outtypes), stem=stem, **common)
    else:
        target = _gguf_target(out, source, found.path, base=found_base, merge=merge, outtype=outtypes[0])
        report = export_gguf(found.path, target, outtype=outtypes[0], **common)
    print_report(report, as_json=as_json)


def _gguf_name(found: Any) -> str | None:
    """The name a GGUF records (general.name): the repo's name for a Hub input (its cache folder is a commit)."""
    return found.repo_id.split("/")[-1] if found is not None and found.from_hub else None


def _gguf_target(out: str, source: str, local: Path, *, base: Any, merge: bool, outtype: str) -> Path:
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
