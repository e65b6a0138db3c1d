"""Streaming merge of a BoRA adapter into a Hugging Face base model (SPEC sections 3, 4, 6).

Flow: plan (which base tensor is replaced by what), validate everything,
then stream every shard tensor by tensor into an incrementally written
safetensors file. Adapted tensors become ``W + scale * dW``, accumulated in
float32 on the chosen device a few rows at a time and rounded once; untouched
tensors are copied as raw bytes. Peak memory is a few row chunks, not the
model, the shard or even the largest tensor.

The two per-tensor pieces, ``merge_plan`` and ``merged_weight``, are public
so that other one-pass writers (GGUF export with ``--merge``) reuse them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Union

import torch

from bora_tools.checkpoint import PREFIX, BoraAdapter, BoraModule, check_against_base, load_adapter
from bora_tools.devices import one_cpu_thread, resolve_device
from bora_tools.dtypes import DTYPES as OUT_DTYPES, cast_finite
from bora_tools.errors import ModelDirError, ShapeError, UnsupportedError, ValidationError, raise_if_problems
from bora_tools.math import mixed_row_blocks
from bora_tools.model_dir import DTYPES, INDEX_FILE, ModelDir, TensorEntry, read_rows
from bora_tools.output import atomic_output, check_target, refuse_output_over_inputs
from bora_tools.progress import Progress, no_progress
from bora_tools.st_writer import SafetensorsWriter, TensorSpec, st_dtype

Tensor = torch.Tensor
#: What replaces a base tensor: an adapted module (``W + dW``) or a whole
#: ``modules_to_save`` tensor.
Replacement = Union[BoraModule, Tensor]

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
    """``W + scale * dW`` for one module, a slice of stored rows at a time, in float32 on ``device``.

    The small mixed factor ``s * A'`` (``(b, r, n)``) is built once; each chunk
    of stored rows is widened to float32 and updated in place by ``addmm_``, so
    the dense ``dW`` never exists whole. With ``fan_in_fan_out`` the base stores
    ``W^T`` ``(n, m)`` (GPT-2 ``Conv1D``): stored row ``k`` is input column ``k``.
    """

    def __init__(self, module: BoraModule, *, fan_in_fan_out: bool, scale: float = 1.0,
                 device: torch.device | str = "cpu"):
        self.module, self.fan_in_fan_out, self.device = module, fan_in_fan_out, torch.device(device)
        f32 = dict(device=self.device, dtype=torch.float32)
        b, m = module.b, module.shape[0]
        # Fold the scaling into the small factor, never into the big matrix.
        self.mixed = mixed_row_blocks(module.A.to(**f32), module.sigma.to(**f32)) * (module.scaling * scale)
        self.b_rows = module.B.to(**f32).reshape(b, m // b, module.r)  # B_i

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
            work = torch.empty(w_rows.shape, dtype=torch.float32, device=self.device)
        w = work.copy_(w_rows, non_blocking=True)
        stop = start + w.shape[0]
        if self.fan_in_fan_out:
            # Stored rows are input columns: W^T[a:c] += (B_i @ A'_i[:, a:c])^T per output block i.
            height = self.b_rows.shape[1]
            for i in range(self.module.b):
                w[:, i * height:(i + 1) * height].addmm_(self.mixed[i, :, start:stop].T, self.b_rows[i].T)
            return w
        height = self.b_rows.shape[1]
        for i in range(start // height, (stop - 1) // height + 1):
            lo, hi = max(start, i * height), min(stop, (i + 1) * height)
            w[lo - start:hi - start].addmm_(self.b_rows[i, lo - i * height:hi - i * height], self.mixed[i])
        return w


def row_chunks(rows: int, cols: int, *, chunk_elements: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges covering ``rows`` rows, about ``chunk_elements`` elements each."""
    step = max(1, chunk_elements // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


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
    merger = RowMerger(module, fan_in_fan_out=fan_in_fan_out, scale=scale, device=device)
    if tuple(weight.shape) != merger.stored_shape:
        raise ShapeError(f"{PREFIX + module.name}: the adapter implies base shape {merger.stored_shape}, "
                         f"the weight has {tuple(weight.shape)}")
    out = torch.empty(weight.shape, dtype=out_dtype or weight.dtype, device=merger.device)
    chunk = GPU_CHUNK_ELEMENTS if merger.device.type == "cuda" else CPU_CHUNK_ELEMENTS
    for start, stop in row_chunks(weight.shape[0], weight.shape[1], chunk_elements=chunk):
        out[start:stop] = merger.rows(weight[start:stop], start)  # the one rounding
    return out


# -- the streaming pipeline ------------------------------------------------

@dataclass
class MergeReport:
    """What ``merge_adapter`` wrote: counts per kind of tensor, sizes and time."""

    out: Path
    device: str
    dtype: str
    scale: float
    shards: int
    merged: int  # W + dW
    replaced: int  # modules_to_save
    copied: int  # raw bytes
    converted: int  # untouched, but cast to --dtype
    bytes_written: int
    other_files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "out": str(self.out)}


