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
from collections.abc import Iterator, Sequence
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
from bora_tools.gguf import quantize as llama_quantizer
from bora_tools.gguf.architectures import Family, family_for
from bora_tools.gguf.hparams import Hparams
from bora_tools.gguf.modelfile import check_modelfile_target, tokenizer_vocab, write_modelfile
from bora_tools.gguf.outtypes import OUTTYPES, QUANTIZER_OUTTYPES, WRITER_OUTTYPES
from bora_tools.gguf.plan import name_tensors, plan_tensors
from bora_tools.gguf.quantize import Quantized, check_threads, read_summary, require_llama_cpp
from bora_tools.gguf.report import ExportReport, ExportSetReport
from bora_tools.gguf.split import parse_split_size, split_file, written_files
from bora_tools.gguf.vocab import read_vocab
from bora_tools.gguf.writer import (
    PlannedTensor,
    add_general,
    add_provenance,
    hub_name,
    tensor_report,
    write_streaming_many,
)
from bora_tools.io.atomic import (
    SHARD_PATTERN,
    atomic_output,
    atomic_shards,
    check_target,
    refuse_output_over_inputs,
    remove_scratch,
    scratch_sibling,
)
from bora_tools.io.model_dir import ModelDir
from bora_tools.progress import Progress, logger, no_progress


