"""``VerifyReport``: per prompt and overall, how close the output came to the reference, and the verdict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bora_tools.errors import BoraError
from bora_tools.report import Report
from bora_tools.verification.measures import Tolerance, kl_divergence, measure


class VerificationFailed(BoraError):
    """The output is outside its tolerance (the CLI's exit 1); the message names the prompt, position and measure."""


_LABELS = {"max_rel_error": "max relative logit error", "mean_kl": "mean KL(reference || output)"}


@dataclass
class VerifyReport(Report):
    """What ``verify`` found: the output, the reference, each prompt's measures, the overall ones, the verdict."""

    output: str
    kind: str  # merged | lora | gguf | gguf-lora
    type: str  # float32, bfloat16, gguf-q8_0, ...
    engine: str
    adapter: str
    base: str
    reference_dtype: str
    prompts_source: str
    tolerance: Tolerance
    effect: float  # max |reference - base| / max |reference|: how much the adapter moves the logits
    prompts: list[dict[str, Any]] = field(default_factory=list)
    overall: dict[str, Any] = field(default_factory=dict)
    passed: bool = False
    failure: str | None = None

    def to_text(self) -> str:
        """One row per prompt, then the overall measures and the verdict."""
        t = self.tolerance
        lines = [f"verified {self.output} ({self.kind}, {self.type}) in {self.engine} against {self.adapter} on "
                 f"{self.base} ({self.reference_dtype} reference, {len(self.prompts)} prompts: {self.prompts_source})",
                 f"{'prompt':>6}  {'tokens':>6}  {'max rel.err':>11}  {'mean KL':>9}  {'top-1':>6}  {'corr.':>8}"]
        for p in self.prompts:
            lines.append(f"{p['prompt']:>6}  {p['tokens']:>6}  {p['max_rel_error']:>11.3e}  {p['mean_kl']:>9.2e}  "
                         f"{p['top1']:>6.1%}  {p['correlation']:>8.5f}")
        o = self.overall
        lines.append(f"{'all':>6}  {o['tokens']:>6}  {o['max_rel_error']:>11.3e}  {o['mean_kl']:>9.2e}  "
                     f"{o['top1']:>6.1%}  {o['correlation']:>8.5f}")
        lines.append(f"tolerance: {_LABELS[t.measure]} <= {t.bound:.3g} ({t.source}); the adapter moves the logits "
                     f"by {self.effect:.3g} of their largest value")
        if self.effect == 0:
            lines.append("note: the adapter does not change the logits, so this check proves only the base")
        lines.append("PASSED: the output gives the adapter's outputs within its tolerance" if self.passed
                     else f"FAILED: {self.failure}")
        return "\n".join(lines)


def build_report(outs: list[np.ndarray], refs: list[np.ndarray], *, tolerance: Tolerance, **fields: Any
                 ) -> VerifyReport:
    """Measure every prompt and all of them together, and judge the output by ``tolerance``."""
    rows = []
    for number, (out, ref) in enumerate(zip(outs, refs), 1):
        rows.append({"prompt": number, "tokens": int(ref.shape[0]), **measure(out, ref)})
    everything_out, everything_ref = np.concatenate(outs), np.concatenate(refs)
    kl = np.concatenate([kl_divergence(r, o) for o, r in zip(outs, refs)])
    overall = measure(everything_out, everything_ref)
    overall.update(max_rel_error=max(r["max_rel_error"] for r in rows), mean_kl=float(kl.mean()),
                   tokens=int(everything_ref.shape[0]))
    for key in ("max_rel_error_position", "max_kl_position"):
        overall.pop(key)
    report = VerifyReport(tolerance=tolerance, prompts=rows, overall=overall, **fields)
    value = overall[tolerance.measure]
    report.passed = tolerance.holds(value)
    if not report.passed:
        position = "max_rel_error_position" if tolerance.measure == "max_rel_error" else "max_kl_position"
        score = "max_rel_error" if tolerance.measure == "max_rel_error" else "mean_kl"
        worst = max(rows, key=lambda r: r[score])
        report.failure = (f"{_LABELS[tolerance.measure]} {value:.3g} exceeds {tolerance.bound:.3g} "
                          f"({report.type}: {tolerance.source}); worst at prompt {worst['prompt']}, position "
                          f"{worst[position]}")
    return report
