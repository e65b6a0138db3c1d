"""``bora-tools export-gguf``: full models, merged models and LoRA adapters for llama.cpp.

Three sources, one entry point (``export_gguf``):

- a model directory -> a full GGUF (weights, hyperparameters, tokenizer);
- an adapter with ``base`` -> a GGUF LoRA adapter for llama.cpp's ``--lora``
  (``bora_tools.gguf.lora``);
- an adapter with ``base`` and ``merge`` -> the merged model as a full GGUF in
  one pass: each adapted weight is merged (``bora_tools.merge.merged_weight``)
  just before it is written, and no merged safetensors ever exist.

Everything is checked before the first byte is written; tensors then stream
to disk one at a time (``bora_tools.gguf.writer``), so memory holds about one
tensor whatever the model's size. The k-quants and legacy quants (``q4_k_m``,
...) are made by llama.cpp's own quantizer from an intermediate file
(``bora_tools.gguf.quantize``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import torch

from bora_tools.core.adapter import BoraModule, load_adapter
from bora_tools.core.config import CONFIG_NAME
from bora_tools.core.devices import one_cpu_thread, resolve_device
from bora_tools.core.lowrank import parse_rank
from bora_tools.core.row_merge import RowMerger, chunk_elements, merge_plan, row_chunks
from bora_tools.errors import ConfigError, UnsupportedError, ValidationError, raise_if_problems
from bora_tools.gguf.architectures import Family, family_for, qk_heads, qk_row_order
from bora_tools.gguf.hparams import Hparams
from bora_tools.gguf.outtypes import OUTTYPES, QUANTIZER_OUTTYPES, WRITER_OUTTYPES
from bora_tools.gguf.quantize import check_threads, require_llama_cpp, write_quantized
from bora_tools.gguf.report import ExportReport
from bora_tools.gguf.shapes import (
    check_layer_count,
    embedding_rows,
    expert_index,
    expert_problems,
    layout_problems,
    shape_problems,
    stacked_label,
    stacked_name,
    stacked_shape,
)
from bora_tools.gguf.vocab import read_vocab
from bora_tools.gguf.writer import (
    PlannedTensor,
    Q,
    add_general,
    tensor_report,
    tensor_type,
    whole,
    write_streaming,
)
from bora_tools.io.atomic import atomic_output, check_target, refuse_output_over_inputs
from bora_tools.io.model_dir import ModelDir, TensorEntry, read_rows
from bora_tools.io.safetensors import FLOAT_ST_DTYPES
from bora_tools.progress import Progress, logger, no_progress

#: safetensors dtype -> the GGUF type that holds its values exactly (float64 is rounded to float32,
#: as llama.cpp computes in float32).
_EXACT = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16}
#: Tensors the HF checkpoints may carry that llama.cpp recomputes itself.
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)


def export_gguf(source: str | Path, out: str | Path, *, base: str | Path | None = None, merge: bool = False,
                rank: int | str = "full", outtype: str = "f16", overwrite: bool = False, device: str = "auto",
                threads: int | None = None, progress: Progress = no_progress, name: str | None = None) -> ExportReport:
    """Export a model directory, or an adapter (with ``base``), as GGUF for llama.cpp.

    Example::

        export_gguf("models/tiny-llama", "tiny.gguf", outtype="q8_0")          # full model
        export_gguf("my-adapter", "lora.gguf", base="models/tiny-llama")       # LoRA adapter
        export_gguf("my-adapter", "merged.gguf", base="models/tiny-llama", merge=True)
        export_gguf("models/tiny-llama", "tiny-q4.gguf", outtype="q4_k_m")       # llama.cpp's quantizer

    Args:
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
    source, out = Path(source), Path(out)
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
    if base is None:
        return export_model(ModelDir.open(source), out, outtype=outtype, overwrite=overwrite, threads=threads,
                            progress=progress, name=name)
    if merge:
        return _export_merged(source, Path(base), out, outtype=outtype, overwrite=overwrite, device=device,
                              threads=threads, progress=progress, name=name)
    from bora_tools.gguf.lora import export_lora

    return export_lora(source, Path(base), out, rank=rank, outtype=outtype, overwrite=overwrite, device=device,
                       progress=progress, name=name)