def export_gguf(source: str | Path, out: str | Path, *, base: str | Path | None = None, merge: bool = False,
                rank: int | str = "full", outtype: str = "f16", overwrite: bool = False, device: str = "auto",
                threads: int | None = None, progress: Progress = no_progress, name: str | None = None,
                token: str | None = None, split_max_size: int | str | None = None, modelfile: bool = False,
                modelfile_base: str | None = None) -> ExportReport:
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
        modelfile: also write an Ollama Modelfile beside the output, ``<stem>.Modelfile``
            (``bora_tools.gguf.modelfile``); not with ``split_max_size`` (Ollama imports one file).
        modelfile_base: a LoRA export's ``FROM`` line: the base as Ollama should find it (a GGUF path,
            ``hf.co/OWNER/NAME``); default: ``base``'s absolute path.
        split_max_size: split a full or merged model into llama.cpp's ``NAME-00001-of-0000N.gguf`` shards
            of at most this much tensor data each (bytes, or ``"500M"``, ``"4G"``); ``out`` names the set
            (the report's ``out`` is the first shard, ``shards`` all of them).

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
    return _export(source, {outtype: Path(out)}, base=base, merge=merge, rank=rank, overwrite=overwrite,
                   device=device, threads=threads, progress=progress, name=name,
                   split_max_size=split_max_size, modelfile=modelfile, modelfile_base=modelfile_base).files[0]


def export_gguf_many(source: str | Path, out_dir: str | Path, *, outtypes: Sequence[str],
                     base: str | Path | None = None, merge: bool = False, rank: int | str = "full",
                     overwrite: bool = False, device: str = "auto",
                     threads: int | None = None, progress: Progress = no_progress, name: str | None = None,
                     split_max_size: int | str | None = None, stem: str | None = None, modelfile: bool = False,
                     modelfile_base: str | None = None, token: str | None = None) -> ExportSetReport:
    """``export_gguf`` for several ``outtypes`` at once: the source read (and an adapter merged) once.

    Each file is ``out_dir/<stem>-<outtype>.gguf`` (``stem``: the source folder's name, ``-merged`` or
    ``-lora`` added for adapters), written by one pass over the tensors; llama.cpp's quantizations are
    made from one shared intermediate. Every file is complete or absent: a failure leaves none.
    LoRA adapters (small) are converted once per type.

    Example::

        export_gguf_many("models/tiny-llama", "gguf/", outtypes=["q4_k_m", "q5_k_m", "q8_0"])
        # gguf/tiny-llama-q4_k_m.gguf, gguf/tiny-llama-q5_k_m.gguf, gguf/tiny-llama-q8_0.gguf

    Returns:
        One ``ExportReport`` per file (``files``), in the order of ``outtypes``.

    Raises:
        ValidationError: no ``outtypes``, one twice, and what ``export_gguf`` refuses.
    """
    if isinstance(outtypes, str) or not outtypes:
        raise ValidationError(f"`outtypes` {outtypes!r}: expected a list of one or more types")
    twice = sorted({t for t in outtypes if list(outtypes).count(t) > 1})
    if twice:
        raise ValidationError(f"`outtypes`: {', '.join(twice)} given more than once")
    source, base = _resolve_inputs(source, base, token=token)
    kind = "" if base is None else ("-merged" if merge else "-lora")
    stem = stem or f"{source.resolve().name}{kind}"
    outs = {t: Path(out_dir) / f"{stem}-{t}.gguf" for t in outtypes}
    return _export(source, outs, base=base, merge=merge, rank=rank, overwrite=overwrite, device=device,
                   threads=threads, progress=progress, name=name, split_max_size=split_max_size,
                   modelfile=modelfile, modelfile_base=modelfile_base)


def _export(source: str | Path, outs: dict[str, Path], *, base: str | Path | None, merge: bool, rank: int | str,
            overwrite: bool, device: str, threads: int | None, progress: Progress, name: str | None,
            split_max_size: int | str | None, modelfile: bool = False,
            modelfile_base: str | None = None) -> ExportSetReport:
    """Both entry points: every guard once, then the one writer."""
    source = Path(source)
    rank = parse_rank(rank)
    split = parse_split_size(split_max_size) if split_max_size is not None else None
    for outtype in outs:
        _check_options(source, base=base, merge=merge, rank=rank, outtype=outtype)
    if split is not None and base is not None and not merge:
        raise ValidationError("`split_max_size` applies to full and merged models: llama.cpp loads a LoRA adapter "
                              "from one file")
    if modelfile and split is not None:
        raise ValidationError("`modelfile` with `split_max_size`: Ollama imports a model from one GGUF file")
    threads = check_threads(threads)
    for out in outs.values():
        refuse_output_over_inputs(out, source, *([base] if base is not None else []))
        if modelfile:
            check_modelfile_target(out, overwrite=overwrite)
    start = time.perf_counter()
    folder = Path(base) if base is not None else source  # the tokenizer: the base's for adapters
    vocab = tokenizer_vocab(folder) if modelfile else None  # read before anything is written
    with _quiet_gguf_py():
        reports = _dispatch(source, outs, base=base, merge=merge, rank=rank, overwrite=overwrite,
                            device=device, threads=threads, progress=progress, name=name, split=split)
    if vocab is not None:
        lora = base is not None and not merge
        for report in reports:
            report.modelfile = str(write_modelfile(
                report.out, vocab=vocab, model_dir=folder, overwrite=overwrite,
                base_from=(modelfile_base or str(Path(folder).resolve())) if lora else None))
    seconds = round(time.perf_counter() - start, 3)
    for report in reports:
        report.seconds = report.seconds or seconds
    return ExportSetReport(files=reports, seconds=seconds)


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


def _dispatch(source: Path, outs: dict[str, Path], *, base: Any, merge: bool, rank: int | str, overwrite: bool,
              device: str, threads: int, progress: Progress, name: str | None = None,
              split: int | None = None) -> list[ExportReport]:
    """The one writer for this source; every guard of ``export_gguf`` has run (none runs twice)."""
    if base is None:
        return _write_models(ModelDir.open(source), outs, overwrite=overwrite, threads=threads, progress=progress,
                             name=name, split_max_size=split)
    if merge:
        return _export_merged(source, Path(base), outs, overwrite=overwrite, device=device, threads=threads,
                              progress=progress, name=name, split_max_size=split)
    from bora_tools.gguf.lora import write_lora

    for out in outs.values():  # every target refused before the first is written
        check_target(out, overwrite=overwrite)
    return [write_lora(source, Path(base), out, rank=rank, outtype=outtype, overwrite=overwrite, device=device,
                       progress=progress, name=name) for outtype, out in outs.items()]


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


def _write_models(model: ModelDir, outs: dict[str, Path], *, overwrite: bool, threads: int,
                  replacements: dict[str, Replacement] | None = None, device: torch.device | str = "cpu",
                  progress: Progress = no_progress, kind: str = "model", name: str | None = None,
                  split_max_size: int | None = None, adapter: Path | None = None) -> list[ExportReport]:
    """Write ``model`` (with ``replacements`` merged in, if any) as one full GGUF per outtype in ``outs``.

    ``replacements`` maps base tensor names to a ``BoraModule`` (written as
    ``W + dW``) or a whole tensor (``modules_to_save``), as
    ``bora_tools.core.row_merge.merge_plan`` returns them. One pass reads (and merges) the source:
    each block of rows is converted to every writer type (f32, f16, bf16, q8_0) and, when a type of
    llama.cpp's quantizer is asked for, to the exact intermediate they all share
    (``bora_tools.gguf.quantize``), quantized afterwards once per type on ``threads`` threads.
    ``split_max_size`` splits each file (``bora_tools.gguf.split``). Every file is written to a
    temporary and renamed into place when all are complete: a failure leaves none of them.
    The options, ``threads`` and the outputs were checked by ``export_gguf``.

    Raises:
        UnsupportedError: a value overflows its GGUF type (``f16``: beyond 65504), named; nothing is left.
    """
    config_path = str(model.path / "config.json")
    family = family_for(model.architecture, source=config_path)
    hp = family.read_hparams(model.config, source=config_path)
    named = name_tensors(model, family, hp)
    # The embedding's rows bound vocab_size before the vocabulary is padded to it.
    vocab = read_vocab(model.path, vocab_size=hp.vocab_size, rows=named.embedding_rows)
    plans = {t: plan_tensors(named, family, hp, t, replacements=replacements or {}, device=device) for t in outs}
    for out in outs.values():
        check_target(out, overwrite=overwrite)

    def new_writer(outtype: str, split: int | None) -> gguf.GGUFWriter:
        writer = gguf.GGUFWriter(None, family.name, split_max_size=split or 0)
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
        return writer

    quantized = [t for t in outs if OUTTYPES[t].quantizer]
    plain_types = [t for t in outs if not OUTTYPES[t].quantizer]
    reports: dict[str, ExportReport] = {}
    # One torch thread, as merge runs: the streamed blocks are small, and on a shared CPU the thread pool's
    # barriers made an f16 export 3-5x slower (docs/benchmarks.md, "The redesign").
    with one_cpu_thread(device), contextlib.ExitStack() as stack:
        paths = {t: stack.enter_context(atomic_shards(outs[t], overwrite=overwrite) if split_max_size
                                        else atomic_output(outs[t], overwrite=overwrite)) for t in outs}
        files = [(new_writer(t, split_max_size), paths[t], plans[t]) for t in plain_types]
        intermediate = None
        if quantized:
            intermediate = _scratch(paths[quantized[0]], "intermediate")
            stack.callback(remove_scratch, intermediate)
            files.append((new_writer(quantized[0], None), intermediate, plans[quantized[0]]))
        start = time.perf_counter()
        label = "writing GGUF" if not quantized else "writing intermediate GGUF" if not plain_types else \
            f"writing {len(files)} GGUF files"
        write_streaming_many(files, progress=progress, label=label)
        pass_seconds = time.perf_counter() - start
        warnings = {t: _warnings(family, hp, plans[t], t, first=i == 0) + vocab.notes
                    for i, t in enumerate(outs)}
        for t in plain_types:
            reports[t] = _report(outs[t], paths[t], family, model, t, plans[t], kind, vocab, warnings[t],
                                 split=bool(split_max_size))
        disk = sum(r.bytes for r in reports.values())
        for t in quantized:
            assert intermediate is not None
            done = _quantize(intermediate, paths[t], outtype=t, threads=threads, tensors=len(plans[t]),
                             split_max_size=split_max_size, progress=progress, pass_seconds=pass_seconds,
                             disk_before=disk)
            reports[t] = _report(outs[t], paths[t], family, model, t, plans[t], kind, vocab, warnings[t],
                                 split=bool(split_max_size), quantized=done)
            disk += reports[t].bytes
    for t, r in reports.items():  # renamed into place: where they lie now
        files = written_files(outs[t])
        r.out, r.shards = str(files[0]), [str(p) for p in files] if len(files) > 1 else None
    return [reports[t] for t in outs]


def _scratch(path: Path, tag: str) -> Path:
    """A scratch file beside a temporary of ``atomic_output`` or inside one of ``atomic_shards``."""
    return scratch_sibling(path if _is_marked(path) else path.parent, tag)


def _is_marked(path: Path) -> bool:
    try:
        scratch_sibling(path, "x")
    except ValueError:
        return False
    return True


def _quantize(intermediate: Path, path: Path, *, outtype: str, threads: int, tensors: int,
              split_max_size: int | None, progress: Progress, pass_seconds: float, disk_before: int) -> Quantized:
    """llama.cpp's quantizer from the shared intermediate into ``path`` (split afterwards if asked)."""
    whole = _scratch(path, f"whole-{outtype}") if split_max_size else path
    start = time.perf_counter()
    try:
        # Called through its module: the crash-safety tests replace it there.
        fallbacks = llama_quantizer.quantize_file(intermediate, whole, outtype=outtype, threads=threads,
                                                  tensors=tensors, progress=progress)
        summary = read_summary(whole)
        peak = disk_before + intermediate.stat().st_size + whole.stat().st_size
        if split_max_size:
            split_file(whole, path, max_size=split_max_size)
            peak += sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())
    finally:
        if split_max_size:
            remove_scratch(whole)
    return Quantized(types=summary["types"], tensors=summary["tensors"], bits_per_weight=summary["bits_per_weight"],
                     intermediate_bytes=intermediate.stat().st_size, peak_disk_bytes=peak,
                     phases={"write_intermediate": round(pass_seconds, 3),
                             "quantize": round(time.perf_counter() - start, 3)},
                     threads=threads, fallbacks=fallbacks)