@dataclass(frozen=True)
class _Job:
    """One output tensor: where it comes from and what happens to it."""

    entry: TensorEntry
    spec: TensorSpec
    replacement: Replacement | None

    @property
    def kind(self) -> str:
        if isinstance(self.replacement, BoraModule):
            return "merged"
        if self.replacement is not None:
            return "replaced"
        return "copied" if self.spec.dtype == self.entry.dtype else "converted"

    @property
    def spec_torch_dtype(self) -> torch.dtype:
        return DTYPES[self.spec.dtype][1]


def merge_adapter(adapter: str | Path, base: str | Path, out: str | Path, *, dtype: str = "auto", scale: float = 1.0,
                  device: str = "auto", overwrite: bool = False, progress: Progress = no_progress) -> MergeReport:
    """Merge a BoRA adapter into its base model, writing a complete model directory ``out``.

    Every shard keeps its name and its tensors; adapted weights become
    ``W + scale * dW`` (float32 on ``device``, rounded once to the output dtype),
    ``modules_to_save`` tensors replace theirs, everything else is copied as
    raw bytes (or cast, when ``dtype`` asks for another float dtype). Nothing
    is written before every check passed; ``out`` appears only when complete.

    Example::

        report = merge_adapter("my-adapter", "base-model", "merged", dtype="bfloat16")
        report.merged   # number of weights that received their update

    Raises:
        ConfigError, CheckpointError: the adapter is unreadable or inconsistent.
        ModelDirError, UnsafePathError: the base directory is incomplete or unsafe.
        ShapeError, UnsupportedError: the adapter does not fit the base.
        OutputExistsError, OutputWriteError: ``out`` exists, or writing failed.
    """
    started = time.perf_counter()
    out = Path(out)
    out_dtype = _parse_dtype(dtype)
    if not math.isfinite(scale):
        raise ValidationError(f"--scale {scale}: expected a finite number")
    dev = resolve_device(device)
    check_target(out, overwrite=overwrite)
    with one_cpu_thread(dev):
        bora = load_adapter(adapter)
        model = ModelDir.open(base)
        refuse_output_over_inputs(out, model.path, adapter)
        plan = merge_plan(bora, model)
        shards = {shard: _jobs(model, shard, plan, out_dtype) for shard in model.shard_names}
        report = MergeReport(out=out, device=str(dev), dtype=dtype, scale=scale, shards=len(shards), merged=0,
                             replaced=0, copied=0, converted=0, bytes_written=0)
        _write_output(model, shards, report, overwrite=overwrite, fan_in_fan_out=bora.config.fan_in_fan_out,
                      out_dtype=out_dtype, device=dev, progress=progress)
    report.seconds = time.perf_counter() - started
    return report


def _write_output(model: ModelDir, shards: dict[str, list[_Job]], report: MergeReport, *, overwrite: bool,
                  fan_in_fan_out: bool, out_dtype: torch.dtype | None, device: torch.device, progress: Progress) -> None:
    """Every shard, the other files and the index into a temporary sibling, renamed when complete."""
    total = sum(len(jobs) for jobs in shards.values())
    ticks = iter(progress(range(total), total=total, label="merging"))
    with atomic_output(report.out, overwrite=overwrite, directory=True) as tmp:
        for shard, jobs in shards.items():
            meta = model.headers[shard].metadata
            _write_shard(tmp / shard, jobs, metadata=meta if meta is not None else {"format": "pt"},
                         fan_in_fan_out=fan_in_fan_out, scale=report.scale, device=device, ticks=ticks)
            for job in jobs:
                setattr(report, job.kind, getattr(report, job.kind) + 1)
            report.bytes_written += (tmp / shard).stat().st_size
        report.other_files = _copy_other_files(model, tmp, dtype=out_dtype)
        if model.index is not None:
            _write_index(model, tmp, shards)
    for _ in ticks:  # finish the bar
        pass


def _parse_dtype(dtype: str) -> torch.dtype | None:
    if dtype == "auto":
        return None
    if dtype not in OUT_DTYPES:
        raise ValidationError(f"--dtype {dtype!r}: expected auto, {', '.join(OUT_DTYPES)}")
    return OUT_DTYPES[dtype]


