"""``bora-tools inspect``: what an adapter holds, from its factors alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bora_tools.core.adapter import load_adapter
from bora_tools.core.devices import one_cpu_thread
from bora_tools.core.factors import gram_svd
from bora_tools.progress import Progress, no_progress
from bora_tools.report import Report


@dataclass
class InspectReport(Report):
    """What ``inspect_adapter`` found: the config, one row per module, the ``modules_to_save`` tensors."""

    path: str
    peft_type: str
    r: int
    bora_blocks: int
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    target_modules: list[str] | str | None
    rank_pattern: dict[str, Any]
    alpha_pattern: dict[str, Any]
    modules_to_save: list[str] | None
    base_model_name_or_path: str | None
    num_modules: int
    total_parameters: int
    saved_parameters: int
    modules: list[dict[str, Any]]  # name, shape, dtype, r, b, alpha, scaling, parameters, max_rank, rank, ...
    saved: list[dict[str, Any]]  # key, shape, parameters

    def to_text(self) -> str:
        """A human-readable table (what ``bora-tools inspect`` prints)."""
        return _table(self.to_dict())


def inspect_adapter(path: str | Path, *, device: torch.device | str = "cpu",
                    progress: Progress = no_progress, token: str | None = None) -> InspectReport:
    """Describe the adapter at ``path`` (a folder, or a Hub id ``owner/name[@revision]`` read with ``token``).

    Per module: shape ``(m, n)``, ``b``, ``r``, scaling, trainable parameters
    (``r*(m+n) + b*b*r``), the numerical rank of ``dW`` and its Frobenius
    norm (from the factored spectrum; no ``m x n`` matrix is formed), and
    norms and range of ``sigma``.

    Example::

        report = inspect_adapter("out/my-adapter")
        report.total_parameters, report.modules[0]["rank"]
        print(report)              # the table ``bora-tools inspect`` prints
    """
    with one_cpu_thread(device):  # many small products: see devices.one_cpu_thread
        adapter = load_adapter(path, token=token)
        modules = [_describe(mod, adapter.config.alpha_for(mod.name), device)
                   for mod in progress(list(adapter.modules.values()), label="inspecting")]
    cfg = adapter.config
    saved = [{"key": k, "shape": list(t.shape), "parameters": t.numel()} for k, t in adapter.saved.items()]
    return InspectReport(
        path=str(path), peft_type=cfg.peft_type, r=cfg.r, bora_blocks=cfg.bora_blocks,
        lora_alpha=cfg.lora_alpha, use_rslora=cfg.use_rslora, fan_in_fan_out=cfg.fan_in_fan_out,
        target_modules=cfg.target_modules, rank_pattern=cfg.rank_pattern, alpha_pattern=cfg.alpha_pattern,
        modules_to_save=cfg.modules_to_save, base_model_name_or_path=cfg.base_model_name_or_path,
        num_modules=len(modules), total_parameters=sum(m["parameters"] for m in modules),
        saved_parameters=sum(s["parameters"] for s in saved), modules=modules, saved=saved,
    )


def _describe(mod, alpha: float, device: torch.device | str) -> dict[str, Any]:
    """One module's figures; the spectrum comes from the factors' Gram matrices (no singular vectors)."""
    A, B, sigma = (t.to(device) for t in (mod.A, mod.B, mod.sigma))
    svd = gram_svd(A, B, sigma, mod.scaling, vectors=0)
    s = sigma.double()
    m, n = mod.shape
    return {
        "name": mod.name, "shape": [m, n], "dtype": str(mod.A.dtype).replace("torch.", ""),
        "r": mod.r, "b": mod.b, "alpha": alpha, "scaling": mod.scaling,
        "parameters": mod.num_parameters, "max_rank": min(mod.b * mod.r, m, n), "rank": svd.rank(),
        "delta_norm": float(svd.energy.sqrt()),
        "sigma": {"norm": float(s.norm()), "min": float(s.min()), "max": float(s.max()), "mean": float(s.mean())},
    }


def _table(report: dict[str, Any]) -> str:
    """The per-module table first, then the summary (the last lines stay on screen)."""
    lines = []
    width = max([len(m["name"]) for m in report["modules"]] + [6])
    lines.append(f"  {'module':<{width}}  {'shape':>11}  {'b':>2} {'r':>3} {'scale':>7} {'params':>9} "
                 f"{'rank':>9} {'|dW|':>9} {'sigma min..max':>17} {'|sigma|':>8}")
    for m in report["modules"]:
        shape = f"{m['shape'][0]}x{m['shape'][1]}"
        rank = f"{m['rank']}/{m['max_rank']}"
        sig = m["sigma"]
        lines.append(f"  {m['name']:<{width}}  {shape:>11}  {m['b']:>2} {m['r']:>3} {m['scaling']:>7.4g} "
                     f"{m['parameters']:>9,} {rank:>9} {m['delta_norm']:>9.4g} "
                     f"{sig['min']:>8.3g}..{sig['max']:<7.3g} {sig['norm']:>8.4g}")
    for s in report["saved"]:
        lines.append(f"  saved whole: {s['key']} {tuple(s['shape'])} ({s['parameters']:,} parameters)")
    if report["modules"]:
        lines.append("  (rank: rank of the module's update dW, out of the most b*r allows; |dW|: its Frobenius "
                     "norm; scale: the scaling s in W + s*dW)")
    lines += [
        f"BoRA adapter {report['path']}: {report['num_modules']} modules, "
        f"{report['total_parameters']:,} trainable parameters"
        + (f" (+{report['saved_parameters']:,} in modules_to_save)" if report["saved"] else ""),
        f"  b={report['bora_blocks']} blocks, r={report['r']}, lora_alpha={report['lora_alpha']:g}"
        + (", rsLoRA scaling" if report["use_rslora"] else "")
        + (", fan_in_fan_out (GPT-2 Conv1D weights)" if report["fan_in_fan_out"] else ""),
        f"  base model: {report['base_model_name_or_path'] or '(not recorded)'}",
    ]
    return "\n".join(lines)
