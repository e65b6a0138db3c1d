"""Streaming merge of a BoRA adapter into a Hugging Face base model (docs/format.md, sections 1 and 3).

Flow: plan (which base tensor is replaced by what), validate everything,
then stream every shard tensor by tensor into an incrementally written
safetensors file. Adapted tensors become ``W + scale * dW``, accumulated in
float32 on the chosen device a few rows at a time and rounded once; untouched
tensors are copied as raw bytes. Peak memory is a few row chunks, not the
model, the shard or even the largest tensor.

The per-tensor pieces live in ``bora_tools.core.row_merge``, shared with the
one-pass GGUF ``--merge``: ``merge_plan`` (what replaces each base tensor) and
``stream_rows`` (a tensor's merged rows, a block at a time); ``merged_weight``
merges one weight in memory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bora_tools.core.adapter import BoraModule
from bora_tools.core.adapter_sum import Inputs, parse_weights, recipe, recipe_card
from bora_tools.core.devices import one_cpu_thread, resolve_device
from bora_tools.core.dtypes import cast_finite, check_finite_update, dtype_name, parse_dtype
from bora_tools.core.lora_input import is_lora, read_adapter
from bora_tools.core.row_merge import (
    MERGEABLE_DTYPES,
    Replacement,
    WeightedSum,
    chunk_elements,
    merge_plan,
    stream_rows,
)
from bora_tools.core.task_arithmetic import check_method, module_update, working_bytes
from bora_tools.errors import ModelDirError, ValidationError
from bora_tools.io.atomic import atomic_output, check_target, refuse_output_over_inputs
from bora_tools.io.model_dir import INDEX_FILE, ModelDir, TensorEntry
from bora_tools.io.safetensors import ST_DTYPES, SafetensorsWriter, TensorSpec, st_dtype
from bora_tools.progress import Progress, no_progress
from bora_tools.report import Report, human_bytes, human_seconds

#: Largest |scale| accepted: beyond it the update alone decides every merged value (or overflows float32).
MAX_SCALE = 1e9

# -- the streaming pipeline ------------------------------------------------

@dataclass
class MergeReport(Report):
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
    adapters: int = 1
    method: str = "linear"
    weights: list[float] = field(default_factory=lambda: [1.0])
    recipe: dict | None = None  # several adapters or a task method: what config.json and README.md record
    module_bytes: int = 0  # task methods: dense working memory of the largest module (the bound of the merge)

    def to_text(self) -> str:
        update = "W + dW" if self.scale == 1 else f"W + {self.scale:g} * dW"
        if self.adapters > 1 or self.method != "linear":
            update = f"W + {self.method} merge of {self.adapters} adapter(s), weights " + \
                ", ".join(f"{w * self.scale:g}" for w in self.weights)
        parts = [f"{self.merged} weights merged ({update}, computed in float32 on {self.device})"]
        if self.replaced:
            parts.append(f"{self.replaced} replaced whole (modules_to_save)")
        if self.copied:
            parts.append(f"{self.copied} copied unchanged")
        if self.converted:
            parts.append(f"{self.converted} cast to {self.dtype}")
        others = f", {len(self.other_files)} other file(s) such as config and tokenizer" if self.other_files else ""
        lines = ["  " + ", ".join(parts)]
        if self.module_bytes:
            lines.append(f"  largest module's dense working memory: {human_bytes(self.module_bytes)}")
        if self.recipe is not None:
            lines.append("  the recipe is recorded in config.json (bora_tools_recipe) and README.md")
        return "\n".join([
            *lines,
            f"wrote {self.out}: a complete model folder ({self.shards} weight file(s), "
            f"{human_bytes(self.bytes_written)}{others}) in {human_seconds(self.seconds)}"])


@dataclass(frozen=True)
class _Job:
    """One output tensor: where it comes from and what happens to it."""

    entry: TensorEntry
    spec: TensorSpec
    replacement: Replacement | None

    @property
    def kind(self) -> str:
        if isinstance(self.replacement, (BoraModule, WeightedSum, TaskUpdate)):
            return "merged"
        if self.replacement is not None:
            return "replaced"
        return "copied" if self.spec.dtype == self.entry.dtype else "converted"

    @property
    def spec_torch_dtype(self) -> torch.dtype:
        return ST_DTYPES[self.spec.dtype][1]


@dataclass(frozen=True)
class TaskUpdate:
    """A module merged by a task method (ties, dare_*, magnitude_prune): computed whole when written."""

    terms: WeightedSum
    densities: tuple[float, ...]
    method: str
    seed: int


def merge_adapter(adapter: str | Path | Sequence[str | Path], base: str | Path | None, out: str | Path, *,
                  dtype: str = "auto", scale: float = 1.0, device: str = "auto", overwrite: bool = False,
                  progress: Progress = no_progress, base_name: str | None = None,
                  weights: Sequence[float] | None = None, method: str = "linear",
                  density: float | Sequence[float] | None = None, seed: int = 0,
                  sources: Sequence[dict] | None = None, token: str | None = None) -> MergeReport:
    """Merge one or several BoRA (or PEFT LoRA) adapters into their base model, writing a model directory ``out``.

    Every shard keeps its name and its tensors; adapted weights become
    ``W + scale * dW`` (float32 on ``device``, rounded once to the output dtype),
    ``modules_to_save`` tensors replace theirs, everything else is copied as
    raw bytes (or cast, when ``dtype`` asks for another float dtype). Nothing
    is written before every check passed; ``out`` appears only when complete.

    ``adapter`` and ``base`` may be Hub ids (``owner/name[@revision]``, read with ``token``); ``base``
    None is the base the adapter records (``base_model_name_or_path``). ``base_name`` (default: the Hub
    id the base came from) is recorded as ``_name_or_path`` in the output's ``config.json``, where
    ``push`` and transformers look for the base model's name.

    Several adapters (a list; a LoRA counts as a BoRA with ``b = 1``, ``sigma = 1``) give
    ``W + scale * sum_k weights[k] * dW_k``: ``method`` ``linear`` streams rows like one adapter; ``ties``,
    ``dare_linear``, ``dare_ties`` and ``magnitude_prune`` (``density``, one value or one per adapter;
    ``seed`` for the DARE draws) compute each module's update whole (docs/cli.md). Then ``config.json``
    (``bora_tools_recipe``) and ``README.md`` record the recipe; ``sources`` (one ``{"adapter": name,
    "revision": commit}`` per adapter) names the adapters there (default: their paths).

    Example::

        report = merge_adapter("my-adapter", "base-model", "merged", dtype="bfloat16")
        merge_adapter("someone/my-bora", None, "merged")   # from the Hub, onto the base it records
        report.merged   # number of weights that received their update
        merge_adapter(["task", "style"], "base-model", "merged2", weights=[1.0, -0.5])

    Raises:
        ConfigError, CheckpointError: the adapter is unreadable or inconsistent.
        ModelDirError, UnsafePathError: the base directory is incomplete or unsafe.
        ShapeError, UnsupportedError: the adapter does not fit the base.
        OutputExistsError, OutputWriteError: ``out`` exists, or writing failed.
    """
    started = time.perf_counter()
    out = Path(out)
    dtype = dtype_name(dtype, allow_auto=True)
    out_dtype = parse_dtype(dtype, allow_auto=True)
    if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
        raise ValidationError(f"`scale` {scale}: expected a finite number of magnitude at most {MAX_SCALE:g}")
    given = [adapter] if isinstance(adapter, (str, Path)) else list(adapter)
    if not given:
        raise ValidationError("`adapter`: give at least one adapter")
    factors = parse_weights(weights, len(given))
    densities = check_method(method, [density] if isinstance(density, (int, float)) else density, len(given))
    several = len(given) > 1 or method != "linear"
    dev = resolve_device(device)
    check_target(out, overwrite=overwrite)
    paths, base, found_name = resolve_merge_inputs(given, base, token=token)
    base_name = base_name or found_name
    with one_cpu_thread(dev):
        adapters = [read_adapter(p) for p in paths]
        model = ModelDir.open(base)
        refuse_output_over_inputs(out, model.path, *paths)
        plans = [merge_plan(a, model) for a in adapters]  # every input against the base, before anything is written
        # One adapter without weights is the merge of one adapter, byte for byte.
        plan = plans[0] if not several and weights is None else \
            _sum_plan(adapters, factors, paths, method, densities, seed)
        shards = {shard: _jobs(model, shard, plan, out_dtype) for shard in model.shard_names}
        report = MergeReport(out=out, device=str(dev), dtype=dtype, scale=scale, shards=len(shards), merged=0,
                             replaced=0, copied=0, converted=0, bytes_written=0, adapters=len(paths),
                             method=method, weights=factors)
        if several:
            names = [(s or {}).get("adapter") or str(p) for s, p in zip(sources or [None] * len(paths), paths)]
            revs = [(s or {}).get("revision") for s in (sources or [None] * len(paths))]
            report.recipe = recipe(command="merge", names=names, revisions=revs,
                                   kinds=["lora" if is_lora(a) else "bora" for a in adapters], weights=factors,
                                   method=method, densities=densities, seed=seed, scale=scale, base=base_name)
            report.module_bytes = max((working_bytes(j.replacement.terms.shape, len(j.replacement.terms.terms))
                                       for jobs in shards.values() for j in jobs
                                       if isinstance(j.replacement, TaskUpdate)), default=0)
        _write_output(model, shards, report, overwrite=overwrite, fan_in_fan_out=adapters[0].config.fan_in_fan_out,
                      out_dtype=out_dtype, device=dev, progress=progress, base_name=base_name)
    report.seconds = time.perf_counter() - started
    return report


def resolve_merge_inputs(adapter: str | Path | Sequence[str | Path], base: str | Path | None, *,
                         token: str | None = None) -> tuple[list[Path], Path, str | None]:
    """The local folders of the adapters and their base (Hub ids downloaded; no ``base``: the one the first
    adapter records), and the base's Hub id when it has one (never a cache folder's hash)."""
    from bora_tools.io.hub_input import hub_id_of, hub_or_local, recorded_base

    given = [adapter] if isinstance(adapter, (str, Path)) else list(adapter)
    found = [hub_or_local(a, kind="adapter", token=token).path for a in given]
    found_base = hub_or_local(recorded_base(found[0]) if base is None else base, kind="model", token=token)
    return found, found_base.path, found_base.repo_id or hub_id_of(found_base.path)


def _sum_plan(adapters: list, weights: list[float], paths: list[Path],
              method: str, densities: list[float], seed: int) -> dict[str, Replacement]:
    """One plan for several adapters: a ``WeightedSum`` (linear) or ``TaskUpdate`` per adapted weight."""
    inputs = Inputs(adapters, weights, [str(p) for p in paths])
    plan: dict[str, Replacement] = {}
    for name, terms in inputs.terms().items():  # the terms of the adapters that adapt it, in their order
        plan[name + ".weight"] = WeightedSum(tuple(terms)) if method == "linear" else TaskUpdate(
            WeightedSum(tuple(terms)), tuple(d for a, d in zip(adapters, densities) if name in a.modules), method,
            seed)
    plan.update(inputs.saved)
    return plan


def _write_output(model: ModelDir, shards: dict[str, list[_Job]], report: MergeReport, *, overwrite: bool,
                  fan_in_fan_out: bool, out_dtype: torch.dtype | None, device: torch.device,
                  progress: Progress, base_name: str | None = None) -> None:
    """Every shard, the other files and the index into a temporary sibling, renamed when complete."""
    total = sum(len(jobs) for jobs in shards.values())
    ticks = iter(progress(range(total), total=total, label="merging"))
    with atomic_output(report.out, overwrite=overwrite, directory=True) as tmp:
        for shard, jobs in shards.items():
            meta = model.headers[shard].metadata
            _write_shard(
                tmp / shard,
                jobs,
                metadata=meta if meta is not None else {"format": "pt"},
                fan_in_fan_out=fan_in_fan_out,
                scale=report.scale,
                device=device,
                ticks=ticks,
            )
            for job in jobs:
                setattr(report, job.kind, getattr(report, job.kind) + 1)
            report.bytes_written += (tmp / shard).stat().st_size
        report.other_files = _copy_other_files(model, tmp, dtype=out_dtype, base_name=base_name)
        if report.recipe is not None:
            _record_recipe(tmp, report.recipe, base_name=base_name)
        if model.index is not None:
            _write_index(model, tmp, shards)
    for _ in ticks:  # finish the bar
        pass


def _jobs(model: ModelDir, shard: str, plan: dict[str, Replacement], out_dtype: torch.dtype | None) -> list[_Job]:
    jobs = []
    for entry in model.shard_entries(shard):
        cast = out_dtype is not None and entry.torch_dtype in MERGEABLE_DTYPES
        spec = TensorSpec(entry.name, st_dtype(out_dtype) if cast else entry.dtype, entry.shape)
        jobs.append(_Job(entry, spec, plan.get(entry.name)))
    # The base's own order, except that wider dtypes come first when a cast
    # changed sizes: safetensors orders them so, which keeps every tensor's
    # data aligned to its element size. A no-op for files safetensors wrote.
    jobs.sort(key=lambda j: -ST_DTYPES[j.spec.dtype][0])
    return jobs


def _write_shard(
    path: Path,
    jobs: list[_Job],
    *,
    metadata: dict,
    fan_in_fan_out: bool,
    scale: float,
    device: torch.device,
    ticks: Iterator,
) -> None:
    src = jobs[0].entry.shard if jobs else None
    fd = os.open(src, os.O_RDONLY) if src else -1
    try:
        with SafetensorsWriter(path, [j.spec for j in jobs], metadata=metadata, background=True) as writer:
            for job in jobs:
                if job.kind == "copied":
                    writer.copy_range(job.spec.name, fd, job.entry.start, job.entry.nbytes)
                elif job.kind == "merged":
                    _write_merged(writer, job, fan_in_fan_out=fan_in_fan_out, scale=scale, device=device)
                elif job.kind == "replaced":
                    new = cast_finite(job.replacement, job.spec_torch_dtype, job.spec.name)
                    writer.write(job.spec.name, new.reshape(job.spec.shape))
                else:
                    _write_converted(writer, fd, job)
                next(ticks, None)
    finally:
        if fd >= 0:
            os.close(fd)


def _write_merged(writer: SafetensorsWriter, job: _Job, *, fan_in_fan_out: bool, scale: float,
                  device: torch.device) -> None:
    # float32 work, float64 for a float64 base: never rounded below the base's own precision.
    acc = torch.float64 if job.entry.torch_dtype == torch.float64 else torch.float32
    if isinstance(job.replacement, TaskUpdate):
        blocks = _task_rows(job, fan_in_fan_out=fan_in_fan_out, scale=scale, device=device, dtype=acc)
    else:
        blocks = stream_rows(job.entry, job.replacement, fan_in_fan_out=fan_in_fan_out, scale=scale,
                             device=device, dtype=acc)
    # Two rounded outputs reused in turn, so that the writer thread saves one while the next is merged.
    # Pinned host memory lets the GPU copies run at full speed.
    ring: list[torch.Tensor] = []
    busy: list[Future | None] = [None, None]
    with contextlib.closing(blocks):
        for n, merged in enumerate(blocks):
            if not ring:  # the first block is the largest
                ring = [torch.empty(merged.shape, dtype=job.spec_torch_dtype, pin_memory=device.type == "cuda")
                        for _ in range(2)]
            slot = n % 2
            if busy[slot] is not None:
                busy[slot].result()  # the writer is done with this buffer
            busy[slot] = writer.write(job.spec.name, _round(merged, ring[slot][:merged.shape[0]], job.spec.name))


def _task_rows(job: _Job, *, fan_in_fan_out: bool, scale: float, device: torch.device,
               dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """``W + scale * update`` a block of stored rows at a time, the update of a task method computed whole."""
    task: TaskUpdate = job.replacement
    update = module_update(task.terms.terms, task.densities, task.method, fan_in_fan_out=fan_in_fan_out,
                           seed=task.seed, dtype=dtype, device=device)
    if scale != 1.0:
        update.mul_(scale)
    start = 0
    with contextlib.closing(stream_rows(job.entry, device=device)) as raw:
        for block in raw:
            stop = start + block.shape[0]
            work = block.to(device=device, dtype=dtype, copy=True).add_(update[start:stop])
            check_finite_update(work, block, "base_model.model." + task.terms.name, cause=f"{task.method} merge")
            yield work
            start = stop


def _record_recipe(tmp: Path, rec: dict, *, base_name: str | None) -> None:
    """The recipe in config.json (``bora_tools_recipe``) and a README.md that states it."""
    config = json.loads((tmp / "config.json").read_text())
    config["bora_tools_recipe"] = rec
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (tmp / "README.md").write_text(recipe_card(rec, base_model=base_name))


def _round(merged: torch.Tensor, out: torch.Tensor, name: str) -> torch.Tensor:
    """The one rounding of merged rows, into ``out``.

    On the CPU straight into it (no temporary, no second copy); on a GPU it happens there, so half
    the bytes come back.
    """
    if merged.device.type == "cpu":
        return cast_finite(merged, out.dtype, name, out=out)
    return out.copy_(cast_finite(merged, out.dtype, name))


def _write_converted(writer: SafetensorsWriter, fd: int, job: _Job) -> None:
    """Cast an untouched float tensor to the output dtype, a chunk of elements at a time."""
    entry, size = job.entry, ST_DTYPES[job.entry.dtype][0]
    step = chunk_elements() * size
    buf = bytearray(min(step, entry.nbytes))
    for offset in range(0, entry.nbytes, step):
        view = memoryview(buf)[: min(step, entry.nbytes - offset)]
        if os.preadv(fd, [view], entry.start + offset) != view.nbytes:
            raise ModelDirError(f"{entry.shard}: truncated: tensor {entry.name} ends early")
        writer.write(
            job.spec.name,
            cast_finite(torch.frombuffer(view, dtype=entry.torch_dtype), job.spec_torch_dtype, entry.name),
        )


def _copy_other_files(model: ModelDir, tmp: Path, *, dtype: torch.dtype | None,
                      base_name: str | None = None) -> list[str]:
    """Copy config, tokenizer and every other file; record a changed dtype (and the base's Hub id) in config.json."""
    names = []
    for path in model.other_files():
        shutil.copyfile(path, tmp / path.name)
        names.append(path.name)
    if base_name is not None and dtype is None:
        config = dict(model.config, _name_or_path=base_name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if dtype is not None:
        config = dict(model.config, **({"_name_or_path": base_name} if base_name else {}))
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
