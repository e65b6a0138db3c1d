"""``bora-tools export-gguf``: full models, merged models and LoRA adapters for llama.cpp.

Three sources, one entry point (``export_gguf``), which checks the options, the threads and that
the output is none of the inputs once, then hands over to one writer:

- a model directory -> a full GGUF (weights, hyperparameters, tokenizer);
- an adapter with ``base`` -> a GGUF LoRA adapter for llama.cpp's ``--lora``
  (``bora_tools.gguf.lora``);
- an adapter with ``base`` and ``merge`` -> the merged model as a full GGUF in
  one pass: each adapted weight is merged a block of rows at a time
  (``bora_tools.core.row_merge.stream_rows``) just before it is written, and no
  merged safetensors ever exist.

A full GGUF is planned first (``bora_tools.gguf.plan``: name every tensor, check every
shape, choose its type); tensors then stream to disk one at a time
(``bora_tools.gguf.writer``), so memory holds a few blocks of rows whatever the model's
size. The k-quants and legacy quants (``q4_k_m``, ...) are made by llama.cpp's own
quantizer from an intermediate file (``bora_tools.gguf.quantize``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import torch

from bora_tools.core.adapter import load_adapter
from bora_tools.core.config import CONFIG_NAME
from bora_tools.core.devices import one_cpu_thread, resolve_device
from bora_tools.core.lowrank import parse_rank
from bora_tools.core.row_merge import Replacement, merge_plan
from bora_tools.errors import UnsupportedError, ValidationError
from bora_tools.gguf.architectures import Family, family_for
from bora_tools.gguf.hparams import Hparams
from bora_tools.gguf.outtypes import OUTTYPES, QUANTIZER_OUTTYPES, WRITER_OUTTYPES
from bora_tools.gguf.plan import name_tensors, plan_tensors
from bora_tools.gguf.quantize import check_threads, require_llama_cpp, write_quantized
from bora_tools.gguf.report import ExportReport
from bora_tools.gguf.vocab import read_vocab
from bora_tools.gguf.writer import PlannedTensor, add_general, add_provenance, hub_name, tensor_report, write_streaming
from bora_tools.io.atomic import atomic_output, check_target, refuse_output_over_inputs
from bora_tools.io.model_dir import ModelDir
from bora_tools.progress import Progress, logger, no_progress


def export_gguf(source: str | Path, out: str | Path, *, base: str | Path | None = None, merge: bool = False,
                rank: int | str = "full", outtype: str = "f16", overwrite: bool = False, device: str = "auto",
                threads: int | None = None, progress: Progress = no_progress, name: str | None = None,
                token: str | None = None) -> ExportReport:
    """Export a model directory, or an adapter (with ``base``), as GGUF for llama.cpp.

    Example::

        export_gguf("models/tiny-llama", "tiny.gguf", outtype="q8_0")          # full model
        export_gguf("my-adapter", "lora.gguf", base="models/tiny-llama")       # LoRA adapter
        export_gguf("my-adapter", "merged.gguf", base="models/tiny-llama", merge=True)
        export_gguf("models/tiny-llama", "tiny-q4.gguf", outtype="q4_k_m")       # llama.cpp's quantizer
        export_gguf("someone/my-bora", "merged.gguf", merge=True)   # from the Hub, onto the base it records

    Args:
        source, base: folders or Hub ids (``owner/name[@revision]``, read with ``token``); without ``base``,
            an adapter ``source`` applies to the base it records (``base_model_name_or_path``). Files made
            from Hub ids record them (``general.base_model.*``, ``general.source.repo_url``).
        rank: ``"full"`` (the exact LoRA form, rank ``b*r``) or an int ``K``
            (the best rank-``K`` truncation); LoRA adapters only.
        outtype: ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the big matrices (our writer, bit-exact);
            for full and merged models also llama.cpp's quantizations (``q4_0``, ``q4_1``, ``q5_0``,
            ``q5_1``, ``q2_k``, ``q3_k_s/m/l``, ``q4_k_s/m``, ``q5_k_s/m``, ``q6_k``), made by its own
            quantizer from ``llama-cpp-python`` (the ``llama`` extra).
        threads: llama.cpp quantizer threads (default: every CPU this process may use).
        name: the model's name in the file (``general.name``; e.g. the Hub repo it came from); default:
            the source folder's name.

    Returns:
        A report: kind, path, architecture, tensor types, fallbacks, vocabulary, timings.

    Raises:
        ValidationError: contradictory options (an adapter without ``base``, ...).
        UnsupportedError: an architecture or setting llama.cpp export does not handle, a type that needs
            an importance matrix, or a quantized type without ``llama-cpp-python``.
        ModelDirError, CheckpointError, ShapeError: bad inputs, named.
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
        OutputWriteError: ``out`` is, holds or lies inside an input (inputs are never modified).
    """
    source, base = _resolve_inputs(source, base, token=token)
    out = Path(out)
    rank = parse_rank(rank)
    _check_options(source, base=base, merge=merge, rank=rank, outtype=outtype)
    threads = check_threads(threads)
    refuse_output_over_inputs(out, source, *([base] if base is not None else []))
    start = time.perf_counter()
    with _quiet_gguf_py():
        report = _dispatch(source, out, base=base, merge=merge, rank=rank, outtype=outtype, overwrite=overwrite,
                           device=device, threads=threads, progress=progress, name=name)
    report.seconds = round(time.perf_counter() - start, 3)
    return report


def _resolve_inputs(source: str | Path, base: str | Path | None, *, token: str | None) -> tuple[Path, Path | None]:
    """Local folders for ``source`` and ``base`` (Hub ids downloaded); an adapter without ``base``: the one it
    records."""
    from bora_tools.io.hub_input import hub_or_local, recorded_base

    found = hub_or_local(source, kind="any" if base is None else "adapter", token=token).path
    if base is None and (found / CONFIG_NAME).is_file():
        base = recorded_base(found)
    return found, (hub_or_local(base, kind="model", token=token).path if base is not None else None)


@contextlib.contextmanager
def _quiet_gguf_py() -> Iterator[None]:
    # gguf-py logs its own guesses (template parsing, writer plans) as warnings;
    # what matters to a user is reported through bora_tools' logger instead.
    gguf_logger = logging.getLogger("gguf")
    level = gguf_logger.level
    gguf_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        gguf_logger.setLevel(level)


def _dispatch(source: Path, out: Path, *, base: Any, merge: bool, rank: int | str, outtype: str, overwrite: bool,
              device: str, threads: int, progress: Progress, name: str | None = None) -> ExportReport:
    """The one writer for this source; every guard of ``export_gguf`` has run (none runs twice)."""
    if base is None:
        return _write_model(ModelDir.open(source), out, outtype=outtype, overwrite=overwrite, threads=threads,
                            progress=progress, name=name)
    if merge:
        return _export_merged(source, Path(base), out, outtype=outtype, overwrite=overwrite, device=device,
                              threads=threads, progress=progress, name=name)
    from bora_tools.gguf.lora import write_lora

    return write_lora(source, Path(base), out, rank=rank, outtype=outtype, overwrite=overwrite, device=device,
                      progress=progress, name=name)


def _check_options(source: Path, *, base: Any, merge: bool, rank: Any, outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise ValidationError(f"`outtype` {outtype!r}: expected one of {', '.join(WRITER_OUTTYPES)} (our writer) "
                              f"or {', '.join(QUANTIZER_OUTTYPES)} (llama.cpp's quantizer)")
    if OUTTYPES[outtype].imatrix:
        raise UnsupportedError(f"`outtype` {outtype} needs an importance matrix, which export-gguf does not compute",
                               hint="export f16 and run llama.cpp's llama-imatrix and llama-quantize on it")
    is_adapter = (source / CONFIG_NAME).is_file()  # without `base`, one was found from the adapter's record
    if not is_adapter and base is not None:
        raise ValidationError(f"{source} has no {CONFIG_NAME}: `base` applies only when `source` is an adapter")
    if merge and base is None:
        raise ValidationError("`merge` needs an adapter as `source` and `base`")
    if rank != "full" and (base is None or merge):
        raise ValidationError("`rank` applies only to a LoRA adapter export (an adapter with `base`, without `merge`)")
    if OUTTYPES[outtype].quantizer and (base is None or merge):
        require_llama_cpp(outtype)  # before anything is read at length or written


def _write_model(model: ModelDir, out: Path, *, outtype: str, overwrite: bool, threads: int,
                 replacements: dict[str, Replacement] | None = None, device: torch.device | str = "cpu",
                 progress: Progress = no_progress, kind: str = "model", name: str | None = None,
                 adapter: Path | None = None) -> ExportReport:
    """Write ``model`` (with ``replacements`` merged in, if any) as a full GGUF file.

    ``replacements`` maps base tensor names to a ``BoraModule`` (written as
    ``W + dW``) or a whole tensor (``modules_to_save``), as
    ``bora_tools.core.row_merge.merge_plan`` returns them. An ``outtype`` of llama.cpp's
    quantizer goes through an intermediate GGUF (``bora_tools.gguf.quantize``) on ``threads``
    threads. The options, ``threads`` and ``out`` were checked by ``export_gguf``.

    Raises:
        UnsupportedError: a value overflows its GGUF type (``f16``: beyond 65504), named; nothing is left.
    """
    quantized = OUTTYPES[outtype].quantizer
    config_path = str(model.path / "config.json")
    family = family_for(model.architecture, source=config_path)
    hp = family.read_hparams(model.config, source=config_path)
    named = name_tensors(model, family, hp)
    # The embedding's rows bound vocab_size before the vocabulary is padded to it.
    vocab = read_vocab(model.path, vocab_size=hp.vocab_size, rows=named.embedding_rows)
    plan = plan_tensors(named, family, hp, outtype, replacements=replacements or {}, device=device)
    check_target(out, overwrite=overwrite)
    warnings = _warnings(family, hp, plan, outtype) + vocab.notes
    writer = gguf.GGUFWriter(None, family.name)
    add_general(writer, kind=gguf.GGUFType.MODEL, name=name or hub_name(model.path), outtype=outtype)
    if replacements:
        # Provenance: a merged model is a fine-tune of its base, not a plain conversion of it
        # (what `bora-tools push` reads to write the model card's base_model_relation); its source is the
        # adapter, when that came from the Hub.
        add_provenance(writer, bases=[model.path], source=adapter)
        writer.add_tags(["bora", "merged"])
    else:
        add_provenance(writer, source=model.path)  # a conversion of a Hub model names it
    family.write_hparams(writer, hp)
    vocab.add_to(writer)
    # One torch thread, as merge runs: the streamed blocks are small, and on a shared CPU the thread pool's
    # barriers made an f16 export 3-5x slower (docs/benchmarks.md, "The redesign").
    with one_cpu_thread(device), atomic_output(out, overwrite=overwrite) as tmp:
        if quantized:
            done = write_quantized(
                lambda path: write_streaming(writer, path, plan, progress=progress, label="writing intermediate GGUF"),
                tmp, outtype=outtype, threads=threads, tensors=len(plan), progress=progress)
        else:
            write_streaming(writer, tmp, plan, progress=progress, label="writing GGUF")
    report = ExportReport(kind=kind, out=str(out), architecture=family.name, hf_architecture=model.architecture,
                          outtype=outtype, **tensor_report(plan), bytes=out.stat().st_size,
                          merged_tensors=sum(1 for p in plan if p.source.endswith("(merged)")),
                          vocab=vocab.summary(), warnings=warnings)
    if quantized:
        report.intermediate = {"types": report.types, "bytes": done.intermediate_bytes}
        report.types, report.tensors = done.types, done.tensors
        report.bits_per_weight, report.peak_disk_bytes = done.bits_per_weight, done.peak_disk_bytes
        report.phases, report.threads = done.phases, done.threads
        report.fallbacks = done.fallbacks
        if done.fallbacks:
            names = [f["tensor"] for f in done.fallbacks]
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            warning = (f"{len(names)} tensor(s) written by llama.cpp in a fallback type instead of {outtype}'s: "
                       f"their rows are not a multiple of the type's block ({shown})")
            report.warnings.append(warning)
            logger.warning(warning)
    return report


def _warnings(family: Family, hp: Hparams, plan: list[PlannedTensor], outtype: str) -> list[str]:
    out = []
    fallbacks = [p.name for p in plan if p.fallback]
    if fallbacks:
        shown = ", ".join(fallbacks[:4]) + (f" and {len(fallbacks) - 4} more" if len(fallbacks) > 4 else "")
        out.append(
            f"{len(fallbacks)} tensor(s) written as F16 instead of {outtype.upper()}: their rows are not a "
            f"multiple of 32 ({shown})"
        )
    window = hp.config.get("sliding_window")  # with the family's defaults, as transformers reads it
    if hp.config.get("use_sliding_window") is False:
        window = None
    if family.warn_sliding_window and isinstance(window, int) and window < hp.n_ctx:
        out.append(
            f"sliding_window {window}: llama.cpp runs this model with full attention; sequences longer "
            f"than {window} tokens will differ"
        )
    for w in out:
        logger.warning(w)
    return out


def _export_merged(
    adapter_dir: Path, base_dir: Path, out: Path, *, outtype: str, overwrite: bool, device: str, threads: int,
    progress: Progress, name: str | None = None,
) -> ExportReport:
    adapter = load_adapter(adapter_dir)
    base = ModelDir.open(base_dir)
    if adapter.config.fan_in_fan_out:
        raise UnsupportedError(f"{adapter_dir}: fan_in_fan_out adapters (GPT-2 Conv1D) have no GGUF export")
    replacements = merge_plan(adapter, base)
    report = _write_model(base, out, outtype=outtype, overwrite=overwrite, threads=threads,
                          replacements=replacements, device=resolve_device(device), progress=progress,
                          kind="merged", name=name, adapter=adapter_dir)
    report.adapter = str(adapter_dir)
    return report
