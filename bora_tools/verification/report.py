"""``VerifyReport``: per prompt and overall, how close the output came to the reference, and the verdict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bora_tools.errors import BoraError
from bora_tools.report import Report
from bora_tools.verification.measures import Tolerance, kl_divergence, measure, measure_logprobs


class VerificationFailed(BoraError):
    """The output is outside its tolerance (the CLI's exit 1); the message names the prompt, position and measure."""


_LABELS = {"max_rel_error": "max relative logit error", "mean_kl": "mean KL(reference || output)",
           "max_rel_logprob_error": "max relative logprob error"}


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
        error = "max_rel_logprob_error" if t.measure == "max_rel_logprob_error" else "max_rel_error"
        for p in [*self.prompts, {**self.overall, "prompt": "all"}]:
            lines.append(f"{p['prompt']:>6}  {p['tokens']:>6}  {_num(p[error], '11.3e')}  "
                         f"{_num(p['mean_kl'], '9.2e')}  {_num(p['top1'], '6.1%')}  {_num(p['correlation'], '8.5f')}")
        lines.append(f"tolerance: {_LABELS[t.measure]} <= {t.bound:.3g} ({t.source}); the adapter moves the logits "
                     f"by {self.effect:.3g} of their largest value")
        if self.effect == 0:
            lines.append("note: the adapter does not change the logits, so this check proves only the base")
        if error == "max_rel_logprob_error":
            lines.append("vLLM returns the log-probabilities of its top tokens, not logits: no KL or correlation")
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
    return _judge(VerifyReport(tolerance=tolerance, prompts=rows, overall=overall, **fields))


def build_logprob_report(served: list[list[dict[int, float]]], refs: list[np.ndarray], *, tolerance: Tolerance,
                         **fields: Any) -> VerifyReport:
    """``build_report`` for an engine that returns top-k log-probabilities (vLLM): ``measure_logprobs``."""
    rows = [{"prompt": number, "tokens": int(ref.shape[0]), **measure_logprobs(out, ref)}
            for number, (out, ref) in enumerate(zip(served, refs), 1)]
    positions = sum(len(out) for out in served)
    top1 = sum(r["top1"] * len(out) for r, out in zip(rows, served)) / max(positions, 1)
    overall = {"max_rel_error": None, "max_rel_logprob_error": max(r["max_rel_logprob_error"] for r in rows),
               "mean_kl": None, "top1": top1, "correlation": None, "tokens": sum(r["tokens"] for r in rows)}
    return _judge(VerifyReport(tolerance=tolerance, prompts=rows, overall=overall, **fields))


def _num(value: float | None, spec: str) -> str:
    """``value`` in ``spec`` (``-`` for a measure the engine's output does not allow), right-aligned."""
    width = int(spec.split(".")[0])
    return f"{'-':>{width}}" if value is None else f"{value:>{spec}}"


def _judge(report: VerifyReport) -> VerifyReport:
    """The verdict by the report's tolerance, and the failure line naming the worst prompt and position."""
    tolerance = report.tolerance
    value = report.overall[tolerance.measure]
    report.passed = tolerance.holds(value)
    if not report.passed:
        position = "max_kl_position" if tolerance.measure == "mean_kl" else f"{tolerance.measure}_position"
        worst = max(report.prompts, key=lambda r: r[tolerance.measure])
        report.failure = (f"{_LABELS[tolerance.measure]} {value:.3g} exceeds {tolerance.bound:.3g} "
                          f"({report.type}: {tolerance.source}); worst at prompt {worst['prompt']}, position "
                          f"{worst[position]}")
    return report
