"""The ``to-lora`` report: per module the rank kept, the exact error and the energy retained; totals.

The figures are exact, not estimated: the relative error of a rank-``k``
truncation is ``sqrt(sum of discarded S^2) / ||dW||_F`` from the factored SVD
(Eckart-Young), and the energy retained is ``sum(S[:k]^2) / sum(S^2)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class ModuleResult:
    """What the conversion did to one module."""

    name: str
    shape: tuple[int, int]  # (m, n) of dW
    bora_rank: int  # b*r: the rank of the exact form
    update_rank: int  # numerical rank of dW
    rank: int  # rank written
    rel_error: float  # ||dW - B_k A_k||_F / ||dW||_F (0 for the exact form and for a zero update)
    energy: float  # retained fraction of ||dW||_F^2
    parameters_before: int  # r*(m+n) + b*b*r
    parameters_after: int  # k*(m+n)
    note: str | None = None
    capped: bool = False  # fewer triplets kept than the policy asked (update rank or --rank cap)
    singular_values: torch.Tensor | None = field(default=None, repr=False)  # float64, descending

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "bora_rank": self.bora_rank,
                "update_rank": self.update_rank, "rank": self.rank, "rel_error": self.rel_error,
                "energy": self.energy, "parameters_before": self.parameters_before,
                "parameters_after": self.parameters_after, "capped": self.capped, "note": self.note}


def build_report(*, adapter: Path, out: Path, policy: dict, dtype: str, results: list[ModuleResult],
                 peft_config: dict, saved: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The JSON-ready report of a conversion (what ``--json`` prints and ``--report`` writes).

    Example::

        report["modules"][0]["rel_error"], report["totals"]["parameters_after"]
    """
    errors = [r.rel_error for r in results]
    worst = max(results, key=lambda r: r.rel_error)
    totals = {
        "modules": len(results),
        "parameters_before": sum(r.parameters_before for r in results),
        "parameters_after": sum(r.parameters_after for r in results),
        "saved_parameters": sum(t.numel() for t in saved.values()),
        "max_rel_error": worst.rel_error,
        "max_rel_error_module": worst.name,
        "mean_rel_error": sum(errors) / len(errors),
        "min_energy": min(r.energy for r in results),
        "zero_modules": sum(1 for r in results if r.update_rank == 0),
        "capped_modules": sum(1 for r in results if r.capped),
    }
    return {
        "adapter": str(adapter),
        "out": str(out),
        "policy": policy,
        "dtype": dtype,
        "peft": {"r": peft_config["r"], "lora_alpha": peft_config["lora_alpha"],
                 "rank_pattern_entries": len(peft_config["rank_pattern"]), "use_rslora": peft_config["use_rslora"]},
        "modules": [r.to_dict() for r in results],
        "totals": totals,
    }


def format_report(report: dict[str, Any]) -> str:
    """A short table for the terminal: one row per module, then the totals.

    Example::

        print(format_report(to_lora("my-bora", "my-lora", rank=8)))
    """
    mods = report["modules"]
    width = max(len("module"), *(len(m["name"]) for m in mods))
    lines = [f"{'module':<{width}}  {'shape':>11}  {'kept':>4}  {'update':>6}  {'rel.error':>9}  {'energy':>9}  note"]
    for m in mods:
        shape = f"{m['shape'][0]}x{m['shape'][1]}"
        lines.append(f"{m['name']:<{width}}  {shape:>11}  {m['rank']:>4}  {m['update_rank']:>6}  "
                     f"{m['rel_error']:>9.2e}  {m['energy']:>9.6f}  {m['note'] or ''}".rstrip())
    t, peft = report["totals"], report["peft"]
    before, after = t["parameters_before"], t["parameters_after"]
    lines += [
        "",
        f"modules: {t['modules']} ({t['zero_modules']} zero, {t['capped_modules']} capped); "
        f"policy {policy_text(report['policy'])}; dtype {report['dtype']}",
        f"parameters: {before:,} (BoRA) -> {after:,} (LoRA, {after / max(before, 1):.2f}x)"
        + (f"; modules_to_save: {t['saved_parameters']:,} copied" if t["saved_parameters"] else ""),
        f"relative Frobenius error: worst {t['max_rel_error']:.3e} ({t['max_rel_error_module']}), "
        f"mean {t['mean_rel_error']:.3e}; energy retained >= {t['min_energy']:.6f}",
        f"wrote {report['out']} (PEFT LoRA: r={peft['r']}, lora_alpha={peft['lora_alpha']}, "
        f"{peft['rank_pattern_entries']} rank_pattern/alpha_pattern entries, scaling 1)",
    ]
    return "\n".join(lines)


def policy_text(policy: dict) -> str:
    """The policy as the options that chose it, e.g. ``--energy 0.9 --rank 8``."""
    if policy["rank"] == "full":
        return "--rank full (exact factors)"
    parts = ([f"--energy {policy['energy']:g}"] if policy["energy"] is not None else []) + \
            ([f"--rank {policy['rank']}"] if policy["rank"] is not None else [])
    return " ".join(parts)
