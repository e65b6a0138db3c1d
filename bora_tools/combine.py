"""``combine``: several adapters as one, the exact weighted sum as BoRA or a PEFT LoRA (exact or truncated).

Per module the sum ``sum_k w_k * dW_k`` of the adapters that adapt it (core.adapter_sum):

- ``to="bora"``: one BoRA module, exactly: factors concatenated along ``r``, ``w_k * s_k`` folded into
  ``sigma``, coarser block grids refined to the finest (every ``b`` must divide it); per-module ranks in
  ``rank_pattern`` with ``alpha_pattern`` equal to them, so PEFT's scaling is 1 everywhere.
- ``to="lora"``: the inputs' exact LoRA factors stacked (rank ``sum_k b_k r_k``) and handed to the factored
  SVD of ``to-lora`` (core.lowrank): ``rank="full"`` writes them exactly; ``rank=K`` / ``energy=E`` the
  optimal truncation of the sum, never forming a dense ``dW``.

Modules adapted by only some inputs are summed over those; ``modules_to_save`` tensors are carried whole
(unweighted) and must be identical where several inputs hold one; ``target_modules`` is kept when every
input has the same, and otherwise becomes the list of adapted modules.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bora_tools.core.adapter import PREFIX, SUFFIX_A, SUFFIX_B, WEIGHTS_NAME, BoraAdapter, save_adapter
from bora_tools.core.adapter_sum import Inputs, bora_sum, common_blocks, lora_stack, parse_weights
from bora_tools.core.config import CONFIG_NAME, BoraConfig, pattern_keys
from bora_tools.core.devices import one_cpu_thread, resolve_device
from bora_tools.core.dtypes import dtype_name, parse_dtype
from bora_tools.core.factors import block_problems
from bora_tools.core.lora_input import is_lora, read_adapter
from bora_tools.core.lowrank import ModuleResult, RankPolicy, convert_module
from bora_tools.errors import UnsupportedError, ValidationError, raise_if_problems
from bora_tools.io.atomic import atomic_output, check_target, refuse_output_over_inputs
from bora_tools.progress import Progress, no_progress
from bora_tools.report import Report

TARGETS = ("bora", "lora")


@dataclass
class CombineReport(Report):
    """What ``combine_adapters`` wrote: the form, the weights and per module its rank (and, for LoRA, error)."""

    out: str
    to: str
    adapters: list[str]
    weights: list[float]
    policy: dict[str, Any] | None  # --to lora: {"rank": K | "full" | None, "energy": F | None}
    bora_blocks: int | None  # --to bora: the common block grid
    ranks: dict[str, int]  # per module: the rank written
    modules: list[ModuleResult] = field(default_factory=list)  # --to lora: as to-lora reports them
    saved: list[str] = field(default_factory=list)  # modules_to_save tensors carried over

    def to_text(self) -> str:
        lines = [f"{'module':<40}  {'rank':>5}" + ("  rel.error     energy" if self.modules else "")]
        results = {m.name: m for m in self.modules}
        for name, k in self.ranks.items():
            extra = f"  {results[name].rel_error:>9.2e}  {results[name].energy:>9.6f}" if name in results else ""
            lines.append(f"{name:<40}  {k:>5}{extra}")
        weights = ", ".join(f"{w:g}" for w in self.weights)
        if self.to == "bora":
            lines.append(f"exact: the weighted sum ({weights}) of {len(self.adapters)} adapters as one BoRA adapter "
                         f"(b={self.bora_blocks}, per-module rank = the sum of the inputs' ranks)")
        else:
            worst = max(self.modules, key=lambda m: m.rel_error)
            how = "exact (--rank full)" if self.policy["rank"] == "full" else \
                f"worst relative error {worst.rel_error:.3e} ({worst.name}), the optimum of each truncation"
            lines.append(f"the weighted sum ({weights}) of {len(self.adapters)} adapters as one PEFT LoRA: {how}")
        if self.saved:
            lines.append(f"modules_to_save carried over: {', '.join(self.saved)}")
        lines.append(f"wrote {self.out}")
        return "\n".join(lines)


def combine_adapters(adapters: Sequence[str | Path], out: str | Path, *, weights: Sequence[float] | None = None,
                     to: str | None = None, rank: int | str | None = None, energy: float | None = None,
                     method: str = "linear", dtype: str = "float32", device: str = "auto", overwrite: bool = False,
                     progress: Progress = no_progress, names: Sequence[str] | None = None) -> CombineReport:
    """Write ``sum_k weights[k] * dW_k`` of ``adapters`` (BoRA or PEFT LoRA directories) as one adapter ``out``.

    ``to`` defaults to ``"bora"`` when every input is BoRA and their ``b`` divide one another, else
    ``"lora"``. With ``"lora"``, ``rank`` (K or ``"full"``, the default) and ``energy`` choose the rank as
    ``to-lora`` does. ``names`` name the adapters in the report (default: their paths).

    Example::

        combine_adapters(["task", "style"], "both", weights=[1.0, 0.5])                # exact BoRA
        combine_adapters(["a", "b", "c"], "lora-64", to="lora", rank=64)               # best rank-64 LoRA

    Raises:
        ValidationError: bad weights, ``method`` other than linear, options that do not fit ``to``.
        UnsupportedError: ``to="bora"`` with block grids that do not divide one another; a LoRA input
            that is not plain (DoRA, bias).
        ShapeError: inputs that disagree (shapes, ``fan_in_fan_out``, different ``modules_to_save``).
        OutputExistsError, OutputWriteError: ``out`` exists, or writing failed.
    """
    if method != "linear":
        raise ValidationError(f"`method` {method}: its result is not low rank, so it is no adapter",
                              hint="use merge --method to apply it to the base model")
    paths = [Path(a) for a in adapters]
    if not paths:
        raise ValidationError("`adapter`: give at least one adapter")
    factors = parse_weights(weights, len(paths))
    if to is not None and to not in TARGETS:
        raise ValidationError(f"`to`: expected bora or lora, found {to!r}")
    if to == "bora" and (rank is not None or energy is not None):
        raise ValidationError("`rank` and `energy` choose a LoRA's rank; --to bora is exact")
    torch_dtype = parse_dtype(dtype_name(dtype))
    dev = resolve_device(device)
    refuse_output_over_inputs(out, *paths)
    check_target(Path(out), overwrite=overwrite)
    with one_cpu_thread(dev):
        inputs = Inputs([read_adapter(p) for p in paths], factors, [str(n) for n in (names or paths)])
        terms = inputs.terms()
        if not terms:
            raise ValidationError("no adapted module in the inputs (only modules_to_save tensors)")
        if to is None:
            to = "bora" if not any(map(is_lora, inputs.adapters)) and _divides(inputs) else "lora"
        if to == "bora":
            report = _to_bora(inputs, terms, Path(out), torch_dtype, overwrite=overwrite)
        else:
            report = _to_lora(inputs, terms, Path(out), RankPolicy.parse(rank or ("full" if energy is None else None),
                                                                           energy),
                              torch_dtype, dev, progress, overwrite=overwrite)
    report.adapters = list(inputs.names)
    return report


def _divides(inputs: Inputs) -> bool:
    bs = {a.config.bora_blocks for a in inputs.adapters}
    return all(max(bs) % b == 0 for b in bs)


def _common_config(inputs: Inputs, ranks: dict[str, int]) -> dict[str, Any]:
    """What both output forms share: rank and alpha (equal, per module in the patterns), targets, saved modules."""
    counts = Counter(ranks.values())
    default = max(counts, key=lambda k: (counts[k], k))
    keys = pattern_keys(list(ranks))
    differing = {keys[name]: k for name, k in ranks.items() if k != default}
    targets = [a.config.target_modules for a in inputs.adapters]
    same = all(t == targets[0] for t in targets) and targets[0] is not None
    bases = {a.config.base_model_name_or_path for a in inputs.adapters}
    return {"r": default, "lora_alpha": default, "use_rslora": False, "rank_pattern": differing,
            "alpha_pattern": dict(differing), "target_modules": targets[0] if same else sorted(ranks),
            "fan_in_fan_out": inputs.fan_in_fan_out, "modules_to_save": inputs.modules_to_save(),
            "base_model_name_or_path": bases.pop() if len(bases) == 1 else None,
            "task_type": inputs.adapters[0].config.task_type}


def _to_bora(inputs: Inputs, terms: dict, out: Path, dtype: torch.dtype, *, overwrite: bool) -> CombineReport:
    b = common_blocks([t for ts in terms.values() for t in ts], name="(all modules)")
    problems = [p for name, ts in terms.items() for p in block_problems(*ts[0][0].shape, b, name=PREFIX + name)]
    raise_if_problems("--to bora", problems, cls=UnsupportedError, hint="use --to lora")
    modules = {name: bora_sum(ts, b=b, dtype=dtype) for name, ts in terms.items()}
    ranks = {name: mod.r for name, mod in modules.items()}
    config = BoraConfig(bora_blocks=b, **_common_config(inputs, ranks))
    save_adapter(BoraAdapter(config, modules, dict(inputs.saved)), out, overwrite=overwrite)
    return CombineReport(out=str(out), to="bora", adapters=[], weights=inputs.weights, policy=None,
                         bora_blocks=b, ranks=ranks, saved=sorted(inputs.saved))


def _to_lora(inputs: Inputs, terms: dict, out: Path, policy: RankPolicy, dtype: torch.dtype, device: torch.device,
             progress: Progress, *, overwrite: bool) -> CombineReport:
    tensors: dict[str, torch.Tensor] = {}
    results = []
    for name in progress(list(terms), total=len(terms), label="combining"):
        b_k, a_k, result = convert_module(lora_stack(terms[name]), policy, device=device, dtype=dtype)
        result.parameters_before = sum(mod.num_parameters for mod, _ in terms[name])
        tensors[PREFIX + name + SUFFIX_A], tensors[PREFIX + name + SUFFIX_B] = a_k, b_k
        results.append(result)
    tensors.update({PREFIX + k: v.detach().cpu().contiguous() for k, v in inputs.saved.items()})
    ranks = {r.name: r.rank for r in results}
    config = {"peft_type": "LORA", **_common_config(inputs, ranks), "bias": "none", "lora_dropout": 0.0,
              "init_lora_weights": True, "inference_mode": True}
    with atomic_output(out, overwrite=overwrite, directory=True) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    return CombineReport(out=str(out), to="lora", adapters=[], weights=inputs.weights, policy=policy.to_dict(),
                         bora_blocks=None, ranks=ranks, modules=results, saved=sorted(inputs.saved))