def _jobs(model: ModelDir, shard: str, plan: dict[str, Replacement], out_dtype: torch.dtype | None) -> list[_Job]:
    jobs = []
    for entry in model.shard_entries(shard):
        cast = out_dtype is not None and entry.torch_dtype in MERGEABLE_DTYPES
        spec = TensorSpec(entry.name, st_dtype(out_dtype) if cast else entry.dtype, entry.shape)
        jobs.append(_Job(entry, spec, plan.get(entry.name)))
    # The base's own order, except that wider dtypes come first when a cast
    # changed sizes: safetensors orders them so, which keeps every tensor's
    # data aligned to its element size. A no-op for files safetensors wrote.
    jobs.sort(key=lambda j: -DTYPES[j.spec.dtype][0])
    return jobs


def _write_shard(path: Path, jobs: list[_Job], *, metadata: dict, fan_in_fan_out: bool, scale: float,
                 device: torch.device, ticks: Iterator) -> None:
    src = jobs[0].entry.shard if jobs else None
    fd = os.open(src, os.O_RDONLY) if src else -1
    try:
        with SafetensorsWriter(path, [j.spec for j in jobs], metadata=metadata, background=True) as writer:
            for job in jobs:
                if job.kind == "copied":
                    writer.copy_range(job.spec.name, fd, job.entry.start, job.entry.nbytes)
                elif job.kind == "merged":
                    _write_merged(writer, fd, job, fan_in_fan_out=fan_in_fan_out, scale=scale, device=device)
                elif job.kind == "replaced":
                    new = cast_finite(job.replacement, job.spec_torch_dtype, job.spec.name)
                    writer.write(job.spec.name, new.reshape(job.spec.shape))
                else:
                    _write_converted(writer, fd, job)
                next(ticks, None)
    finally:
        if fd >= 0:
            os.close(fd)


def _write_merged(writer: SafetensorsWriter, fd: int, job: _Job, *, fan_in_fan_out: bool, scale: float,
                  device: torch.device) -> None:
    merger = RowMerger(job.replacement, fan_in_fan_out=fan_in_fan_out, scale=scale, device=device)
    rows, cols = job.entry.shape
    chunk = GPU_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS
    height = min(rows, max(1, chunk // cols))
    # Buffers reused for every chunk: read bytes, float32 work, and two rounded
    # outputs, so that the writer thread saves one while the next is merged.
    # Pinned host memory lets the GPU copies run at full speed.
    pin = device.type == "cuda"
    buf = torch.empty(height * cols * DTYPES[job.entry.dtype][0], dtype=torch.uint8, pin_memory=pin)
    work = torch.empty((height, cols), dtype=torch.float32, device=device)
    ring = [torch.empty((height, cols), dtype=job.spec_torch_dtype, pin_memory=pin) for _ in range(2)]
    busy: list[Future | None] = [None, None]
    for n, (start, stop) in enumerate(row_chunks(rows, cols, chunk_elements=chunk)):
        k, slot = stop - start, n % 2
        if busy[slot] is not None:
            busy[slot].result()  # the writer is done with this buffer
        merged = merger.rows(read_rows(job.entry, start, stop, fd=fd, buf=buf), start, work=work[:k])
        out = ring[slot][:k]
        # The one rounding; on a GPU it happens there, so half the bytes come back.
        out.copy_(cast_finite(merged, out.dtype, job.spec.name))
        busy[slot] = writer.write(job.spec.name, out)


def _write_converted(writer: SafetensorsWriter, fd: int, job: _Job) -> None:
    """Cast an untouched float tensor to the output dtype, a chunk of elements at a time."""
    entry, size = job.entry, DTYPES[job.entry.dtype][0]
    step = CPU_CHUNK_ELEMENTS * size
    buf = bytearray(min(step, entry.nbytes))
    for offset in range(0, entry.nbytes, step):
        view = memoryview(buf)[:min(step, entry.nbytes - offset)]
        if os.preadv(fd, [view], entry.start + offset) != view.nbytes:
            raise ModelDirError(f"{entry.shard}: truncated: tensor {entry.name} ends early")
        writer.write(job.spec.name, cast_finite(torch.frombuffer(view, dtype=entry.torch_dtype),
                                                job.spec_torch_dtype, entry.name))


def _copy_other_files(model: ModelDir, tmp: Path, *, dtype: torch.dtype | None) -> list[str]:
    """Copy config, tokenizer and every other file; record a changed dtype in config.json."""
    names = []
    for path in model.other_files():
        shutil.copyfile(path, tmp / path.name)
        names.append(path.name)
    if dtype is not None:
        config = dict(model.config)
        # transformers 5 writes "dtype", older versions "torch_dtype"; loaders
        # with dtype="auto" read it, so it must name what the shards now hold.
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        config.update({k: str(dtype).replace("torch.", "") for k in keys})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return names


def _write_index(model: ModelDir, tmp: Path, shards: dict[str, list[_Job]]) -> None:
    index = json.loads(json.dumps(model.index))  # a deep copy that keeps every other key
    metadata = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    metadata["total_size"] = sum(j.spec.nbytes for jobs in shards.values() for j in jobs)
    index["metadata"] = metadata
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