def _check_options(source: Path, *, base: Any, merge: bool, rank: Any, outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise ValidationError(f"`outtype` {outtype!r}: expected one of {', '.join(WRITER_OUTTYPES)} (our writer) "
                              f"or {', '.join(QUANTIZER_OUTTYPES)} (llama.cpp's quantizer)")
    if OUTTYPES[outtype].imatrix:
        raise UnsupportedError(f"`outtype` {outtype} needs an importance matrix, which export-gguf does not compute",
                               hint="export f16 and run llama.cpp's llama-imatrix and llama-quantize on it")
    is_adapter = (source / CONFIG_NAME).is_file()
    if is_adapter and base is None:
        raise ValidationError(f"{source} is an adapter: give `base` (the model directory it was trained on)")
    if not is_adapter and base is not None:
        raise ValidationError(f"{source} has no {CONFIG_NAME}: `base` applies only when `source` is an adapter")
    if merge and base is None:
        raise ValidationError("`merge` needs an adapter as `source` and `base`")
    if rank != "full" and (base is None or merge):
        raise ValidationError("`rank` applies only to a LoRA adapter export (an adapter with `base`, without `merge`)")
    if OUTTYPES[outtype].quantizer and (base is None or merge):
        require_llama_cpp(outtype)  # before anything is read at length or written


def export_model(model: ModelDir, out: Path, *, outtype: str = "f16", overwrite: bool = False,
                 replacements: dict[str, BoraModule | torch.Tensor] | None = None,
                 device: torch.device | str = "cpu", threads: int | None = None, progress: Progress = no_progress,
                 kind: str = "model", name: str | None = None) -> ExportReport:
    """Write ``model`` (with ``replacements`` merged in, if any) as a full GGUF file.

    ``replacements`` maps base tensor names to a ``BoraModule`` (written as
    ``W + dW``) or a whole tensor (``modules_to_save``), as ``merge.merge_plan``
    returns them. An ``outtype`` of llama.cpp's quantizer goes through an
    intermediate GGUF (``bora_tools.gguf.quantize``) on ``threads`` threads.

    Example: ``export_model(ModelDir.open("base"), Path("base.gguf"), outtype="f32")``

    Raises:
        OutputWriteError: ``out`` is, holds or lies inside the model directory.
        UnsupportedError: a value overflows its GGUF type (``f16``: beyond 65504), named; nothing is left;
            a quantized ``outtype`` without ``llama-cpp-python``.
    """
    quantized = OUTTYPES[outtype].quantizer
    if quantized:
        require_llama_cpp(outtype)
    threads = check_threads(threads)
    refuse_output_over_inputs(out, model.path)
    config_path = str(model.path / "config.json")
    family = family_for(model.architecture, source=config_path)
    hp = family.read_hparams(model.config, source=config_path)
    # The embedding's rows bound vocab_size before the vocabulary is padded to it.
    vocab = read_vocab(model.path, vocab_size=hp.vocab_size, rows=embedding_rows(model, family, hp))
    plan = plan_model_tensors(model, family, hp, outtype, replacements=replacements or {}, device=device)
    check_target(out, overwrite=overwrite)
    warnings = _warnings(model, family, hp, plan, outtype) + vocab.notes
    writer = gguf.GGUFWriter(None, family.name)
    add_general(writer, kind=gguf.GGUFType.MODEL, name=name or model.path.resolve().name, outtype=outtype)
    if replacements:
        # Provenance: a merged model is a fine-tune of its base, not a plain conversion of it
        # (what `bora-tools push` reads to write the model card's base_model_relation).
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, model.path.resolve().name)
        writer.add_tags(["bora", "merged"])
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


