"""Shared pieces of the GGUF writers: output types, tensor layout, streaming.

A GGUF file is written in one pass with gguf-py's ``GGUFWriter``: every tensor
info (name, shape, type, byte size) is declared first, then the header, the
key-value data and the tensor infos are written, and finally the tensors one
at a time. Each tensor is itself produced and written in blocks of rows (read
from the shard with positional reads, permuted, merged, converted), so memory
holds a few MiB of rows, never the model and not even its largest tensor.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np
import torch

from bora_tools.core.dtypes import cast_finite
from bora_tools.errors import UnsupportedError
from bora_tools.gguf.outtypes import OUTTYPES
from bora_tools.progress import Progress, no_progress

Q = gguf.GGMLQuantizationType


#: The torch dtype of the plain GGUF float types.
_TORCH_FOR = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
_WIDER = "use `outtype` f32 or bf16"
#: Elements per parallel Q8_0 task: bounds the float32 temporaries of gguf.quants.
_Q8_SLICE_ELEMENTS = 1 << 17


def tensor_type(gguf_name: str, shape: tuple[int, ...], outtype: str, *, exact: Q = Q.F32) -> tuple[Q, str | None]:
    """The GGUF type of one tensor, and why it differs from ``outtype`` if it must.

    As llama.cpp expects: 1-D tensors and norms stay F32; Q8_0 needs rows
    (the last dimension) that are a multiple of its 32-element block, and falls
    back to F16 otherwise. For an outtype llama.cpp's quantizer makes, this is
    the type of the intermediate file: ``exact``, a type that holds the values
    without rounding (the stored dtype, or F32 for merged weights), so that
    only the quantizer rounds.

    Example: ``tensor_type("blk.0.ffn_down.weight", (64, 80), "q8_0")``
    -> ``(F16, "row of 80 is not a multiple of 32")``
    """
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return Q.F32, None
    if OUTTYPES[outtype].tensor is None:
        return exact, None
    want = Q[OUTTYPES[outtype].tensor]
    if want == Q.Q8_0:
        block = gguf.GGML_QUANT_SIZES[Q.Q8_0][0]
        if shape[-1] % block:
            return Q.F16, f"row of {shape[-1]} is not a multiple of {block}"
    return want, None


def tensor_nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    return math.prod(gguf.quant_shape_to_byte_shape(shape, qtype))


def to_gguf_array(t: torch.Tensor, qtype: Q, *, name: str = "tensor", pool: Executor | None = None) -> np.ndarray:
    """The bytes of ``t`` (whole rows) as GGUF type ``qtype``: a contiguous numpy array to write as is.

    F32/F16/BF16 are plain casts (torch rounds to nearest even, as ggml does);
    Q8_0 goes through gguf-py's bit-exact quantiser, in row slices run on
    ``pool`` when given (serially otherwise). A value the narrowing would turn
    into ``inf`` (beyond float16's 65504, or a Q8_0 block scale beyond it) is
    refused, naming the tensor, rather than written.

    Example: ``to_gguf_array(torch.randn(4, 64), Q.Q8_0).shape`` -> ``(4, 68)`` (2 blocks of 34 bytes a row)

    Raises:
        UnsupportedError: a value overflows the GGUF type (``name`` is named).
    """
    t = t.detach().cpu()
    if qtype in _TORCH_FOR:
        out = cast_finite(t, _TORCH_FOR[qtype], name, hint=_WIDER).contiguous()
        return out.view(torch.int16).numpy().view(np.uint8) if qtype == Q.BF16 else out.numpy()
    if qtype != Q.Q8_0:
        raise UnsupportedError(f"GGUF type {qtype.name} is not supported")
    rows = cast_finite(t.reshape(-1, t.shape[-1]), torch.float32, name, strict=True, hint=_WIDER)
    _check_q8_scales(rows, name)
    out = np.empty(gguf.quant_shape_to_byte_shape(tuple(rows.shape), qtype), dtype=np.uint8)
    step = max(1, _Q8_SLICE_ELEMENTS // rows.shape[1])

    def quantize(start: int) -> None:
        chunk = rows[start:start + step].numpy()
        out[start:start + step] = gguf.quants.quantize(chunk, qtype)

    # numpy releases the GIL inside its loops, so row slices quantise in parallel threads.
    list((pool.map if pool is not None else map)(quantize, range(0, rows.shape[0], step)))
    return out


def _check_q8_scales(rows: torch.Tensor, name: str) -> None:
    # Each Q8_0 block stores its scale max|x| / 127 as float16: beyond 65504 it becomes inf.
    block = gguf.GGML_QUANT_SIZES[Q.Q8_0][0]
    scales = rows.reshape(-1, block).abs().amax(dim=1) / 127
    cast_finite(scales, torch.float16, f"{name} (Q8_0 block scale = max|x| / 127)", strict=True, hint=_WIDER)


def quantize_pool() -> ThreadPoolExecutor:
    """A thread pool for Q8_0 row slices, sized to the CPUs this process may use (at most 8).

    Use it as a context manager so its threads end with the export.

    Example: ``with quantize_pool() as pool: to_gguf_array(t, Q.Q8_0, pool=pool)``
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return ThreadPoolExecutor(max_workers=max(1, min(cpus, 8)), thread_name_prefix="bora-q8")


def whole(t: torch.Tensor) -> Callable[[], Iterator[torch.Tensor]]:
    """A ``chunks`` producer for a tensor already in memory (small: norms, LoRA factors)."""
    return lambda: iter((t,))


@dataclass
class PlannedTensor:
    """One tensor to write: its GGUF name, shape (torch order), type, and how to produce it.

    ``chunks()`` yields consecutive blocks of whole rows in the final layout
    (any float dtype); they are converted to ``qtype`` as they are written.
    """

    name: str
    shape: tuple[int, ...]
    qtype: Q
    chunks: Callable[[], Iterable[torch.Tensor]]
    source: str = ""  # the tensor(s) it comes from, for reports
    fallback: str | None = None  # why qtype is not the requested type

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.qtype)


