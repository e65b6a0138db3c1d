"""A BoRA adapter as a llama.cpp LoRA adapter GGUF (``general.type = adapter``).

Each module becomes ``<gguf tensor>.lora_a`` ``(k, n)`` and ``.lora_b``
``(m, k)``: the exact LoRA form (``k = b*r``, no loss) or the best rank-``k``
truncation, found from the factors without forming ``dW`` (``bora_tools.core.factors``).

llama.cpp scales every pair by ``adapter.lora.alpha / k`` (one alpha for the
whole file, ``k`` read from the tensor). A BoRA adapter's scaling differs per
module (``rank_pattern``, ``alpha_pattern``, rsLoRA), so each module's own
factor is folded into its ``lora_b``: ``lora_b = s * B' * k / alpha``, which
makes llama.cpp apply exactly ``s * B' @ A'``. With ``alpha`` the largest
``k`` the fold is ``s`` itself whenever all modules share one rank. (llama.cpp's
own ``convert_lora_to_gguf.py`` writes the global ``lora_alpha`` and ignores
``alpha_pattern``.)

The llama q/k row permutation applies to ``lora_b`` (it indexes output rows),
never to ``lora_a``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import torch

from bora_tools.core.adapter import PREFIX, BoraModule, check_against_base, load_adapter
from bora_tools.core.devices import one_cpu_thread, resolve_device
from bora_tools.core.dtypes import cast_finite
from bora_tools.core.lowrank import (
    ZERO_NOTE,
    RankPolicy,
    balanced_exact_factors,
    convert_module,
    update_rank,
    zero_factors,
)
from bora_tools.errors import UnsupportedError, ValidationError, raise_if_problems
from bora_tools.gguf.architectures import family_for, qk_heads, qk_row_order
from bora_tools.gguf.outtypes import WRITER_OUTTYPES
from bora_tools.gguf.report import ExportReport
from bora_tools.gguf.shapes import check_base_tensors
from bora_tools.gguf.writer import (
    PlannedTensor,
    add_general,
    add_provenance,
    hub_name,
    tensor_report,
    tensor_type,
    write_streaming,
)
from bora_tools.io.atomic import atomic_output, check_target
from bora_tools.io.hub_input import hub_id_of
from bora_tools.io.model_dir import ModelDir
from bora_tools.progress import Progress, no_progress

Factors = Callable[[], tuple[torch.Tensor, torch.Tensor]]  # () -> (B_k (m, k), A_k (k, n)), scaling included


def write_lora(adapter_dir: Path, base_dir: Path, out: Path, *, rank: int | str = "full", outtype: str = "f16",
               overwrite: bool = False, device: str | torch.device = "auto", progress: Progress = no_progress,
               name: str | None = None) -> ExportReport:
    """Write the adapter at ``adapter_dir`` as a llama.cpp LoRA GGUF for the model at ``base_dir``.

    The writer of ``export_gguf(adapter, out, base=...)``, which has checked the common options and
    that ``out`` is none of the inputs. ``device`` runs the per-module work (truncated SVD, exact
    factors) there; on the CPU it runs on one thread, which is faster for these small operations.

    Example::

        write_lora(Path("my-adapter"), Path("models/tiny-llama"), Path("lora.gguf"), rank="full")
        # llama.cpp: Llama("base.gguf", lora_path="lora.gguf") gives the merged model's logits

    Raises:
        ValidationError: an ``outtype`` other than f32, f16, bf16 and q8_0 (LoRA factors are not quantized).
        UnsupportedError: ``modules_to_save`` or ``fan_in_fan_out`` (no LoRA form
            in llama.cpp), a module llama.cpp has no tensor for, or an unsupported base.
        ShapeError: the adapter does not fit the base model.
    """
    _check_outtype(outtype)
    check_target(out, overwrite=overwrite)
    adapter = load_adapter(adapter_dir)
    base = ModelDir.open(base_dir)
    config_path = str(base.path / "config.json")
    family = family_for(base.architecture, source=config_path)
    hp = family.read_hparams(base.config, source=config_path)
    check_base_tensors(base, family, hp)  # the base GGUF this LoRA applies to must load in llama.cpp too
    names = _check(adapter, base, family, n_layer=hp.n_layer)
    dev = resolve_device(device) if isinstance(device, str) else device
    with one_cpu_thread(dev):
        modules = list(adapter.modules.values())
        prepared = {m.name: _factors(m, rank, dev) for m in progress(modules, total=len(modules),
                                                                     label="converting to LoRA")}
        alpha = float(max(p.rank for p in prepared.values()))
        plan, rows = _plan(modules, prepared, names, alpha=alpha, outtype=outtype,
                           heads_of=lambda g: qk_heads(g, hp) if family.permute_qk else None)
        writer = gguf.GGUFWriter(None, family.name)
        add_general(writer, kind=gguf.GGUFType.ADAPTER, name=name or hub_name(adapter_dir), outtype=outtype)
        if hub_id_of(base_dir) is not None:  # the model it applies to, by its Hub id
            add_provenance(writer, bases=[base_dir], source=adapter_dir)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        with atomic_output(out, overwrite=overwrite) as tmp:
            write_streaming(writer, tmp, plan, progress=progress, label="writing GGUF LoRA")
    notes = [f"{r['module']}: {r['note']}" for r in rows if r["note"]]
    return ExportReport(kind="lora", out=str(out), architecture=family.name, hf_architecture=base.architecture,
                        outtype=outtype, **tensor_report(plan), bytes=out.stat().st_size, alpha=alpha, rank=rank,
                        modules=rows, adapter=str(adapter_dir), notes=notes, warnings=[])


def _check_outtype(outtype: str) -> None:
    """A LoRA GGUF holds f32, f16, bf16 or q8_0 factors: what llama.cpp's tools write and apply.

    Raises:
        ValidationError: any other ``outtype`` (k-quants, legacy quants), saying why.
    """
    if outtype not in WRITER_OUTTYPES:
        raise ValidationError(
            f"`outtype` {outtype}: a GGUF LoRA adapter is written as {', '.join(WRITER_OUTTYPES)}; llama.cpp "
            "adds the adapter's low-rank product to the base weights at run time, and its quantizer makes "
            "k-quants and legacy quants only for full models",
            hint="quantize the base GGUF instead, or export the merged model with `merge`")


def _plan(modules, prepared: dict, names: dict[str, str], *, alpha: float, outtype: str,
          heads_of: Callable[[str], int | None]) -> tuple[list[PlannedTensor], list[dict[str, Any]]]:
    """The ``lora_a`` / ``lora_b`` pair of every module (in that order, as llama.cpp's tools expect) and report rows."""
    plan: list[PlannedTensor] = []
    rows = []
    for mod in modules:
        prep = prepared[mod.name]
        k, gname = prep.rank, names[mod.name]
        pair = _Pair(prep.factors, fold=k / alpha, heads=heads_of(gname))
        (m, n) = mod.shape
        for suffix, shape, load in ((".lora_a", (k, n), pair.a), (".lora_b", (m, k), pair.b)):
            qtype, fallback = tensor_type(gname + suffix, shape, outtype)
            plan.append(PlannedTensor(gname + suffix, shape, qtype, lambda f=load: iter((f(),)),
                                      source=PREFIX + mod.name, fallback=fallback))
        rows.append({"module": mod.name, "gguf_name": gname, "rank": k, "max_rank": mod.b * mod.r,
                     "scaling": mod.scaling, "relative_error": prep.rel_error, "note": prep.note})
    return plan, rows


def _check(adapter, base: ModelDir, family, *, n_layer: int) -> dict[str, str]:
    """The GGUF base tensor of every module; refuses what a llama.cpp LoRA cannot express."""
    source = str(adapter.path or "adapter")
    if adapter.config.fan_in_fan_out:
        raise UnsupportedError(f"{source}: fan_in_fan_out adapters (GPT-2 Conv1D) have no GGUF export")
    if adapter.saved:
        keys = ", ".join(PREFIX + k for k in sorted(adapter.saved))
        raise UnsupportedError(f"{source}: modules_to_save tensors ({keys}) cannot be expressed in a llama.cpp LoRA",
                               hint="export the merged model instead with `merge`")
    check_against_base(adapter, base.shape_of, source=source)
    tmap = gguf.get_tensor_name_map(family.arch, n_layer)
    names, problems = {}, []
    for name in adapter.modules:
        gname = tmap.get_name(name + ".weight", try_suffixes=(".weight",))
        if gname is None:
            hint = " (export the merged model with `merge` instead)" if ".experts." in name else ""
            problems.append(f"{PREFIX + name}: llama.cpp's {family.name} graph has no tensor for {name}.weight{hint}")
        else:
            names[name] = gname
    raise_if_problems(source, problems, cls=UnsupportedError)
    return names


@dataclass(frozen=True)
class _Prepared:
    """One module's LoRA form: its rank, relative error, a note (zero update, capped rank) and its factors."""

    rank: int
    rel_error: float
    note: str | None
    factors: Factors


def _factors(mod: BoraModule, rank: int | str, device: torch.device) -> _Prepared:
    """One module's LoRA form, computed as ``to-lora`` computes it (on ``device``).

    The exact form (balanced, scaling folded) is built only when written; a
    truncation keeps the best rank-``K`` factors, ``K`` capped at the update's
    rank. A zero update is rank 1 with zero factors in both cases, as in
    ``to-lora``, and says so in its note.
    """
    m, n = mod.shape
    if rank == "full":
        # Singular values only (no vectors): whether the update is zero, by to-lora's own test.
        if update_rank(mod, device=device) == 0:
            return _Prepared(1, 0.0, ZERO_NOTE, lambda: zero_factors(m, n, torch.float32))

        def exact() -> tuple[torch.Tensor, torch.Tensor]:
            b_full, a_full = balanced_exact_factors(*(t.to(device) for t in (mod.A, mod.B, mod.sigma)), mod.scaling)
            key = PREFIX + mod.name
            return (cast_finite(b_full.cpu(), torch.float32, key + ".lora_B", strict=True),
                    cast_finite(a_full.cpu(), torch.float32, key + ".lora_A", strict=True))
        return _Prepared(mod.b * mod.r, 0.0, None, exact)
    b_k, a_k, result = convert_module(mod, RankPolicy.parse(rank=int(rank)), device=device)
    return _Prepared(result.rank, result.rel_error, result.note, lambda: (b_k, a_k))


class _Pair:
    """Produces a module's ``lora_a`` and ``lora_b`` one at a time (B folded and permuted).

    The factors are built once: ``a()`` (written first) builds and keeps them,
    ``b()`` uses and releases them, so at most one module's pair is in memory.
    """

    def __init__(self, factors: Factors, *, fold: float, heads: int | None):
        self.factors, self.fold, self.heads = factors, fold, heads
        self._kept: tuple[torch.Tensor, torch.Tensor] | None = None

    def a(self) -> torch.Tensor:
        self._kept = self.factors()
        return self._kept[1]

    def b(self) -> torch.Tensor:
        kept, self._kept = self._kept or self.factors(), None
        b = kept[0] * self.fold
        if self.heads is not None:
            b = b[qk_row_order(b.shape[0], self.heads)]
        return b