def plan_model_tensors(model: ModelDir, family: Family, hp: Hparams, outtype: str, *,
                       replacements: dict[str, BoraModule | torch.Tensor], device: torch.device | str = "cpu"
                       ) -> list[PlannedTensor]:
    """Every tensor of the GGUF, in file order of the shards; every problem is reported at once.

    Generated tensors (rotary factors) come first; the experts of a mixture-of-experts
    layer are stacked into one 3-D tensor at the place of the first one.

    Example: ``plan_model_tensors(model, family_for("LlamaForCausalLM", source="x"), hp, "q8_0", replacements={})``
    -> ``[PlannedTensor("token_embd.weight", (320, 64), Q8_0, ...), ...]``

    Raises:
        UnsupportedError: tensors llama.cpp has no name for, or non-float tensors.
        ConfigError: shapes that disagree with ``config.json``.
    """
    check_layer_count(model, hp)
    tmap = gguf.get_tensor_name_map(family.arch, hp.n_layer)
    unsupported: list[str] = []
    problems: list[str] = []
    plan: list[PlannedTensor] = [PlannedTensor(name, tuple(t.shape), gguf.GGMLQuantizationType.F32, whole(t),
                                               source=src)
                                 for name, t, src in family.generated_tensors(hp)]
    # A stored lm_head.weight is always written (output.weight), whatever config.json's
    # tie_word_embeddings says: transformers unties embeddings whose two matrices are both
    # stored and differ, and a merge may change lm_head. Tied means "lm_head.weight is not
    # stored"; llama.cpp then reuses token_embd, as transformers does.
    groups: dict[str, list[TensorEntry]] = {}
    for shard in model.shard_names:
        for entry in model.shard_entries(shard):
            if entry.name.endswith(_SKIPPED_SUFFIXES):
                continue  # recomputed by llama.cpp
            stacked = stacked_name(entry.name)
            hf_name = stacked or entry.name
            if stacked and hf_name in groups:
                groups[hf_name].append(entry)
                continue
            gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                unsupported.append(f"{entry.name}: no llama.cpp {family.name} tensor corresponds to it")
                continue
            if entry.dtype not in FLOAT_ST_DTYPES:
                unsupported.append(f"{entry.name}: dtype {entry.dtype} is not a float type")
                continue
            if stacked:
                groups[hf_name] = [entry]
                plan.append(PlannedTensor(gname, (), gguf.GGMLQuantizationType.F32, whole(torch.empty(0)),
                                          source=hf_name))  # completed below, once all experts are known
            else:
                problems.extend(shape_problems(entry.name, tuple(entry.shape), gname, hp, family))
                plan.append(_planned([entry], gname, hp, outtype, family, replacements, device))
    for i, p in enumerate(plan):
        if p.source in groups:
            entries = sorted(groups[p.source], key=lambda e: expert_index(e.name))
            problems.extend(expert_problems(entries))
            problems.extend(shape_problems(stacked_label(entries), stacked_shape(entries), p.name, hp, family))
            plan[i] = _planned(entries, p.name, hp, outtype, family, replacements, device)
    raise_if_problems(str(model.path), unsupported, cls=UnsupportedError)
    problems.extend(layout_problems({p.name for p in plan}, hp))
    raise_if_problems(str(model.path), problems, cls=ConfigError)
    return plan