class _Streamed:
    """What ``GGUFWriter.write_tensor_data`` needs of an array (``nbytes``, ``tofile``), produced block by block.

    The writer pads, checks the declared size and calls ``tofile``; here
    ``tofile`` converts and writes one block of rows at a time, so the
    converted tensor never exists whole.
    """

    def __init__(self, plan: PlannedTensor, pool: Executor | None):
        self.plan, self.pool, self.nbytes = plan, pool, plan.nbytes

    def tofile(self, fout: BinaryIO) -> None:
        written = 0
        name = f"{self.plan.name} ({self.plan.source})" if self.plan.source else self.plan.name
        chunks = iter(self.plan.chunks())
        try:
            for block in chunks:
                data = to_gguf_array(block, self.plan.qtype, name=name, pool=self.pool)
                data.tofile(fout)
                written += data.nbytes
        finally:
            # A block refused half-way (an f16 overflow) stops the producer now: the file it
            # streams from is closed at once, not when the error's traceback is dropped.
            if hasattr(chunks, "close"):
                chunks.close()
        if written != self.nbytes:
            raise AssertionError(f"{self.plan.name}: produced {written} bytes, declared {self.nbytes}")


def write_streaming(writer: gguf.GGUFWriter, path: Path, plan: list[PlannedTensor], *,
                    progress: Progress = no_progress, label: str = "writing GGUF") -> None:
    """Write ``writer``'s key-values and ``plan``'s tensors to ``path``, a block of rows in memory at a time.

    ``writer`` may split (``split_max_size``): the shards are then named after ``path`` as gguf-py does
    (``NAME-00001-of-0000N.gguf``).

    Example: ``write_streaming(gguf.GGUFWriter(None, "llama"), Path("m.gguf"), plan, progress=bar)``

    Raises:
        UnsupportedError: a value overflows its tensor's GGUF type (the file is then incomplete:
            write to a temporary path, as ``atomic_output`` does).
    """
    write_streaming_many([(writer, Path(path), plan)], progress=progress, label=label)


def write_streaming_many(files: list[tuple[gguf.GGUFWriter, Path, list[PlannedTensor]]], *,
                         progress: Progress = no_progress, label: str = "writing GGUF") -> None:
    """Write several GGUF files in one pass over the tensors: each block of rows is produced once.

    Every plan names the same tensors in the same order (only their types differ, one plan per
    ``outtype``); the first plan's ``chunks()`` produce the rows, which each file converts to its own type.
    So the source is read, and an adapter merged, once whatever the number of files.

    Example: ``write_streaming_many([(w16, Path("m-f16.gguf"), plan16), (w8, Path("m-q8_0.gguf"), plan8)])``

    Raises:
        UnsupportedError: a value overflows a tensor's GGUF type (the files are then incomplete).
    """
    plans = [plan for _, _, plan in files]
    first = plans[0]
    for plan in plans[1:]:
        if [(p.name, p.shape) for p in plan] != [(p.name, p.shape) for p in first]:
            raise AssertionError("plans of one pass must name the same tensors in the same order")
    for writer, _, plan in files:
        for p in plan:
            # The dtype argument only matters without raw_dtype; the shape is the logical one.
            writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
    with ExitStack() as stack:
        for writer, _, _ in files:
            stack.callback(writer.close)
        # The pool lives for these files only: no thread outlives the export.
        pool = stack.enter_context(quantize_pool()) if any(p.qtype == Q.Q8_0 for pl in plans for p in pl) else None
        for writer, path, _ in files:
            writer.write_header_to_file(path=Path(path))
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
        for i in progress(range(len(first)), total=len(first), label=label):
            if len(files) == 1:
                files[0][0].write_tensor_data(_Streamed(first[i], pool))  # type: ignore[arg-type]  # duck-typed
            else:
                _write_fanned_out([(writer, plan[i]) for writer, _, plan in files], pool)
        for writer, _, _ in files:
            writer.flush()