def _report(out: Path, path: Path, family: Family, model: ModelDir, outtype: str, plan: list[PlannedTensor],
            kind: str, vocab: Any, warnings: list[str], *, split: bool, quantized: Quantized | None = None
            ) -> ExportReport:
    """One file's report; ``path`` is where it lies until renamed into place (with its shards, when split)."""
    files = [path]
    if split:  # atomic_shards' folder: the one file, or its shards
        files = sorted(p for p in path.parent.iterdir() if p.is_file() and SHARD_PATTERN.match(p.name)) or [path]
    report = ExportReport(kind=kind, out=str(out), architecture=family.name, hf_architecture=model.architecture,
                          outtype=outtype, **tensor_report(plan), bytes=sum(p.stat().st_size for p in files),
                          merged_tensors=sum(1 for p in plan if p.source.endswith("(merged)")),
                          vocab=vocab.summary(), warnings=list(warnings))
    if quantized is not None:
        done = quantized
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


def _warnings(family: Family, hp: Hparams, plan: list[PlannedTensor], outtype: str, *,
              first: bool = True) -> list[str]:
    """This file's warnings, logged; those about the model rather than the type only for the ``first`` file."""
    out = []
    fallbacks = [p.name for p in plan if p.fallback]
    if fallbacks:
        shown = ", ".join(fallbacks[:4]) + (f" and {len(fallbacks) - 4} more" if len(fallbacks) > 4 else "")
        out.append(
            f"{len(fallbacks)} tensor(s) written as F16 instead of {outtype.upper()}: their rows are not a "
            f"multiple of 32 ({shown})"
        )
        logger.warning(out[-1])
    window = hp.config.get("sliding_window")  # with the family's defaults, as transformers reads it
    if hp.config.get("use_sliding_window") is False:
        window = None
    if family.warn_sliding_window and isinstance(window, int) and window < hp.n_ctx:
        out.append(
            f"sliding_window {window}: llama.cpp runs this model with full attention; sequences longer "
            f"than {window} tokens will differ"
        )
        if first:
            logger.warning(out[-1])
    return out


def _export_merged(
    adapter_dir: Path, base_dir: Path, outs: dict[str, Path], *, overwrite: bool, device: str, threads: int,
    progress: Progress, name: str | None = None, split_max_size: int | None = None,
) -> list[ExportReport]:
    adapter = load_adapter(adapter_dir)
    base = ModelDir.open(base_dir)
    if adapter.config.fan_in_fan_out:
        raise UnsupportedError(f"{adapter_dir}: fan_in_fan_out adapters (GPT-2 Conv1D) have no GGUF export")
    replacements = merge_plan(adapter, base)
    reports = _write_models(base, outs, overwrite=overwrite, threads=threads, replacements=replacements,
                            device=resolve_device(device), progress=progress, kind="merged", name=name,
                            split_max_size=split_max_size, adapter=adapter_dir)
    for report in reports:
        report.adapter = str(adapter_dir)
    return reports