def _planned(entries: list[TensorEntry], gname: str, hp: Hparams, outtype: str, family: Family,
             replacements: dict[str, BoraModule | torch.Tensor], device: torch.device | str) -> PlannedTensor:
    """One GGUF tensor from one checkpoint tensor, or from the experts ``entries`` stacked in order."""
    first = entries[0]
    shape = stacked_shape(entries)
    # For llama.cpp's quantizer, the intermediate keeps the values exactly: the stored dtype,
    # or float32 for weights computed here (W + dW), so that only the quantizer rounds.
    computed = any(replacements.get(e.name) is not None for e in entries)
    exact = Q.F32 if computed else _EXACT.get(first.dtype, Q.F32)
    qtype, fallback = tensor_type(gname, shape, outtype, exact=exact)
    heads = qk_heads(gname, hp) if family.permute_qk else None
    head_rows = first.shape[0] // heads if heads else 1
    shift = family.shifted(gname)

    def transform(block: torch.Tensor) -> torch.Tensor:
        # Blocks hold whole heads, and the permutation never crosses a head.
        if heads is not None:
            block = block[qk_row_order(block.shape[0], block.shape[0] // head_rows).to(block.device)]
        if shift:  # in float32, as transformers computes 1 + w
            block = block.float() + shift
        return block

    def chunks() -> Iterator[torch.Tensor]:
        for entry in entries:  # experts one after the other: the 3-D tensor is their rows in order
            yield from _entry_blocks(entry, replacements.get(entry.name), transform, device, align=head_rows)

    merged = [e for e in entries if isinstance(replacements.get(e.name), BoraModule)]
    saved = [e for e in entries if isinstance(replacements.get(e.name), torch.Tensor)]
    how = "(merged)" if merged else "(modules_to_save)" if saved else ""
    return PlannedTensor(gname, shape, qtype, chunks, source=f"{stacked_label(entries)} {how}".strip(),
                         fallback=fallback)


def _entry_blocks(entry: TensorEntry, replacement: BoraModule | torch.Tensor | None,
                  transform: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str, *,
                  align: int) -> Iterator[torch.Tensor]:
    """``entry``'s rows in blocks (merged with ``replacement`` when it is a BoRA module), transformed."""
    if isinstance(replacement, torch.Tensor):  # modules_to_save: the whole tensor, from the adapter
        yield transform(replacement)
        return
    merger = None
    if isinstance(replacement, BoraModule):
        # W + dW in float32, a block of rows at a time; rounded once when converted.
        merger = RowMerger(replacement, fan_in_fan_out=False, device=device)
    cols = math.prod(entry.shape[1:])
    fd = os.open(entry.shard, os.O_RDONLY)
    try:
        rows = entry.shape[0] if entry.shape else 1
        for start, stop in row_chunks(rows, cols, chunk=chunk_elements(device), align=align):
            block = read_rows(entry, start, stop, fd=fd)
            yield transform(merger.rows(block, start) if merger else block)
    finally:
        os.close(fd)


def _warnings(model: ModelDir, family: Family, hp: Hparams, plan: list[PlannedTensor], outtype: str) -> list[str]:
    out = []
    fallbacks = [p.name for p in plan if p.fallback]
    if fallbacks:
        shown = ", ".join(fallbacks[:4]) + (f" and {len(fallbacks) - 4} more" if len(fallbacks) > 4 else "")
        out.append(
            f"{len(fallbacks)} tensor(s) written as F16 instead of {outtype.upper()}: their rows are not a "
            f"multiple of 32 ({shown})"
        )
    window = model.config.get("sliding_window")
    if model.config.get("use_sliding_window") is False:
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
    refuse_output_over_inputs(out, adapter_dir, base_dir)
    adapter = load_adapter(adapter_dir)
    base = ModelDir.open(base_dir)
    if adapter.config.fan_in_fan_out:
        raise UnsupportedError(f"{adapter_dir}: fan_in_fan_out adapters (GPT-2 Conv1D) have no GGUF export")
    replacements = merge_plan(adapter, base)
    report = export_model(
        base,
        out,
        outtype=outtype,
        overwrite=overwrite,
        replacements=replacements,
        device=resolve_device(device),
        threads=threads,
        progress=progress,
        kind="merged",
        name=name,
    )
    report.adapter = str(adapter_dir)
    return report