def _write_fanned_out(targets: list[tuple[gguf.GGUFWriter, PlannedTensor]], pool: Executor | None) -> None:
    """One tensor into several writers: what ``GGUFWriter.write_tensor_data`` does, a block of rows at a time."""
    outs = [_tensor_file(writer, p) for writer, p in targets]
    written = [0] * len(targets)
    source = targets[0][1]
    chunks = iter(source.chunks())
    try:
        for block in chunks:
            for k, (_, p) in enumerate(targets):
                name = f"{p.name} ({p.source})" if p.source else p.name
                data = to_gguf_array(block, p.qtype, name=name, pool=pool)
                data.tofile(outs[k])
                written[k] += data.nbytes
    finally:
        if hasattr(chunks, "close"):
            chunks.close()
    for k, (writer, p) in enumerate(targets):
        if written[k] != p.nbytes:
            raise AssertionError(f"{p.name}: produced {written[k]} bytes, declared {p.nbytes}")
        writer.write_padding(outs[k], p.nbytes)
        writer.state = gguf.gguf_writer.WriterState.WEIGHTS


def _tensor_file(writer: gguf.GGUFWriter, p: PlannedTensor) -> BinaryIO:
    # GGUFWriter.write_tensor_data's bookkeeping: the first shard with tensors left holds this one.
    assert writer.fout is not None
    file_id = next(i for i, tensors in enumerate(writer.tensors) if tensors)
    fout = writer.fout[file_id]
    info = writer.tensors[file_id].pop(next(iter(writer.tensors[file_id])))
    if info.nbytes != p.nbytes:
        raise AssertionError(f"{p.name}: declared {info.nbytes} bytes, planned {p.nbytes}")
    writer.write_padding(fout, fout.tell())
    return fout


def tensor_report(plan: list[PlannedTensor]) -> dict[str, Any]:
    """The tensor part of an export report: count, count per GGUF type, and every fallback with its reason.

    Example: ``tensor_report(plan)`` -> ``{"tensors": 21, "types": {"F32": 5, "Q8_0": 16}, "fallbacks": []}``
    """
    return {"tensors": len(plan), "types": dict(Counter(p.qtype.name for p in plan)),
            "fallbacks": [{"tensor": p.name, "type": p.qtype.name, "reason": p.fallback} for p in plan if p.fallback]}


def add_general(writer: gguf.GGUFWriter, *, kind: str, name: str, outtype: str) -> None:
    """``general.*`` keys common to models and adapters."""
    writer.add_type(kind)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[OUTTYPES[outtype].file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


HUB_URL = "https://huggingface.co/"


def add_provenance(writer: gguf.GGUFWriter, *, bases: Iterable[Path] = (), source: Path | None = None) -> None:
    """``general.base_model.*`` for each base and ``general.source.repo_url`` for a source from the Hub.

    A folder in huggingface_hub's cache is named by its Hub id (``name``, ``organization`` and
    ``repo_url``, as llama.cpp's converters write them), never by the cache folder's hash; another
    folder by its own name.
    """
    from bora_tools.io.hub_input import hub_id_of

    bases = list(bases)
    if bases:
        writer.add_base_model_count(len(bases))
    for i, path in enumerate(bases):
        hub_id = hub_id_of(path)
        if hub_id is None:
            writer.add_base_model_name(i, Path(path).resolve().name)
            continue
        organization, name = hub_id.split("/")
        writer.add_base_model_name(i, name)
        writer.add_base_model_organization(i, organization)
        writer.add_base_model_repo_url(i, HUB_URL + hub_id)
    source_id = hub_id_of(source)
    if source_id is not None:
        writer.add_source_repo_url(HUB_URL + source_id)


def hub_name(path: Path) -> str:
    """A model's name in a GGUF (``general.name``): its Hub repo's name for a folder in the Hub cache, else the
    folder's own name."""
    from bora_tools.io.hub_input import hub_id_of

    hub_id = hub_id_of(path)
    return hub_id.split("/")[-1] if hub_id else Path(path).resolve().name
