"""Merging one module into its base weight, a slice of stored rows at a time (docs/format.md).

``merge_plan`` maps each base tensor an adapter changes to what replaces it;
``RowMerger`` computes ``W + scale * dW`` for a row range in float32 without
forming ``dW``; ``stream_rows`` is the one row streamer (positional reads of a
shard, ``row_chunks`` ranges of ``chunk_elements`` each, merged by a
``RowMerger``) used by every streaming writer: ``merge`` and the one-pass GGUF
``--merge``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Union

import torch

from bora_tools.core.adapter import PREFIX, BoraAdapter, BoraModule, check_against_base
from bora_tools.core.dtypes import cast_finite, check_finite_update
from bora_tools.core.factors import mixed_row_blocks
from bora_tools.errors import ShapeError, UnsupportedError, raise_if_problems
from bora_tools.io.model_dir import ModelDir, TensorEntry, read_rows

Tensor = torch.Tensor


@dataclass(frozen=True)
class WeightedSum:
    """Several adapters' updates of one base weight: ``sum_k weight_k * dW_k`` (``merge A B --weights``).

    ``terms`` holds ``(module, weight)`` pairs, all of the same shape; a ``RowMerger`` adds every term to
    the same float32 rows before the one rounding.
    """

    terms: tuple[tuple[BoraModule, float], ...]

    @property
    def name(self) -> str:
        return self.terms[0][0].name

    @property
    def shape(self) -> tuple[int, int]:
        return self.terms[0][0].shape


#: What replaces a base tensor: an adapted module (``W + dW``), several (``W + sum_k w_k dW_k``) or a whole
#: ``modules_to_save`` tensor.
Replacement = Union[BoraModule, WeightedSum, Tensor]

#: Dtypes a merged weight may be stored in; quantised or integer weights are refused.
MERGEABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

#: Elements per float32 working chunk on the CPU: a few MiB stays in cache
#: while a bf16 row block is widened, updated and rounded back.
CPU_CHUNK_ELEMENTS = 1 << 19
#: On a GPU larger chunks keep the device busy; memory is still bounded.
GPU_CHUNK_ELEMENTS = 1 << 25


def merge_plan(adapter: BoraAdapter, base: ModelDir) -> dict[str, Replacement]:
    """Map each base tensor name the adapter changes to what replaces it.

    Adapted module ``P`` replaces ``P.weight`` (a ``BoraModule``: merge it with
    ``merged_weight``); a ``modules_to_save`` tensor replaces the base tensor of
    the same name whole. Every other base tensor is untouched. Everything is
    checked first, every problem reported at once.

    Example::

        plan = merge_plan(load_adapter("ad"), ModelDir.open("base"))
        plan["model.layers.0.self_attn.q_proj.weight"]   # BoraModule(...)

    Raises:
        UnsupportedError: the adapter targets a weight tied to the input
            embeddings (absent from the base files), or a non-float base weight.
        ShapeError: a module or saved tensor is absent from the base or mis-shaped.
    """
    _refuse_tied(adapter, base)
    source = str(adapter.path) if adapter.path else "adapter"
    check_against_base(adapter, base.shape_of, source=source)
    plan: dict[str, Replacement] = {name + ".weight": mod for name, mod in adapter.modules.items()}
    plan.update(adapter.saved)
    problems = [f"{PREFIX + name}: base tensor {name} is {base.entries[name].dtype}; only float weights can be merged"
                for name in plan if base.entries[name].torch_dtype not in MERGEABLE_DTYPES]
    raise_if_problems(source, problems, cls=UnsupportedError)
    return plan


def _refuse_tied(adapter: BoraAdapter, base: ModelDir) -> None:
    # With tied embeddings lm_head is not stored: it *is* the input embedding
    # matrix. The adapted model changes one side only (a BoRA lm_head, or a
    # modules_to_save copy of the embeddings while lm_head keeps the original),
    # which one shared matrix cannot express, so both are refused.
    if not base.config.get("tie_word_embeddings", True) or base.shape_of("lm_head.weight") is not None:
        return
    vocab = base.config.get("vocab_size")
    problems = []
    for name in adapter.modules:
        if name.rsplit(".", 1)[-1] == "lm_head":
            problems.append(f"{PREFIX + name}: lm_head is tied to the input embeddings in this base model "
                            f"(tie_word_embeddings, no lm_head.weight stored); merging into it would change both")
    for key, tensor in adapter.saved.items():
        if key.rsplit(".", 2)[-2] == "lm_head" or (tensor.ndim == 2 and tensor.shape[0] == vocab):
            problems.append(f"{PREFIX + key}: modules_to_save replaces a matrix shared by the input embeddings and "
                            f"lm_head (tie_word_embeddings); the adapted model changes only one of them")
    raise_if_problems(str(adapter.path or "adapter"), problems, cls=UnsupportedError,
                      hint="leave lm_head and the embeddings out of the adapter, or untie the base model first")


class RowMerger:
    """``W + scale * dW`` for one module, a slice of stored rows at a time, in float32 (float64 for a float64 base).

    The small mixed factor ``s * A'`` (``(b, r, n)``) is built once; each chunk
    of stored rows is widened to float32 and updated in place by ``addmm_``, so
    the dense ``dW`` never exists whole. With ``fan_in_fan_out`` the base stores
    ``W^T`` ``(n, m)`` (GPT-2 ``Conv1D``): stored row ``k`` is input column ``k``.
    """

    def __init__(self, module: BoraModule | WeightedSum, *, fan_in_fan_out: bool, scale: float = 1.0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.module, self.fan_in_fan_out, self.device = module, fan_in_fan_out, torch.device(device)
        self.dtype = dtype  # float32, or float64 for a float64 base (never rounded below it)
        terms = module.terms if isinstance(module, WeightedSum) else ((module, 1.0),)
        self.cause = " + ".join(f"scaling {mod.scaling:g} x scale {scale * w:g}" for mod, w in terms)
        f32 = dict(device=self.device, dtype=dtype)
        # Per term: the mixed factor with the scaling folded in (never into the big matrix), and B_i.
        self.parts = [(mixed_row_blocks(mod.A.to(**f32), mod.sigma.to(**f32)) * (mod.scaling * scale * w),
                       mod.B.to(**f32).reshape(mod.b, mod.shape[0] // mod.b, mod.r)) for mod, w in terms]

    @property
    def stored_shape(self) -> tuple[int, int]:
        m, n = self.module.shape
        return (n, m) if self.fan_in_fan_out else (m, n)

    def rows(self, w_rows: Tensor, start: int, *, work: Tensor | None = None) -> Tensor:
        """Merged float32 stored rows ``start : start + len(w_rows)`` (on ``device``).

        ``work``, a float32 tensor of ``w_rows``' shape on ``device``, receives the
        result; reusing one across chunks spares an allocation (and its page
        faults) per chunk.
        """
        if work is None:
            work = torch.empty(w_rows.shape, dtype=self.dtype, device=self.device)
        w = work.copy_(w_rows, non_blocking=True)
        stop = start + w.shape[0]
        for mixed, b_rows in self.parts:  # every term onto the same float32 rows: one rounding in the end
            b, height = b_rows.shape[:2]
            if self.fan_in_fan_out:
                # Stored rows are input columns: W^T[a:c] += (B_i @ A'_i[:, a:c])^T per output block i.
                for i in range(b):
                    w[:, i * height:(i + 1) * height].addmm_(mixed[i, :, start:stop].T, b_rows[i].T)
            else:
                for i in range(start // height, (stop - 1) // height + 1):
                    lo, hi = max(start, i * height), min(stop, (i + 1) * height)
                    w[lo - start:hi - start].addmm_(b_rows[i, lo - i * height:hi - i * height], mixed[i])
        # Checked where the value is made: an overflow here would otherwise be written as inf.
        check_finite_update(w, w_rows, PREFIX + self.module.name, cause=self.cause)
        return w


def chunk_elements(device: torch.device | str = "cpu") -> int:
    """The working-chunk size (elements) of every streaming writer on ``device``."""
    return GPU_CHUNK_ELEMENTS if torch.device(device).type == "cuda" else CPU_CHUNK_ELEMENTS


def row_chunks(rows: int, cols: int, *, chunk: int | None = None, align: int = 1) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges covering ``rows`` rows of ``cols`` elements, about ``chunk`` elements each.

    ``chunk`` defaults to ``CPU_CHUNK_ELEMENTS``; every range but the last is a multiple of ``align``
    rows (GGUF export keeps whole attention heads together for the q/k permutation).

    Example: ``list(row_chunks(5000, 2048, chunk=1 << 20, align=128))`` -> ``[(0, 512), ..., (4608, 5000)]``
    """
    chunk = CPU_CHUNK_ELEMENTS if chunk is None else chunk
    step = max(align, chunk // max(cols, 1) // align * align)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def stream_rows(entry: TensorEntry, module: BoraModule | WeightedSum | None = None, *, fan_in_fan_out: bool = False,
                scale: float = 1.0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                align: int = 1) -> Iterator[Tensor]:
    """``entry``'s stored rows, a block at a time, read from its shard; merged with ``module`` when given.

    The one row streamer of every streaming writer (``merge`` and the GGUF ``--merge``): positional
    reads of ``row_chunks`` ranges (``chunk_elements(device)`` elements, whole multiples of ``align``
    rows), each block merged by a ``RowMerger``. Without ``module`` a block is the stored rows as they
    are (``entry``'s dtype, on the CPU); with it, ``W + scale * dW`` in ``dtype`` (float32, or float64
    for a float64 base) on ``device``, checked finite.

    Every block lives in the same reused buffers: it stays valid until the next one is asked for.
    The generator owns its file descriptor: opened at the first block, closed in ``finally`` when
    the rows end, a read fails, or the consumer stops early (``close()``).

    Example::

        with contextlib.closing(stream_rows(base.entries[name], plan[name])) as blocks:
            for block in blocks:
                writer.write(name, block.to(torch.bfloat16))

    Raises:
        ModelDirError: the shard ends before the tensor does.
        UnsupportedError: the update is not finite where the base was (``RowMerger.rows``).
    """
    device = torch.device(device)
    rows, cols = (entry.shape[0] if entry.shape else 1), math.prod(entry.shape[1:])
    ranges = list(row_chunks(rows, cols, chunk=chunk_elements(device), align=align))
    if not ranges:
        return
    height = ranges[0][1] - ranges[0][0]  # the largest block
    merger = None if module is None else RowMerger(module, fan_in_fan_out=fan_in_fan_out, scale=scale,
                                                   device=device, dtype=dtype)
    # Buffers reused for every block (no allocation and page faults per block); pinned
    # host memory lets the copies to a GPU run at full speed.
    pin = device.type == "cuda"
    read = torch.empty(height * (entry.nbytes // rows), dtype=torch.uint8, pin_memory=pin)
    work = torch.empty((height, *entry.shape[1:]), dtype=dtype, device=device) if merger else None
    fd = os.open(entry.shard, os.O_RDONLY)
    try:
        for start, stop in ranges:
            block = read_rows(entry, start, stop, fd=fd, buf=read)
            yield block if merger is None else merger.rows(block, start, work=work[:stop - start])
    finally:
        os.close(fd)


def merged_weight(weight: Tensor, module: BoraModule, *, fan_in_fan_out: bool, scale: float = 1.0,
                  device: torch.device | str = "cpu", out_dtype: torch.dtype | None = None) -> Tensor:
    """``W + scale * dW`` for one base weight, computed in float32 on ``device``, rounded once.

    ``weight`` is the base tensor as stored (``(m, n)``, or ``(n, m)`` with
    ``fan_in_fan_out``); ``out_dtype`` defaults to its dtype. The result has the
    stored shape and lies on ``device``.

    Example::

        plan = merge_plan(adapter, base)
        w = merged_weight(base.load(name), plan[name], fan_in_fan_out=adapter.config.fan_in_fan_out,
                          out_dtype=torch.bfloat16)

    Raises:
        ShapeError: ``weight`` does not have the shape the module implies.
    """
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    merger = RowMerger(module, fan_in_fan_out=fan_in_fan_out, scale=scale, device=device, dtype=acc)
    if tuple(weight.shape) != merger.stored_shape:
        raise ShapeError(f"{PREFIX + module.name}: the adapter implies base shape {merger.stored_shape}, "
                         f"the weight has {tuple(weight.shape)}")
    out = torch.empty(weight.shape, dtype=out_dtype or weight.dtype, device=merger.device)
    for start, stop in row_chunks(weight.shape[0], weight.shape[1], chunk=chunk_elements(merger.device)):
        out[start:stop] = cast_finite(merger.rows(weight[start:stop], start), out.dtype, PREFIX + module.name)
    return out
